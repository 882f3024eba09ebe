"""``distseq train``: one training run from a :class:`~distseq.config.run.RunConfig`, under torchrun.

The order matters and is the contract of the command:

1. every check that needs no process group (config, parallel degrees against the world size and the model,
   sequence divisibility, data source) runs first, so bad input fails before any collective; ``auto`` parallel
   keys are chosen by the planner first (``distseq.train.validate.launch_plan``);
2. the process group (NCCL on GPU, gloo on CPU) with the configured collective timeout, the mesh and the
   per-axis communicators;
3. the model, built whole with the run's seed on every rank, then split by the TP/EP plan and wrapped for
   data parallelism; AdamW (handed to a DeepSpeed ZeRO engine with ``data_parallel: deepspeed``, see
   ``deepspeed_engine``); the loader; a checkpoint to resume from if asked;
4. the loop: micro-batches accumulated under one global loss normaliser, gradients reduced, clipped by the
   global norm, a warmup + cosine learning rate, metrics on rank 0, evaluation and checkpoints;
5. after the last step, rank 0 draws ``metrics.png`` (when matplotlib is installed) and prints one line with
   the result.

A resumed run first cuts ``metrics.jsonl`` back to the checkpoint's step (the steps a crashed run logged after
its last checkpoint move to ``metrics.dropped.jsonl``) and records a ``resume`` event row, so the file holds
each step once.

A non-finite loss or gradient norm stops the run with :class:`TrainingDiverged` before the optimizer step,
so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distseq.config.loader import dump_yaml, to_dict
from distseq.config.run import RunConfig
from distseq.data.grouping import LengthGroupedOrder
from distseq.data.loader import Batch, ShardedLoader
from distseq.kernels.delta_rule import delta_rule_backend
from distseq.kernels.linear_attention.backends import linear_attention_backend
from distseq.models.hybrid import IGNORE_INDEX, HybridLM
from distseq.models.parallelize import parallelize_hybrid
from distseq.parallel.comm import Communicator
from distseq.parallel.data import data_parallel, reduce_gradients, sum_tp_partial_gradients
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import MeshAxis
from distseq.parallel.sequence.context import SequenceParallel
from distseq.train.checkpoint import CheckpointManager, checkpoint_mesh, param_shards
from distseq.train.deepspeed_engine import DeepSpeedCheckpoints, ZeroEngine
from distseq.train.metrics import (
    METRICS_FILE,
    MetricsLogger,
    mfu,
    model_flops_per_sequence,
    peak_memory_bytes,
    peak_tflops,
    rewind_metrics,
    summary_line,
)
from distseq.train.plot import plot_finished_run
from distseq.train.validate import RunPlan, launch_plan, make_source, softmax_chooser, validate

__all__ = ["TrainingDiverged", "TrainResult", "run_training", "validate"]


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm is not finite; raised before the optimizer step touches the weights."""


@dataclass
class TrainResult:
    """What rank 0 reports back: per-step global losses, the last evaluation, where things went."""

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    run_dir: str = ""
    last_checkpoint: str | None = None
    start_step: int = 0


# -- 1. checks before any process group: distseq.train.validate ----------------------------------------------


# -- 2. process group ---------------------------------------------------------------------------------------


def _device_and_backend(cfg: RunConfig) -> tuple[torch.device, str]:
    cuda = torch.cuda.is_available()
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("parallel.backend 'nccl' needs CUDA; this machine has none (use 'gloo' or 'auto')")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device, backend
    return torch.device("cpu"), backend


# -- 3./4. the run ------------------------------------------------------------------------------------------


def run_training(cfg: RunConfig, *, resume: bool | str = False) -> TrainResult:
    """Train as ``cfg`` says, in this process (one rank of a torchrun job, or alone); returns rank 0's record."""
    started = time.perf_counter()
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    cfg, plan = launch_plan(cfg, world, resume=resume)
    device, backend = _device_and_backend(cfg)
    with _process_group(cfg, backend, world):
        run = _Run(cfg, plan, device, resume, started=started)
        try:
            return run.loop()
        finally:
            run.close()


