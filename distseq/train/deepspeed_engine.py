"""DeepSpeed ZeRO as the data-parallel engine of ``distseq train`` (``parallel.data_parallel: deepspeed``).

One job: build a DeepSpeed engine around the parallelized model and the trainer's AdamW, drive it (micro-batch
boundaries, backward, one step per optimizer step under the trainer's learning rate), and save and load its
checkpoints. The model, the optimizer's parameter groups, the data, the schedule and the loss stay the trainer's.
DeepSpeed is imported here, only when a run asks for it.

DeepSpeed's data-parallel group is the trainer's ``dp x sp`` group (every rank holding different tokens), handed
over as an ``mpu``; it is not told about sequence parallelism, so every ZeRO stage treats the ``F = dp * sp`` ranks
as plain data parallelism and shards over all of them.

Loss normalisation. Each rank's loss is its share of the global loss (normalised by the global target count), so
gradients must be *summed* over ``dp x sp``. DeepSpeed averages: stage 0 divides the all-reduced buckets by its
data-parallel size, stages 1 and 2 the reduced gradients, stage 3's reduce-scatter pre-divides by the group size.
(Told the sequence-parallel size, stages 0-2 would divide by ``F / sp`` instead while stage 3's reduce-scatter
still divides by ``F``: the stages would disagree.) So the engine backpropagates ``F`` times the loss, and every
stage's mean is distseq's sum, exactly when ``F`` is a power of two. Nothing else may divide:
``gradient_accumulation_steps`` is 1 and ``backward`` does not scale by it (the trainer accumulates micro-batches
itself and marks the last one as the boundary, where stages 0 and 1 reduce; stages 2 and 3 reduce every
micro-batch), ``prescale_gradients`` is off, ``gradient_predivide_factor`` 1, and ``gradient_clipping`` comes from
``optim.max_grad_norm`` (DeepSpeed's own default, 1.0, would clip silently; 0 is off).

The gradient norm is DeepSpeed's (before clipping): stages 1-3 compute it in their step and skip the update when it
is not finite; stage 0 reports none, so it is computed here, before the step, which is skipped the same way.

Checkpoints (:class:`DeepSpeedCheckpoints`) are DeepSpeed's own files in the run's ``step_XXXXXXXX`` directories,
plus the RNG states and ``meta.json`` every distseq checkpoint has. ZeRO shards belong to the ``dp x sp`` size that
wrote them, so such a checkpoint resumes under the same world size only; ``train.init_from`` reads a DCP checkpoint
(of the reduce, ddp or fsdp engines, any layout) into the model before DeepSpeed takes it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distseq.config.run import RunConfig
from distseq.parallel.comm import Communicator
from distseq.parallel.mesh import MeshAxis
from distseq.train.checkpoint import CheckpointDirectory

__all__ = ["DeepSpeedCheckpoints", "ZeroEngine", "deepspeed_config", "import_deepspeed"]

#: ``meta.json``'s ``engine`` of a DeepSpeed checkpoint
ENGINE = "deepspeed"


def import_deepspeed():
    """The deepspeed module, or an ImportError saying how to install it."""
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(
            "parallel.data_parallel 'deepspeed' needs DeepSpeed, which is not installed: pip install "
            "distseq[deepspeed] (on a CPU-only machine: DS_BUILD_OPS=0 pip install distseq[deepspeed])"
        ) from err
    return deepspeed


def deepspeed_config(cfg: RunConfig) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO from the ``deepspeed`` section; batch, accumulation, scaling and clipping
    set so that DeepSpeed leaves the loss normalisation and the schedule to the trainer (see the module docstring)."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_allreduce_op": "mean",
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
        "zero_optimization": zero,
        # The trainer's torch AdamW also when its state lives in host memory (no DeepSpeedCPUAdam op to build).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }


class _DataParallelUnit:
    """The ``mpu`` DeepSpeed asks for its groups: data parallelism over ``data`` (dp x sp), no model parallelism
    (``model`` is the one-rank tensor-parallel group)."""

    def __init__(self, data: Communicator, model: Communicator):
        self.data, self.model = data, model

    def get_data_parallel_group(self):
        return self.data.group

    def get_data_parallel_rank(self) -> int:
        return self.data.rank

    def get_data_parallel_world_size(self) -> int:
        return self.data.size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.data.ranks

    def get_model_parallel_group(self):
        return self.model.group

    def get_model_parallel_rank(self) -> int:
        return self.model.rank

    def get_model_parallel_world_size(self) -> int:
        return self.model.size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size


@contextlib.contextmanager
def _local_rank(device: torch.device) -> Iterator[None]:
    """``LOCAL_RANK``, which DeepSpeed reads while it builds and runs an engine (ZeRO-3 at every step): torchrun's,
    else the device's index (a process started without torchrun: one rank, or spawned test ranks), removed again
    afterwards."""
    if "LOCAL_RANK" in os.environ:
        yield
        return
    os.environ["LOCAL_RANK"] = str(device.index or 0)
    try:
        yield
    finally:
        os.environ.pop("LOCAL_RANK", None)


class ZeroEngine:
    """A DeepSpeed engine over ``model`` (parallelized, not wrapped, on ``device``) and ``optimizer`` (the trainer's
    AdamW and its parameter groups), data-parallel over ``comms[MeshAxis.DP_SP]``. Collective.

    Per optimizer step: for each micro-batch ``accumulation_boundary(last)``, the forward through :attr:`engine`,
    ``backward(loss)``; then ``step(lr)`` once. Call ``close()`` when the run ends.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: RunConfig,
        comms: dict[MeshAxis, Communicator],
        device: torch.device,
    ):
        deepspeed = import_deepspeed()
        token_comm = comms[MeshAxis.DP_SP]
        tp, ep = comms[MeshAxis.TP].size, comms[MeshAxis.EP].size
        if tp != 1 or ep != 1:
            raise ValueError(
                f"DeepSpeed's engine reduces and clips whole weights: it needs tp = ep = 1, got tp={tp}, ep={ep}"
            )
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group the trainer made
        self.stage = cfg.deepspeed.zero_stage
        self.mean_to_sum = float(token_comm.size)  # DeepSpeed's mean over dp x sp times F is distseq's sum
        self._environment = contextlib.ExitStack()
        self._environment.enter_context(_local_rank(device))
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                config=deepspeed_config(cfg),
                mpu=_DataParallelUnit(token_comm, comms[MeshAxis.TP]),
            )
        except BaseException:
            self._environment.close()
            raise

    def accumulation_boundary(self, last: bool) -> None:
        """Before a micro-batch's forward: whether it is the step's last (where stages 0 and 1 reduce gradients)."""
        self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's share of the step's loss (DeepSpeed then averages, see the module docstring)."""
        self.engine.backward(loss * self.mean_to_sum, scale_wrt_gas=False)

    def step(self, lr: float) -> float:
        """Clip to ``optim.max_grad_norm`` and apply the step at learning rate ``lr``; returns the global gradient
        norm before clipping. A non-finite norm leaves the weights untouched."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.stage == 0:
            # Every rank holds the whole summed gradient (tp = ep = 1): its norm is the global norm.
            squares = sum(p.grad.double().pow(2).sum() for p in self.engine.module.parameters() if p.grad is not None)
            norm = float(torch.as_tensor(squares).sqrt())
            if math.isfinite(norm):
                self.engine.step()
            return norm
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def close(self) -> None:
        """Release the engine's hooks and buffers (stage 3 keeps hooks on every module) and ``LOCAL_RANK``."""
        try:
            self.engine.destroy()
        finally:
            self._environment.close()


