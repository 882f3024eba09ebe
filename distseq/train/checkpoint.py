"""Layout-independent checkpoints with torch.distributed.checkpoint (DCP).

Every parameter and AdamW state is saved as its *full logical tensor*, described (not gathered) by a DTensor
over a checkpoint mesh ``(edp, ep, tp)`` of the world: tensor-parallel shards are ``Shard(dim)`` on ``tp``,
expert shards ``Shard(0)`` on ``ep``, everything else replicated (DCP writes one copy). Loading builds the
same description for the *current* layout, so DCP reads exactly the pieces each rank needs: a checkpoint
saved under one (dp, sp, tp, ep) resumes under another. FSDP2 parameters (DTensors over dp x sp) are
gathered to their tensor-parallel-local shape for the save and scattered back after a load.

A checkpoint is a directory ``step_XXXXXXXX`` holding the DCP files, ``rng/rank<r>.pt`` (every rank's RNG
state) and, written last, ``meta.json`` (step, scheduler, data position, layout, config): a directory
without ``meta.json`` is incomplete and ignored. :class:`CheckpointDirectory` holds that bookkeeping, shared with
the DeepSpeed engine's checkpoints (``distseq.train.deepspeed_engine``), which write their weights in DeepSpeed's
format and say so in ``meta.json`` (``"engine": "deepspeed"``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from distseq.parallel.data import EXPERT_PARAM_ATTR
from distseq.parallel.mesh import ParallelDims
from distseq.parallel.tensor import TP_SHARD_DIM_ATTR

__all__ = ["CheckpointDirectory", "CheckpointManager", "ParamShard", "checkpoint_mesh", "param_shards"]

META = "meta.json"


@dataclass(frozen=True)
class ParamShard:
    """How a local parameter relates to its full tensor: expert-sharded (dim 0 over ep) and/or split over tp."""

    expert: bool = False
    tp_dim: int | None = None


def param_shards(model: nn.Module) -> dict[str, ParamShard]:
    """Each parameter's sharding, read from the marks the parallel plans leave; call before FSDP wraps the
    parameters (it replaces them and drops the marks)."""
    return {
        name: ParamShard(bool(getattr(p, EXPERT_PARAM_ATTR, False)), getattr(p, TP_SHARD_DIM_ATTR, None))
        for name, p in model.named_parameters()
    }


def checkpoint_mesh(dims: ParallelDims, device_type: str = "cpu"):
    """The ``(edp, ep, tp)`` DeviceMesh over the world (ranks in ParallelDims order). Collective."""
    from torch.distributed.device_mesh import init_device_mesh

    names = ("ckpt_edp", "ckpt_ep", "ckpt_tp")
    return init_device_mesh(device_type, (dims.edp, dims.ep, dims.tp), mesh_dim_names=names)


def _placements(shard: ParamShard) -> list:
    return [
        Replicate(),
        Shard(0) if shard.expert else Replicate(),
        Shard(shard.tp_dim) if shard.tp_dim is not None else Replicate(),
    ]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor-parallel-local value of ``t`` (an FSDP2 DTensor is gathered over its data-parallel mesh)."""
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _write_back(t: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a tensor-parallel-local ``value`` into ``t`` (for an FSDP2 DTensor, into this rank's shard)."""
    with torch.no_grad():
        if isinstance(t, DTensor):
            piece = distribute_tensor(value.to(t.device), t.device_mesh, t.placements, src_data_rank=None)
            t.to_local().copy_(piece.to_local())
        else:
            t.copy_(value)


def _ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW creates its state at the first step; a resume needs it to exist (zeros) to load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in optimizer.state or not optimizer.state[p]:
                optimizer.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
                if group.get("amsgrad"):
                    optimizer.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)


class CheckpointDirectory:
    """The ``step_XXXXXXXX`` checkpoints of one run, whatever writes their weights: completeness (``meta.json``
    written last), every rank's RNG state, the newest complete one, pruning, and retiring an earlier run's.
    :class:`CheckpointManager` (DCP) and the DeepSpeed engine's checkpoints add ``save`` and ``load``.

    Args:
        directory: where ``step_XXXXXXXX`` directories go.
        keep: complete checkpoints kept (0 = all).
    """

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory, self.keep = Path(directory), keep

    def step_path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def _complete(self, path: Path, step: int, meta: dict[str, Any]) -> Path:
        """After every rank wrote its weights to ``path``: each rank's RNG state, then (rank 0, once all are
        done) ``meta.json`` and pruning. Collective."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        (path / "rng").mkdir(parents=True, exist_ok=True)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, path / "rng" / f"rank{rank}.pt")
        _barrier()
        if rank == 0:
            tmp = path / (META + ".tmp")
            tmp.write_text(json.dumps({"step": step, **meta}, indent=1))
            os.replace(tmp, path / META)
            self._prune()
        _barrier()
        return path

    @staticmethod
    def read_meta(path: str | Path) -> dict[str, Any]:
        """The ``meta.json`` of checkpoint ``path``; FileNotFoundError when it is incomplete."""
        path = Path(path)
        if not (path / META).exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
        return json.loads((path / META).read_text())

    def restore_rng(self, path: str | Path) -> None:
        """Restore this rank's RNG state saved in ``path`` (meaningful only under the layout that saved it)."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng = torch.load(Path(path) / "rng" / f"rank{rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def latest(self) -> Path | None:
        """The newest complete checkpoint in the directory, or None."""
        done = sorted(p for p in self.directory.glob("step_*") if (p / META).exists())
        return done[-1] if done else None

    def retire(self) -> Path | None:
        """Move the checkpoints a previous run left in the directory to ``<directory>.previous`` (replacing an
        older one there), so a new run's saves, pruning and ``--resume`` see only its own (collective; rank 0
        moves). Returns where they went, or None when there were none."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        moved = None
        if rank == 0 and self.directory.is_dir() and any(self.directory.glob("step_*")):
            moved = self.directory.with_name(self.directory.name + ".previous")
            shutil.rmtree(moved, ignore_errors=True)
            os.replace(self.directory, moved)
        _barrier()
        return moved

    def _prune(self) -> None:
        if not self.keep:
            return
        done = sorted(p for p in self.directory.glob("step_*") if (p / META).exists())
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


class CheckpointManager(CheckpointDirectory):
    """Save and load model + optimizer (DCP, resharding) and the run's small state (JSON, rank 0).

    Args:
        directory: where ``step_XXXXXXXX`` directories go.
        model: the unwrapped module (not the DDP wrapper), parameter names as in ``shards``.
        optimizer: a torch optimizer over ``model``'s parameters (AdamW state names).
        shards: from :func:`param_shards`, taken before any FSDP wrapping.
        mesh: from :func:`checkpoint_mesh`.
        keep: complete checkpoints kept (0 = all).
    """

    def __init__(
        self,
        directory: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        shards: dict[str, ParamShard],
        mesh,
        *,
        keep: int = 2,
    ):
        super().__init__(directory, keep=keep)
        self.model, self.optimizer, self.shards, self.mesh = model, optimizer, shards, mesh
        missing = sorted(set(dict(model.named_parameters())) - set(shards))
        if missing:
            raise ValueError(f"no sharding recorded for parameters {missing}; call param_shards before wrapping")

    # -- the DCP state: full logical tensors described by DTensors ------------------------------------

    def _dtensor(self, name: str, value: torch.Tensor) -> DTensor:
        shard = self.shards[name]
        local = value.detach().contiguous()
        shape = list(local.shape)
        if shard.expert:
            shape[0] *= self.mesh.size(1)
        if shard.tp_dim is not None:
            shape[shard.tp_dim] *= self.mesh.size(2)
        return DTensor.from_local(
            local, self.mesh, _placements(shard), run_check=False, shape=torch.Size(shape), stride=_contiguous(shape)
        )

    def _state(self, *, model_only: bool = False) -> tuple[dict[str, Any], list[tuple[torch.Tensor, str]]]:
        """The DCP state dict and, for writing back after a load, (target tensor, key) pairs."""
        if not model_only:
            _ensure_optimizer_state(self.optimizer)
        state: dict[str, Any] = {}
        targets = []
        for name, p in self.model.named_parameters():
            state[f"model.{name}"] = self._dtensor(name, _local(p).clone())
            targets.append((p, f"model.{name}"))
            if model_only:
                continue
            for key, value in self.optimizer.state[p].items():
                full_key = f"optim.{name}.{key}"
                scalar = key == "step" or value.dim() == 0  # replicated: a plain tensor, DCP writes one copy
                state[full_key] = value.detach().clone() if scalar else self._dtensor(name, _local(value).clone())
                targets.append((value, full_key))
        return state, targets

    # -- save / load -----------------------------------------------------------------------------------

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Save at ``step`` (collective); ``meta`` (JSON-able: scheduler, data position, config) goes to
        ``meta.json``, written by rank 0 after every rank finished. Returns the directory."""
        path = self.step_path(step)
        state, _ = self._state()
        dcp.save(state, checkpoint_id=str(path))
        return self._complete(path, step, meta)

    def load(self, path: str | Path, *, model_only: bool = False) -> dict[str, Any]:
        """Load model and optimizer (or, with ``model_only``, the model's weights alone: a run initialised
        from another run) from ``path`` into the current layout (collective); returns the meta dict."""
        path = Path(path)
        meta = self.read_meta(path)
        if meta.get("engine", "dcp") != "dcp":
            engine = meta["engine"]
            raise ValueError(
                f"{path} holds a {engine} checkpoint: only --resume of a parallel.data_parallel {engine!r} run under "
                "the world size that saved it reads it (train.init_from needs one saved by 'reduce', 'ddp' or 'fsdp')"
            )
        state, targets = self._state(model_only=model_only)
        dcp.load(state, checkpoint_id=str(path))
        for target, key in targets:
            loaded = state[key]
            _write_back(target, loaded.to_local() if isinstance(loaded, DTensor) else loaded)
        return meta


def _contiguous(shape: list[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
