"""``parallel.*: auto``: the keys of a run's layout that the planner chooses at launch.

:func:`resolve_auto` ranks every layout of the run's model and data on the world it runs on
(:func:`~distseq.plan.search.rank_layouts`), keeps the candidates that agree with every parallel key that is not
``auto``, and takes the first one the trainer accepts. It is arithmetic on the config, the profile and the world
alone (the ranking is a stable sort), so every rank reaches the same choice without a collective, and its errors
(no agreeing layout, unknown profile) are raised before the process group exists.

:func:`run_profile` turns ``parallel.profile`` into a :class:`ClusterProfile`: ``auto`` maps the CUDA device's
name to a profile (``DEVICE_PROFILES``), and on a machine without CUDA reads ``distseq/plan/cpu.json``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distseq.config.run import AUTO, RunConfig
from distseq.plan.profiles import ClusterProfile, load_profile, profile_names
from distseq.plan.search import Candidate, rank_layouts

__all__ = [
    "CPU_PROFILE",
    "DEVICE_PROFILES",
    "AutoLayout",
    "profile_for_device",
    "resolve_auto",
    "run_profile",
    "saved_choice",
]

CPU_PROFILE = Path(__file__).with_name("cpu.json")
#: GPU families by the substring of the CUDA device name that names them (``torch.cuda.get_device_name``, e.g.
#: "NVIDIA H100 80GB HBM3", "NVIDIA A100-PCIE-40GB"); a name with "PCIe" in it takes the ``-pcie`` profile
DEVICE_PROFILES = {"B200": "b200", "H200": "h200", "H800": "h800", "H100": "h100", "A100": "a100"}


def profile_for_device(device_name: str | None) -> str:
    """The profile ``parallel.profile: auto`` means on a device named ``device_name`` (None: no CUDA device):
    a profile name, or the path of ``cpu.json``. ValueError for a GPU without a profile."""
    if device_name is None:
        return str(CPU_PROFILE)
    upper = device_name.upper()
    for family, name in DEVICE_PROFILES.items():
        if family in upper:
            name = f"{name}-pcie" if "PCIE" in upper else name
            if name in profile_names():
                return name
            break
    raise ValueError(
        f"parallel.profile 'auto' has no profile for the CUDA device {device_name!r}: set parallel.profile to one of "
        f"{profile_names()} or to a JSON file of the same shape"
    )


def run_profile(setting: str, device_name: str | None) -> ClusterProfile:
    """The profile of ``parallel.profile = setting`` on a device named ``device_name`` (None: no CUDA device)."""
    name = profile_for_device(device_name) if setting == AUTO else setting
    try:
        return load_profile(name)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"parallel.profile={setting!r}: {err}") from err


@dataclass(frozen=True)
class AutoLayout:
    """The resolved run and how it was chosen."""

    config: RunConfig  # every auto key replaced by the choice
    candidate: Candidate
    keys: tuple[str, ...]  # the keys that were auto
    profile: str
    nodes: int
    gpus_per_node: int
    agreeing: int  # candidates that agreed with the fixed keys
    ranked: int  # candidates the planner ranked

    def choice(self) -> dict[str, Any]:
        """The chosen value of every key that was ``auto``."""
        return {key: getattr(self.config.parallel, key) for key in self.keys}

    def describe(self) -> str:
        p = self.candidate.prediction
        return (
            f"parallel auto {list(self.keys)}: {self.candidate.label}, predicted step {p.step_s:.4g} s (compute "
            f"{p.compute_s:.4g} s, binding {p.binding}) on profile {self.profile} for {self.nodes} x "
            f"{self.gpus_per_node} ranks; best of {self.agreeing} agreeing layouts of {self.ranked} ranked"
        )

    def event(self) -> dict[str, Any]:
        """The ``parallel_auto`` row of ``metrics.jsonl``."""
        return {
            "choice": self.choice(),
            "label": self.candidate.label,
            "predicted_step_s": self.candidate.prediction.step_s,
            "profile": self.profile,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
        }


def _fixed(cfg: RunConfig) -> dict[str, Any]:
    """The parallel keys a candidate must agree with: every key that is not auto, except an unset dp or
    ulysses_degree (derived values, which the planner chooses once any key is auto)."""
    p = cfg.parallel
    return {key: getattr(p, key) for key in p.AUTO_KEYS if getattr(p, key) not in (AUTO, None)}


def _values(candidate: Candidate) -> dict[str, Any]:
    return {
        "dp": candidate.dp,
        "sp": candidate.sp,
        "tp": candidate.tp,
        "ep": candidate.ep,
        "softmax_strategy": candidate.softmax,
        "ulysses_degree": candidate.ulysses_degree,
        "linear_strategy": candidate.linear,
        "layout": candidate.layout,
    }


def _agrees(cfg: RunConfig, candidate: Candidate, fixed: Mapping[str, Any]) -> bool:
    values = _values(candidate)
    if any(values[key] != want for key, want in fixed.items()):
        return False
    per_batch = cfg.parallel.softmax_strategy_per_batch
    return not per_batch or candidate.softmax in per_batch


def _apply(cfg: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    return replace(cfg, parallel=replace(cfg.parallel, **values))


def resolve_auto(
    cfg: RunConfig,
    profile: ClusterProfile,
    *,
    world_size: int,
    gpus_per_node: int,
    dtype: str = "bf16",
    accept: Callable[[RunConfig], object] | None = None,
) -> AutoLayout:
    """``cfg`` with its ``auto`` parallel keys chosen for ``world_size`` ranks, ``gpus_per_node`` per node.

    The candidates of :func:`rank_layouts` (best first) that agree with every fixed key (and, with
    ``softmax_strategy_per_batch``, whose softmax strategy is in the list); the first one for which
    ``accept(resolved_config)`` does not raise ValueError (the trainer passes its validation: checks the planner
    does not make, such as ``data.eval_samples`` against dp). ValueError naming the fixed keys when none is left.
    """
    keys = tuple(cfg.parallel.auto_keys())
    if not keys:
        raise ValueError("resolve_auto needs a parallel key set to 'auto'; none is")
    if gpus_per_node < 1 or world_size < 1 or world_size % gpus_per_node:
        raise ValueError(
            f"parallel auto: the world of {world_size} ranks is not whole nodes of {gpus_per_node} "
            "(LOCAL_WORLD_SIZE, or --gpus-per-node with --dry-run)"
        )
    nodes = world_size // gpus_per_node
    ranked = rank_layouts(cfg, profile, nodes=nodes, gpus_per_node=gpus_per_node, dtype=dtype)
    fixed = _fixed(cfg)
    agreeing = [c for c in ranked if _agrees(cfg, c, fixed)]
    where = f"{nodes} x {gpus_per_node} ranks (profile {profile.name})"
    if not agreeing:
        best = f"; the planner's best is {ranked[0].label}" if ranked else ""
        per_batch = cfg.parallel.softmax_strategy_per_batch
        within = f", softmax in softmax_strategy_per_batch={per_batch}" if per_batch else ""
        raise ValueError(
            f"parallel auto {list(keys)}: none of the {len(ranked)} layouts of {cfg.name} on {where} agrees with the "
            f"fixed keys {fixed}{within}{best}"
        )
    refused: list[str] = []
    for candidate in agreeing:
        resolved = _apply(cfg, _values(candidate))
        try:
            if accept is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the accepted one is validated again, warnings and all
                    accept(resolved)
        except ValueError as err:
            refused.append(f"{candidate.label}: {err}")
            continue
        _warn_about(cfg, candidate)
        return AutoLayout(resolved, candidate, keys, profile.name, nodes, gpus_per_node, len(agreeing), len(ranked))
    raise ValueError(
        f"parallel auto {list(keys)}: the trainer refuses all {len(agreeing)} layouts on {where} that agree with the "
        f"fixed keys {fixed}; the first: " + "; ".join(refused[:3])
    )


def _warn_about(cfg: RunConfig, candidate: Candidate) -> None:
    if not candidate.prediction.fits:
        gib = candidate.prediction.memory_bytes / 2**30
        warnings.warn(
            f"parallel auto: the chosen layout {candidate.label} is predicted not to fit the device's memory "
            f"({gib:.1f} GiB per rank)",
            stacklevel=3,
        )
    elif candidate.checkpointing and not cfg.train.activation_checkpointing:
        warnings.warn(
            f"parallel auto: the chosen layout {candidate.label} is predicted to fit only with "
            "train.activation_checkpointing, which is off",
            stacklevel=3,
        )


def saved_choice(cfg: RunConfig, saved_parallel: Mapping[str, Any]) -> RunConfig | None:
    """``cfg`` with its auto keys taken from a checkpoint's resolved ``parallel`` section (a resume keeps the
    layout chosen at the run's launch), or None when the saved section does not fit: an auto value left in it,
    or a fixed key that disagrees."""
    keys = cfg.parallel.auto_keys()
    free = [key for key in ("dp", "ulysses_degree") if getattr(cfg.parallel, key) is None]
    taken = {key: saved_parallel.get(key) for key in (*keys, *free)}
    if AUTO in taken.values() or any(taken[key] is None for key in keys if key != "ulysses_degree"):
        return None
    if any(saved_parallel.get(key) != want for key, want in _fixed(cfg).items()):
        return None
    try:
        return _apply(cfg, taken)
    except ValueError:  # the per-batch list's check in ParallelConfig
        return None