def evaluate_lengths(
    cfg: RunConfig, checkpoint: str | Path, lengths: list[int], *, samples: int | None = None
) -> list[dict[str, Any]]:
    """Held-out loss and accuracy of ``checkpoint``'s weights on ``cfg``'s task at each sequence length (the run's
    layout; any world size), one row per length: ``{"seq_len", "eval_loss", "eval_accuracy"[, "eval_chance"]}``.
    ``samples`` held-out samples per length (default ``data.eval_samples``). Each length runs in
    ``<run_dir>/eval/seq_<N>`` (its config and metrics file), never touching the run's own checkpoints."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    samples = samples or cfg.data.eval_samples
    if not samples:
        raise ValueError("evaluating needs held-out samples: pass samples or set data.eval_samples")
    per_length = []
    for seq_len in lengths:  # every check first: a bad length fails before any collective
        sized = replace(
            cfg,
            name=f"{cfg.name}/eval/seq_{seq_len}",
            data=replace(cfg.data, seq_len=seq_len, eval_samples=samples),
            train=replace(cfg.train, init_from=str(checkpoint)),
        )
        per_length.append(launch_plan(sized, world))
    device, backend = _device_and_backend(cfg)
    rows = []
    with _process_group(cfg, backend, world):
        for (sized, plan), seq_len in zip(per_length, lengths, strict=True):
            run = _Run(sized, plan, device, False, started=time.perf_counter())
            try:
                result = run.evaluate()
                run.logger.event("eval", step=0, checkpoint=str(checkpoint), **result)
            finally:
                run.logger.close()
                run.close()
            rows.append({"seq_len": seq_len, **result})
    return rows


@contextlib.contextmanager
def _process_group(cfg: RunConfig, backend: str, world: int) -> Iterator[None]:
    """The default process group for the duration (one made here is destroyed after; an existing one is kept)."""
    owns_group = not dist.is_initialized()
    if owns_group:
        if backend == "nccl":  # a stuck collective tears the process down, with what hung in the log
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        timeout = timedelta(seconds=cfg.parallel.collective_timeout_s)
        if world == 1 and "MASTER_ADDR" not in os.environ:  # a plain `python -m distseq train`
            # An explicit address rather than environment variables, which would outlive the run (a later
            # `distseq check` in the same process would believe it runs under torchrun).
            address = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(backend, init_method=address, rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    try:
        yield
    finally:
        if owns_group:
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Run:
    """The state of one run on one rank."""

    def __init__(self, cfg: RunConfig, plan: RunPlan, device: torch.device, resume: bool | str, *, started: float):
        self.cfg, self.device, self.dims, self.started = cfg, device, plan.dims, started
        self.rank = dist.get_rank()
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        mesh = self.dims.build_mesh(device.type)
        self.comms = self.dims.communicators(mesh)
        coords = self.dims.coords(self.rank)

        torch.manual_seed(cfg.train.seed)  # the same full model on every rank before it is split
        model = HybridLM(cfg.model)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        parallelize_hybrid(model, self.dims, self.comms)
        model.to(device)
        self.module = model
        self.shards = param_shards(model)
        self.model: nn.Module = model
        mode = cfg.parallel.data_parallel
        if mode in ("ddp", "fsdp"):
            self.model = data_parallel(model, self.comms[MeshAxis.DP_SP], mode)

        decay, no_decay = [], []
        for p in self.module.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
        )
        checkpoints = CheckpointManager(
            cfg.checkpoint_dir,
            self.module,
            self.optimizer,
            self.shards,
            checkpoint_mesh(self.dims, device.type),
            keep=cfg.checkpoint.keep,
        )
        self.zero: ZeroEngine | None = None
        if mode == "deepspeed":
            if cfg.train.init_from and not resume:
                # Before DeepSpeed takes the weights (stage 3 shards them); an incomplete checkpoint is named.
                checkpoints.load(cfg.train.init_from, model_only=True)
            self.zero = ZeroEngine(model, self.optimizer, cfg, self.comms, device)
            self.model = self.zero.engine
            checkpoints = DeepSpeedCheckpoints(
                cfg.checkpoint_dir, self.zero, world_size=self.dims.world_size, keep=cfg.checkpoint.keep
            )
        self.ckpt: CheckpointManager | DeepSpeedCheckpoints = checkpoints

        layout = SequenceLayout(cfg.parallel.layout, cfg.data.seq_len, self.dims.sp, coords[MeshAxis.SP])

        def softmax_options(name: str) -> dict[str, Any]:
            options: dict[str, Any] = {"attention_backend": cfg.parallel.attention_backend}
            if name == "usp":
                options["ulysses_degree"] = plan.ulysses_degree
            return options

        # Every per-batch softmax strategy is built here, once, in one order on every rank (usp splits the group).
        self.seq = SequenceParallel.build(
            self.comms[MeshAxis.SP],
            layout,
            softmax=cfg.parallel.softmax_strategy,
            linear=cfg.parallel.linear_strategy,
            softmax_options=softmax_options(cfg.parallel.softmax_strategy),
            linear_options={"backend": cfg.parallel.linear_backend},
            softmax_choices={name: softmax_options(name) for name in cfg.parallel.softmax_strategies()},
        )
        self.softmax_chooser = softmax_chooser(cfg, plan) if cfg.parallel.softmax_strategy_per_batch else None
        loader_args = {"layout": layout, "dp": self.dims.dp, "dp_rank": coords[MeshAxis.DP]}
        source = make_source(cfg, eval_split=False)
        self.loader = ShardedLoader(
            source,
            global_batch=cfg.data.global_batch,
            micro_batch=cfg.data.micro_batch,
            order=(
                LengthGroupedOrder(
                    source, global_batch=cfg.data.global_batch, window=cfg.data.grouping_window, seed=cfg.train.seed
                )
                if cfg.data.group_by_length
                else None
            ),
            **loader_args,
        )
        eval_source = make_source(cfg, eval_split=True) if cfg.data.eval_samples else None
        self.eval_loader = (
            None
            if eval_source is None
            else ShardedLoader(
                eval_source, global_batch=cfg.data.eval_samples, micro_batch=cfg.data.micro_batch, **loader_args
            )
        )
        self.eval_chance = getattr(eval_source, "chance_accuracy", None)

        self.step = 0
        self._mfu_warned = False
        self.run_dir = Path(cfg.run_dir)
        self.result = TrainResult(run_dir=str(self.run_dir))
        if resume:
            self._resume(resume)
        else:
            if cfg.train.init_from and self.zero is None:  # an incomplete checkpoint is a FileNotFoundError naming it
                self.ckpt.load(cfg.train.init_from, model_only=True)
            # After loading: init_from may point into this very directory.
            retired = self.ckpt.retire()
            if retired is not None:
                print(f"an earlier run's checkpoints moved to {retired}", flush=True)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = replace(cfg, parallel=replace(cfg.parallel, dp=self.dims.dp))
            dump_yaml(resolved, self.run_dir / "config.yaml")
        self.flops_per_sequence = model_flops_per_sequence(cfg.model, cfg.data.seq_len)["total_train"]
        self.peak = cfg.metrics.peak_tflops or (
            peak_tflops(torch.cuda.get_device_name(device), self._compute_dtype()) if device.type == "cuda" else None
        )
        # Fails here, before the first step, when a backend named in the config cannot serve this run.
        kernel = self.seq.softmax.resolve_attention_backend(device, self._compute_dtype(), cfg.model.head_dim)
        linear_kernel = linear_attention_backend(cfg.parallel.linear_backend).__name__
        if "G" in cfg.model.layer_pattern:
            linear_kernel += f", delta rule: {delta_rule_backend(cfg.parallel.linear_backend, device)}"
        if self.rank == 0:
            if plan.auto is not None:
                print(plan.auto.describe(), flush=True)
            elif plan.auto_kept_from is not None:
                print(f"parallel auto: the layout saved in {plan.auto_kept_from}: {self._degrees()}", flush=True)
            softmax = self.seq.softmax.name
            if self.softmax_chooser is not None:
                softmax = f"per batch the fastest of {self.softmax_chooser.strategies} (profile {plan.profile.name})"
            print(
                f"softmax layers: {softmax} with the {kernel.name!r} local attention kernel "
                f"(parallel.attention_backend={cfg.parallel.attention_backend}, {self._compute_dtype()} on "
                f"{device.type}); linear layers: {self.seq.linear.name} with {linear_kernel} "
                f"(parallel.linear_backend={cfg.parallel.linear_backend})",
                flush=True,
            )
        metrics_path = self.run_dir / METRICS_FILE
        # Before the logger appends: the steps a crashed run logged after this checkpoint are not this run's (and
        # none of an earlier run in the same directory is, when this run starts from step 0).
        dropped = rewind_metrics(metrics_path, self.step) if self.rank == 0 else 0
        self.logger = MetricsLogger(
            str(metrics_path),
            rank=self.rank,
            total_steps=cfg.train.steps,
            tensorboard_dir=str(self.run_dir / "tensorboard") if cfg.metrics.tensorboard else None,
            print_every=cfg.metrics.print_every,
            start_step=self.step,
        )
        if resume:
            self.logger.event(
                "resume",
                step=self.step,
                checkpoint=self._relative_to_run(self.result.last_checkpoint),
                dropped_rows=dropped,
                layout=self._degrees(),
            )
        elif cfg.train.init_from:
            self.logger.event("init_from", step=0, checkpoint=cfg.train.init_from)
        if plan.auto is not None:
            self.logger.event("parallel_auto", step=self.step, **plan.auto.event())
        elif plan.auto_kept_from is not None:
            kept = {key: getattr(cfg.parallel, key) for key in cfg.parallel.AUTO_KEYS}
            self.logger.event("parallel_auto", step=self.step, choice=kept, kept_from=plan.auto_kept_from)

    def _context(self, batch: Batch, counts: dict[str, int] | None = None) -> SequenceParallel:
        """The sequence-parallel context of one micro-batch: its documents and, with a per-batch softmax choice,
        the strategy predicted fastest for them (the same on every rank of the SP group: global cu_seqlens)."""
        seq = self.seq.with_documents(batch.cu_seqlens)
        if self.softmax_chooser is None:
            return seq
        name = self.softmax_chooser.choose(batch.cu_seqlens)
        if counts is not None:
            counts[name] += 1
        return seq.with_softmax(name)

    # -- resume ----------------------------------------------------------------------------------------

    def _resume(self, resume: bool | str) -> None:
        path = self.ckpt.latest() if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.cfg.checkpoint_dir}")
        meta = self.ckpt.load(path)
        if meta.get("world_size") == self.dims.world_size and meta.get("degrees") == self._degrees():
            self.ckpt.restore_rng(path)  # each rank's own stream; meaningless under another layout
        self.step = int(meta["step"])
        self.loader.load_state_dict(meta["loader"])
        self.result.start_step = self.step
        self.result.last_checkpoint = str(path)

    def _relative_to_run(self, path: str) -> str:
        """``path`` relative to the run directory when it lies inside it (the usual checkpoints/step_N)."""
        absolute, run_dir = Path(path).resolve(), self.run_dir.resolve()
        return str(absolute.relative_to(run_dir)) if absolute.is_relative_to(run_dir) else str(absolute)

    def _degrees(self) -> dict[str, int]:
        return {"dp": self.dims.dp, "sp": self.dims.sp, "tp": self.dims.tp, "ep": self.dims.ep}

    def _save(self) -> None:
        meta = {
            "scheduler": {"kind": "warmup_cosine", "step": self.step},
            "loader": self.loader.state_dict(),
            "world_size": self.dims.world_size,
            "degrees": self._degrees(),
            "config": to_dict(self.cfg),
        }
        self.result.last_checkpoint = str(self.ckpt.save(self.step, meta))

    # -- one step --------------------------------------------------------------------------------------

    def _compute_dtype(self) -> torch.dtype:
        want = self.cfg.train.dtype
        if want == "bfloat16" or (want == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return torch.float32

    def _autocast(self):
        dtype = self._compute_dtype()
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _sync_context(self, last: bool):
        """Gradient synchronisation only on the last micro-batch (DDP no_sync, FSDP2 requires_gradient_sync,
        DeepSpeed's accumulation boundary)."""
        mode = self.cfg.parallel.data_parallel
        if mode == "ddp" and not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if mode == "fsdp" and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)
        if self.zero is not None:
            self.zero.accumulation_boundary(last)
        return contextlib.nullcontext()

    def _train_step(self) -> dict[str, Any]:
        dp_sp, tp = self.comms[MeshAxis.DP_SP], self.comms[MeshAxis.TP]
        micro = self.loader.next_step()
        targets = self._global_targets(micro)
        normalizer = float(max(targets, 1))
        sequences = float(self.cfg.data.global_batch)
        lm, aux = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        counts = None if self.softmax_chooser is None else dict.fromkeys(self.softmax_chooser.strategies, 0)
        for i, batch in enumerate(micro):
            seq = self._context(batch, counts)
            ids, labels = batch.input_ids.to(self.device), batch.labels.to(self.device)
            with self._sync_context(i == len(micro) - 1), self._autocast():
                # Both losses are this rank's share of the step's: tokens over all targets, the per-sequence
                # balance loss over all sequences of the global batch.
                out = self.model(ids, labels, seq, loss_normalizer=normalizer, aux_normalizer=sequences)
                if self.zero is not None:
                    self.zero.backward(out.loss)
                else:
                    out.loss.backward()
            lm += out.lm_loss.detach().float()
            aux += out.aux_loss.detach().float()
        if self.cfg.parallel.data_parallel == "reduce":
            reduce_gradients(self.module, dp_sp, self.comms[MeshAxis.EDP], tp)
        elif self.zero is None:
            sum_tp_partial_gradients(self.module, tp)  # DDP/FSDP2 reduce the rest over dp x sp
        totals = dp_sp.all_reduce(torch.stack([lm, aux]))  # the shares add up to the global values
        loss = float(totals[0] + totals[1])
        lr = self.cfg.optim.lr_at(self.step, self.cfg.train.steps)
        if self.zero is not None:
            self._check_finite(loss)
            # DeepSpeed clips and steps; with a non-finite gradient norm it leaves the weights as they are.
            grad_norm = self.zero.step(lr)
            self._check_finite(loss, grad_norm)
        else:
            grad_norm = self._clip()
            self._check_finite(loss, grad_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss,
            "lm_loss": float(totals[0]),
            "aux_loss": float(totals[1]),
            "grad_norm": grad_norm,
            "lr": lr,
            "targets": targets,
            # this replica's micro-batches by softmax strategy (no collective: rank 0's row shows its replica's)
            **({} if counts is None else {"softmax_batches": counts}),
        }

    def _check_finite(self, loss: float, grad_norm: float | None = None) -> None:
        """TrainingDiverged unless the loss and (when known) the gradient norm are finite."""
        if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
            raise TrainingDiverged(
                f"non-finite training at step {self.step + 1}: loss={loss}, grad_norm={grad_norm}; stopped before "
                f"the optimizer step. Last good checkpoint: {self.result.last_checkpoint or 'none saved yet'}"
            )

    def _global_targets(self, micro: list) -> int:
        """Labelled tokens of this step's micro-batches over every rank holding different tokens (dp x sp)."""
        local = sum(int((b.labels != IGNORE_INDEX).sum()) for b in micro)
        count = torch.tensor([local], dtype=torch.int64, device=self.device)
        return int(self.comms[MeshAxis.DP_SP].all_reduce(count)[0])

    def _clip(self) -> float:
        """The global gradient norm (every logical parameter counted once), clipped to max_grad_norm."""
        norm = global_grad_norm(self.module, self.shards, self.comms, fsdp=self.cfg.parallel.data_parallel == "fsdp")
        max_norm = self.cfg.optim.max_grad_norm
        if max_norm is not None and math.isfinite(norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and greedy accuracy at the labelled positions of the held-out samples (the same samples every
        time), global over dp x sp."""
        dp_sp = self.comms[MeshAxis.DP_SP]
        self.eval_loader.load_state_dict({"next_sample": 0, "seq_len": self.cfg.data.seq_len})
        micro = self.eval_loader.next_step()
        targets = float(self._global_targets(micro))
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        self.module.eval()
        try:
            for batch in micro:
                seq = self._context(batch)
                ids, labels = batch.input_ids.to(self.device), batch.labels.to(self.device)
                with self._autocast():
                    out = self.module(
                        ids, labels, seq, loss_normalizer=max(targets, 1.0), aux_normalizer=1.0, predict=True
                    )
                loss += out.lm_loss.double()
                correct += (out.predictions == labels[labels != IGNORE_INDEX]).sum().double()
        finally:
            self.module.train()
        totals = dp_sp.all_reduce(torch.stack([loss, correct]))
        result = {"eval_loss": float(totals[0]), "eval_accuracy": float(totals[1]) / max(targets, 1.0)}
        if self.eval_chance is not None:
            result["eval_chance"] = self.eval_chance
        return result

    # -- the loop --------------------------------------------------------------------------------------

    def _comm_snapshot(self) -> dict[str, int]:
        stats = {name: s.bytes_sent for name, s in self.seq.comm_stats().items()}
        for axis in (MeshAxis.TP, MeshAxis.EP, MeshAxis.DP_SP, MeshAxis.EDP):
            stats[axis.value] = self.comms[axis].stats.bytes_sent
        return stats

    def loop(self) -> TrainResult:
        cfg = self.cfg
        tokens_per_step = cfg.data.global_batch * cfg.data.seq_len
        try:
            while self.step < cfg.train.steps:
                before = self._comm_snapshot()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                fields = self._train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - start
                self.step += 1
                after = self._comm_snapshot()
                tflops = self.flops_per_sequence * cfg.data.global_batch / self.dims.world_size / elapsed / 1e12
                fields.update(
                    tokens_per_s=tokens_per_step / elapsed,
                    step_time_s=elapsed,
                    tflops_per_rank=tflops,
                    **self._mfu(tflops),
                    peak_memory_bytes=peak_memory_bytes(self.device),
                    comm_bytes_sent={k: after[k] - before.get(k, 0) for k in after},
                )
                self.result.losses.append(fields["loss"])
                last = self.step == cfg.train.steps
                if self.eval_loader is not None and (
                    last or (cfg.train.eval_every and self.step % cfg.train.eval_every == 0)
                ):
                    evaluation = self.evaluate()
                    fields.update(evaluation)
                    self.result.evals.append({"step": self.step, **evaluation})
                self.logger.log(self.step, **fields)
                if last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self._save()
        finally:
            self.logger.close()
        if self.rank == 0:  # only a completed run gets here
            self._finish()
        return self.result

    def _mfu(self, tflops: float) -> dict[str, Any]:
        """``{"mfu": ...}``; above 100% (a wrong peak table, FLOP count or timing) ``{"mfu": None, "mfu_error": ...}``
        in the row and one warning in the log: a wrong table entry must not stop a run."""
        try:
            return {"mfu": mfu(tflops, self.peak)}
        except ValueError as err:
            if self.rank == 0 and not self._mfu_warned:
                print(f"warning: {err} (reported as mfu_error in {METRICS_FILE}; metrics.peak_tflops sets the peak)")
                self._mfu_warned = True
            return {"mfu": None, "mfu_error": str(err)}

    def close(self) -> None:
        """Release what outlives the loop: the DeepSpeed engine's hooks and buffers."""
        if self.zero is not None:
            self.zero.close()

    def _finish(self) -> None:
        """Rank 0, after the last step: the picture of the run, then the one line naming its result."""
        seconds = time.perf_counter() - self.started
        plot_finished_run(self.run_dir)
        line = summary_line(
            step=self.step,
            start_step=self.result.start_step,
            seconds=seconds,
            loss=self.result.losses[-1] if self.result.losses else None,
            evaluation=self.result.evals[-1] if self.result.evals else None,
        )
        print(line, file=sys.stderr, flush=True)


def global_grad_norm(
    model: nn.Module, shards: dict, comms: dict[MeshAxis, Communicator], *, fsdp: bool = False
) -> float:
    """The L2 norm of the full logical gradient: squares summed per sharding kind, each kind summed over the
    axes it is split on (tp for tensor-parallel shards, ep for experts, dp x sp for FSDP shards), then added."""
    device = next(model.parameters()).device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # [replicated, tp-split, ep-split, tp+ep]
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        shard = shards[name]
        kind = (shard.tp_dim is not None) + 2 * shard.expert
        sums[kind] += g.double().pow(2).sum()
    if fsdp:
        sums = comms[MeshAxis.DP_SP].all_reduce(sums)
    split_tp = comms[MeshAxis.TP].all_reduce(sums[[1, 3]])
    sums = torch.stack([sums[0], split_tp[0], sums[2], split_tp[1]])
    split_ep = comms[MeshAxis.EP].all_reduce(sums[[2, 3]])
    return float((sums[0] + sums[1] + split_ep.sum()).sqrt())