class DeepSpeedCheckpoints(CheckpointDirectory):
    """The engine's checkpoints, with the methods the trainer calls on a
    :class:`~distseq.train.checkpoint.CheckpointManager`: ``save``, ``load``, ``restore_rng``, ``latest``,
    ``retire``. ``step_XXXXXXXX`` holds DeepSpeed's files (``engine.save_checkpoint`` with the directory's name as
    the tag: module states, every rank's ZeRO shards of the optimizer state), the RNG states and, last,
    ``meta.json`` with ``"engine": "deepspeed"``.

    Args:
        directory: the run's checkpoint directory.
        zero: the run's engine.
        world_size: the ranks of this run; a checkpoint resumes only under the world size that saved it.
        keep: complete checkpoints kept (0 = all).
    """

    def __init__(self, directory: str | Path, zero: ZeroEngine, *, world_size: int, keep: int = 2):
        super().__init__(directory, keep=keep)
        self.zero, self.world_size = zero, world_size

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Save at ``step`` (collective); returns the directory."""
        path = self.step_path(step)
        self.zero.engine.save_checkpoint(str(self.directory), tag=path.name, save_latest=False)
        return self._complete(path, step, {**meta, "engine": ENGINE})

    def load(self, path: str | Path) -> dict[str, Any]:
        """Load the module, the optimizer state and its ZeRO shards from ``path`` (collective); returns the meta
        dict. Checked first, on every rank: the checkpoint is DeepSpeed's and was saved under this world size."""
        path = Path(path)
        meta = self.read_meta(path)
        if meta.get("engine") != ENGINE:
            raise ValueError(
                f"{path} is not a DeepSpeed checkpoint (saved with parallel.data_parallel other than 'deepspeed'): "
                "resume it under its own setting, or start a DeepSpeed run from its weights with train.init_from"
            )
        if meta.get("world_size") != self.world_size:
            raise ValueError(
                f"{path} holds ZeRO shards of {meta.get('world_size')} ranks ({meta.get('degrees')}); this run has "
                f"{self.world_size}: a DeepSpeed checkpoint resumes under the world size that saved it"
            )
        loaded, _ = self.zero.engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint to load in {path}")
        return meta
