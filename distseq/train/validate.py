"""Everything ``distseq train`` settles before any process group exists: the ``auto`` parallel keys chosen by the
planner, the profile, and every check of the config against the world size, the model and the data.

:func:`launch_plan` is what the trainer, ``distseq eval`` and ``--dry-run`` call: it resolves ``parallel.*:
auto`` (or, on a resume, keeps the choice saved in the checkpoint), loads the profile that the choice and
``parallel.softmax_strategy_per_batch`` predict with, and validates the result. Every rank computes the same
result from the same config, profile and world (no collective); every error is a ValueError naming the values.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from distseq.config.run import AUTO, RunConfig
from distseq.models.parallelize import check_parallel_dims, check_strategies
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import MeshAxis, ParallelDims
from distseq.plan.auto import AutoLayout, resolve_auto, run_profile, saved_choice
from distseq.plan.batch import SoftmaxBatchChooser, SoftmaxShape
from distseq.plan.profiles import ClusterProfile
from distseq.train.checkpoint import CheckpointDirectory
from distseq.train.deepspeed_engine import import_deepspeed

__all__ = ["RunPlan", "launch_plan", "make_source", "planner_dtype", "softmax_chooser", "validate"]


@dataclass(frozen=True)
class RunPlan:
    """The validated run: degrees, the usp degree, and how its layout was chosen."""

    dims: ParallelDims
    ulysses_degree: int | None
    #: the planner's choice, when a parallel key was ``auto`` and resolved at this launch
    auto: AutoLayout | None = None
    #: the checkpoint whose saved layout a resume kept for the ``auto`` keys
    auto_kept_from: str | None = None
    #: the profile of ``parallel.profile``, when auto keys or the per-batch softmax choice need one
    profile: ClusterProfile | None = None
    gpus_per_node: int = 1


def validate(cfg: RunConfig, world_size: int) -> RunPlan:
    """Every check that needs no process group; raises ValueError naming the numbers."""
    deg = cfg.check(world_size)
    if cfg.parallel.data_parallel == "deepspeed":
        import_deepspeed()  # installed, or an ImportError saying how
    dims = ParallelDims(**deg, world_size=world_size)
    check_parallel_dims(cfg.model, dims)
    check_strategies(cfg.model, linear=cfg.parallel.linear_strategy)  # gated DeltaNet layers need a delta rule
    SequenceLayout(cfg.parallel.layout, cfg.data.seq_len, dims.sp, 0)  # sequence divisibility, named
    softmax = cfg.parallel.softmax_strategies()
    ulysses = cfg.parallel.ulysses_degree
    if "usp" in softmax and ulysses is None:
        ulysses = math.gcd(dims.sp, cfg.model.num_kv_heads // dims.tp)
    heads = {"num_heads": cfg.model.num_heads // dims.tp, "num_kv_heads": cfg.model.num_kv_heads // dims.tp}
    for name in softmax:
        needs_heads = {"ulysses": dims.sp, "usp": ulysses}.get(name)
        if needs_heads and heads["num_heads"] % needs_heads:
            raise ValueError(
                f"softmax_strategy {name!r} splits heads over {needs_heads} ranks: "
                f"num_heads/tp = {heads['num_heads']} is not divisible (tp={dims.tp})"
            )
    if cfg.parallel.linear_strategy == "ulysses" and heads["num_heads"] % dims.sp:
        raise ValueError(f"linear_strategy 'ulysses' needs num_heads/tp={heads['num_heads']} divisible by sp={dims.sp}")
    make_source(cfg, eval_split=False)  # the data source's own checks (file exists, vocabulary fits)
    if cfg.data.eval_samples and cfg.data.eval_samples % (dims.dp * cfg.data.micro_batch):
        raise ValueError(
            f"data.eval_samples={cfg.data.eval_samples} must be divisible by dp * micro_batch = "
            f"{dims.dp} * {cfg.data.micro_batch}"
        )
    return RunPlan(dims, ulysses)


def make_source(cfg: RunConfig, *, eval_split: bool):
    """The sample source of the run (or of its evaluation); None where there is nothing to evaluate on."""
    data = cfg.data
    if data.source == "synthetic":
        from distseq.data.synthetic import RecallTask

        s = data.synthetic
        seed = cfg.train.seed + (1_000_003 if eval_split else 0)  # held-out samples for evaluation
        return RecallTask(
            data.seq_len,
            cfg.model.vocab_size,
            num_pairs=s.num_pairs,
            num_queries=s.num_queries,
            num_keys=s.num_keys,
            num_values=s.num_values,
            min_pairs=s.min_pairs,
            seed=seed,
        )
    from distseq.data.tokens import TokenFileSource

    path = data.eval_path if eval_split else data.path
    if path is None:
        return None
    source = TokenFileSource(path, data.seq_len, documents=data.pack_documents)
    if source.file.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"token file {path!r} has vocab_size={source.file.vocab_size} > model.vocab_size={cfg.model.vocab_size}"
        )
    return source


def planner_dtype(cfg: RunConfig) -> str:
    """``bf16`` or ``fp32``: what the run computes in (``train.dtype``; ``auto`` is bf16 on CUDA), the profile peak
    its predictions use."""
    want = cfg.train.dtype
    return "bf16" if want == "bfloat16" or (want == "auto" and torch.cuda.is_available()) else "fp32"


def _device_name() -> str | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def _kept_choice(cfg: RunConfig, world_size: int, resume: bool | str) -> tuple[RunConfig, str] | None:
    """A resume's auto keys from the checkpoint it starts from, when that checkpoint ran on this world size and its
    saved layout still agrees with the fixed keys and passes the checks."""
    path = CheckpointDirectory(cfg.checkpoint_dir).latest() if resume is True else Path(resume)
    if path is None:
        return None
    try:
        meta = CheckpointDirectory.read_meta(path)
    except FileNotFoundError:
        return None  # the trainer names the missing checkpoint once the run starts
    if meta.get("world_size") != world_size:
        return None
    kept = saved_choice(cfg, meta.get("config", {}).get("parallel", {}))
    if kept is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # validated again below, warnings and all
            validate(kept, world_size)
    except ValueError:
        return None
    return kept, str(path)


def launch_plan(
    cfg: RunConfig, world_size: int, *, resume: bool | str = False, gpus_per_node: int | None = None
) -> tuple[RunConfig, RunPlan]:
    """The run as it launches on ``world_size`` ranks, ``gpus_per_node`` per node (default ``LOCAL_WORLD_SIZE``,
    else one node): its ``auto`` parallel keys resolved, validated. Needs no process group."""
    gpus = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    parallel = cfg.parallel
    keys = parallel.auto_keys()
    needs_profile = bool(keys or parallel.softmax_strategy_per_batch)
    if parallel.profile != AUTO and not needs_profile:
        warnings.warn(
            f"parallel.profile={parallel.profile!r} has no effect: no parallel key is 'auto' and "
            "parallel.softmax_strategy_per_batch is empty",
            stacklevel=2,
        )
    profile = run_profile(parallel.profile, _device_name()) if needs_profile else None
    auto, kept_from = None, None
    if keys:
        kept = _kept_choice(cfg, world_size, resume) if resume else None
        if kept is not None:
            cfg, kept_from = kept
        else:
            auto = resolve_auto(
                cfg,
                profile,
                world_size=world_size,
                gpus_per_node=gpus,
                dtype=planner_dtype(cfg),
                accept=lambda resolved: validate(resolved, world_size),
            )
            cfg = auto.config
    plan = validate(cfg, world_size)
    return cfg, replace(plan, auto=auto, auto_kept_from=kept_from, profile=profile, gpus_per_node=gpus)


def softmax_chooser(cfg: RunConfig, plan: RunPlan) -> SoftmaxBatchChooser:
    """The per-batch softmax choice of a run with ``parallel.softmax_strategy_per_batch``: one tensor-parallel
    rank's heads, the link its sequence-parallel groups use (inter-node when one spans nodes)."""
    dims, gpus, profile = plan.dims, plan.gpus_per_node, plan.profile
    assert profile is not None, "launch_plan loads the profile for softmax_strategy_per_batch"
    crosses = any(len({rank // gpus for rank in group}) > 1 for group in dims.axis_groups(MeshAxis.SP))
    dtype = planner_dtype(cfg)
    return SoftmaxBatchChooser(
        cfg.parallel.softmax_strategies(),
        kind=cfg.parallel.layout,
        seq_len=cfg.data.seq_len,
        sp=dims.sp,
        shape=SoftmaxShape(
            heads=cfg.model.num_heads // dims.tp,
            kv_heads=cfg.model.num_kv_heads // dims.tp,
            head_dim=cfg.model.head_dim,
            batch=cfg.data.micro_batch,
            elem_bytes=2 if dtype == "bf16" else 4,
        ),
        profile=profile,
        link=profile.inter if crosses else profile.intra,
        dtype=dtype,
        ulysses_degree=plan.ulysses_degree,
    )
