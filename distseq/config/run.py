"""The run configuration of ``distseq train``: typed sections, loaded strictly from YAML (no torch here).

A run file holds the sections below; every key is optional except where a section says otherwise, and an
unknown key anywhere is an error naming its dotted path. ``RunConfig.check(world_size)`` validates what
needs no model or process group (degrees, batch arithmetic, sequence divisibility); the trainer adds the
model-dependent checks, all before ``init_process_group``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

from distseq.config.model import ModelConfig

__all__ = [
    "AUTO",
    "CheckpointConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "MetricsConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "SyntheticConfig",
    "TrainConfig",
]

SoftmaxStrategy = Literal["ring", "ulysses", "allgather_kv", "token_ring", "usp"]
LinearStrategy = Literal["lasp2", "lasp1", "allscan", "ulysses"]
#: a parallel key whose value the planner chooses at launch (``distseq.plan.auto``)
Auto = Literal["auto"]
AUTO = "auto"


@dataclass(kw_only=True)
class ParallelConfig:
    """How the ranks are split. ``dp`` defaults to what is left: ``world_size / (sp * tp)``.

    Attributes:
        dp, sp, tp, ep: data, sequence, tensor and expert parallel degrees (ep folded over dp x sp).
        softmax_strategy, linear_strategy: the SP strategy of each layer type.
        attention_backend: the local kernel of the softmax layers: ``auto`` (flash-attn, else torch's fused
            flash ops, for the device and dtype; the reference kernel for fp64), ``sdpa``, ``flash_attn`` or
            ``reference``. A backend named here that cannot serve the run's device and dtype is an error.
        linear_backend: the local kernel of the linear-attention layers (and Mamba2's scan): ``auto`` (distseq's
            Triton kernels on CUDA when triton is installed, else the chunked PyTorch path), ``torch``, ``triton``
            or ``fla`` (flash-linear-attention); the gated delta rule uses fla's kernels with ``fla``, and with
            ``auto`` on CUDA when fla is installed, else its PyTorch path.
        layout: the token layout of the whole model (``zigzag`` balances causal attention).
        ulysses_degree: the head-parallel degree of ``usp`` (must divide sp); default: largest that fits.
        data_parallel: how gradients of replicated weights are summed over dp x sp: ``reduce`` (one flat
            all-reduce per group after backward; supports expert parallelism), ``ddp`` (torch DDP, overlapped
            with backward), ``fsdp`` (FSDP2, parameters and optimizer state sharded over dp x sp) or
            ``deepspeed`` (a DeepSpeed ZeRO engine over dp x sp, configured by the ``deepspeed`` section; tp and
            ep 1).
        backend: process-group backend; ``auto`` = nccl when CUDA is available, else gloo.
        collective_timeout_s: a collective that does not finish in this time fails the run, naming it.
        profile: the device and link profile the planner predicts with (for ``auto`` keys and
            ``softmax_strategy_per_batch``): ``auto`` (the CUDA device's name mapped to ``h100``, ``h100-pcie``,
            ``h200``, ``h800``, ``a100``, ``a100-pcie`` or ``b200``; on CPU ``distseq/plan/cpu.json``), a profile
            name of ``distseq plan --profile``, or a JSON file of the same shape.
        softmax_strategy_per_batch: two or more softmax strategies, all built at start; for each micro-batch the
            softmax layers run the one with the lowest predicted time for that batch's document lengths
            (``distseq.plan.batch``). Every strategy is exact, so the choice changes speed, not results. Empty
            (the default): ``softmax_strategy`` for every batch. ``softmax_strategy`` must be one of the list
            (it is what the dry run's plan and an ``auto`` layout are predicted with).

    ``auto``: ``dp``, ``sp``, ``tp``, ``ep``, ``softmax_strategy``, ``linear_strategy``, ``layout`` and
    ``ulysses_degree`` may be ``auto``. At launch (the trainer and ``--dry-run``) the planner ranks every layout of
    the run's model and data on the world it runs on (``WORLD_SIZE`` ranks, ``LOCAL_WORLD_SIZE`` per node), keeps
    those that agree with every key that is not ``auto`` and takes the fastest the trainer accepts; once a key is
    ``auto``, an unset ``dp`` or ``ulysses_degree`` is the planner's choice too. The run directory's
    ``config.yaml`` holds the resolved values.
    """

    dp: int | Auto | None = None
    sp: int | Auto = 1
    tp: int | Auto = 1
    ep: int | Auto = 1
    softmax_strategy: SoftmaxStrategy | Auto = "ring"
    linear_strategy: LinearStrategy | Auto = "lasp2"
    attention_backend: Literal["auto", "sdpa", "flash_attn", "reference"] = "auto"
    linear_backend: Literal["auto", "torch", "triton", "fla"] = "auto"
    layout: Literal["contiguous", "zigzag"] | Auto = "zigzag"
    ulysses_degree: int | Auto | None = None
    data_parallel: Literal["reduce", "ddp", "fsdp", "deepspeed"] = "reduce"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    collective_timeout_s: float = 300.0
    profile: str = "auto"
    softmax_strategy_per_batch: list[SoftmaxStrategy] = field(default_factory=list)

    #: the keys that may be ``auto``, in the order the planner's candidates name them
    AUTO_KEYS = ("dp", "sp", "tp", "ep", "softmax_strategy", "ulysses_degree", "linear_strategy", "layout")

    def __post_init__(self) -> None:
        choices = self.softmax_strategy_per_batch
        if choices:
            repeated = sorted({name for name in choices if choices.count(name) > 1})
            if len(choices) < 2 or repeated:
                raise ValueError(
                    f"parallel.softmax_strategy_per_batch needs two or more different strategies, got {choices}"
                )
            if self.softmax_strategy not in (AUTO, *choices):
                raise ValueError(
                    f"parallel.softmax_strategy={self.softmax_strategy!r} must be one of "
                    f"softmax_strategy_per_batch={choices} (or 'auto')"
                )

    def auto_keys(self) -> list[str]:
        """The keys set to ``auto``, in :attr:`AUTO_KEYS` order."""
        return [key for key in self.AUTO_KEYS if getattr(self, key) == AUTO]

    def softmax_strategies(self) -> list[str]:
        """Every softmax strategy the run builds: ``softmax_strategy`` first, then the per-batch alternatives."""
        return [self.softmax_strategy, *(s for s in self.softmax_strategy_per_batch if s != self.softmax_strategy)]

    def degrees(self, world_size: int) -> dict[str, int]:
        """``{"dp", "sp", "tp", "ep"}`` for ``world_size`` ranks; ValueError naming the numbers if they do not fit."""
        unresolved = self.auto_keys()
        if unresolved:
            raise ValueError(
                f"parallel keys {unresolved} are 'auto': resolve them first (distseq.plan.auto.resolve_auto; the "
                "trainer and --dry-run do it at launch)"
            )
        fixed = {"sp": self.sp, "tp": self.tp, "ep": self.ep}
        bad = {k: v for k, v in fixed.items() if v < 1}
        if bad or (self.dp is not None and self.dp < 1):
            raise ValueError(f"parallel degrees must be >= 1, got {bad or {'dp': self.dp}}")
        if world_size % (self.sp * self.tp):
            raise ValueError(
                f"world_size={world_size} is not divisible by sp * tp = {self.sp} * {self.tp} = {self.sp * self.tp}"
            )
        dp = self.dp if self.dp is not None else world_size // (self.sp * self.tp)
        if dp * self.sp * self.tp != world_size:
            raise ValueError(
                f"dp * sp * tp must equal the world size: dp={dp} * sp={self.sp} * tp={self.tp} = "
                f"{dp * self.sp * self.tp}, world_size={world_size}"
            )
        if (dp * self.sp) % self.ep:
            raise ValueError(f"ep must divide dp * sp: ep={self.ep}, dp={dp}, sp={self.sp}")
        return {"dp": dp, "sp": self.sp, "tp": self.tp, "ep": self.ep}


@dataclass(kw_only=True)
class SyntheticConfig:
    """The multi-query associative recall task (``distseq.data.synthetic``): key-value pairs early in the
    sequence, queries at its end, loss and accuracy on the answers only. ``min_pairs``: each sample draws its
    pair count from ``[min_pairs, num_pairs]`` (None: always ``num_pairs``)."""

    num_pairs: int = 4
    num_queries: int = 4
    num_keys: int = 64
    num_values: int = 16
    min_pairs: int | None = None


@dataclass(kw_only=True)
class DataConfig:
    """Where sequences come from and how many make a step.

    Attributes:
        source: ``synthetic`` (the long-range recall task) or ``tokens`` (a file made by ``distseq data prepare``).
        path: the token file (``tokens`` only).
        seq_len: tokens per sequence (the sharded dimension).
        global_batch: sequences per optimizer step, over all data-parallel ranks.
        micro_batch: sequences per forward/backward on one rank; ``global_batch / (dp * micro_batch)``
            micro-batches are accumulated per step.
        pack_documents: pass the token file's document boundaries to the model (``cu_seqlens``); needs
            micro_batch 1.
        group_by_length: with packed documents, order the samples of each window of ``group_window`` so that
            every optimizer step takes samples of similar document lengths (all short documents, or one long
            one): sorted by their causal attention pairs, cut into steps, the steps shuffled by the seed
            (``distseq.data.grouping``). Deterministic, and resumable like the plain order.
        group_window: samples per window of ``group_by_length``, a multiple of ``global_batch``; default
            ``8 * global_batch``.
        eval_samples: held-out sequences scored by each evaluation (loss, and greedy accuracy at the labelled
            positions: the answers of the synthetic task); 0 = no evaluation.
        eval_path: the held-out token file (``tokens`` only; without it a token run is not evaluated).
        synthetic: the synthetic task's sizes.
    """

    source: Literal["synthetic", "tokens"] = "synthetic"
    path: str | None = None
    seq_len: int = 512
    global_batch: int = 8
    micro_batch: int = 1
    pack_documents: bool = False
    group_by_length: bool = False
    group_window: int | None = None
    eval_samples: int = 16
    eval_path: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        sizes = {"seq_len": self.seq_len, "global_batch": self.global_batch, "micro_batch": self.micro_batch}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ValueError(f"data sizes must be >= 1, got {bad}")
        if self.source == "tokens" and not self.path:
            raise ValueError("data.source 'tokens' needs data.path (a file made by `distseq data prepare`)")
        if self.pack_documents and self.source != "tokens":
            raise ValueError("data.pack_documents needs data.source 'tokens' (the synthetic task has no documents)")
        if self.pack_documents and self.micro_batch != 1:
            raise ValueError(
                f"data.pack_documents needs micro_batch 1 (cu_seqlens describe one sequence), got {self.micro_batch}"
            )
        if self.group_by_length and not self.pack_documents:
            raise ValueError("data.group_by_length needs data.pack_documents (it groups samples by their documents)")
        if self.group_window is not None:
            if not self.group_by_length:
                warnings.warn("data.group_window has no effect without data.group_by_length", stacklevel=2)
            if self.group_window < self.global_batch or self.group_window % self.global_batch:
                raise ValueError(
                    f"data.group_window={self.group_window} must be a positive multiple of "
                    f"global_batch={self.global_batch}"
                )

    @property
    def grouping_window(self) -> int:
        """Samples per window of ``group_by_length``."""
        return self.group_window if self.group_window is not None else 8 * self.global_batch


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr`` at the last step.

    Weight decay applies to matrices (2-D and up) only, not to norms, biases or decays.
    """

    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need 0 < lr and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"optim.max_grad_norm must be positive or null, got {self.max_grad_norm}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(kw_only=True)
class TrainConfig:
    """The loop.

    Attributes:
        steps: optimizer steps of the whole run (a resumed run stops at the same step).
        seed: model initialisation (identical on every rank) and everything random.
        dtype: ``auto`` = bf16 autocast on GPU, fp32 on CPU; or force ``float32`` / ``bfloat16``.
        activation_checkpointing: recompute each block in backward instead of keeping its activations.
        eval_every: evaluate every this many steps (and at the end); 0 = only at the end.
        deterministic: ``torch.use_deterministic_algorithms`` (GPU kernels may be slower).
        init_from: a checkpoint directory (``runs/<name>/checkpoints/step_N``) whose model weights start this
            run, under any layout and sequence length; the optimizer, the schedule and the data start afresh.
            Ignored when the run resumes from its own checkpoint.
    """

    steps: int = 100
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    activation_checkpointing: bool = False
    eval_every: int = 0
    deterministic: bool = False
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 0:
            raise ValueError(f"train.steps must be >= 1 and eval_every >= 0, got {self.steps}, {self.eval_every}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """torch.distributed.checkpoint saves in ``<run dir>/checkpoints/step_XXXXXXXX`` (or ``dir``).

    Attributes:
        every: save every this many steps; 0 = only at the end.
        keep: complete checkpoints to keep (oldest removed); 0 = all.
        dir: where to save and look for ``--resume``; default ``<output_dir>/<name>/checkpoints``.
    """

    every: int = 0
    keep: int = 2
    dir: str | None = None

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 0:
            raise ValueError(f"checkpoint.every and keep must be >= 0, got {self.every}, {self.keep}")


@dataclass(kw_only=True)
class MetricsConfig:
    """Rank 0's logs: ``<run dir>/metrics.jsonl`` (one line per step), a progress line every ``print_every``
    steps, optionally TensorBoard events; ``peak_tflops`` overrides the device's known bf16 peak for MFU."""

    print_every: int = 1
    tensorboard: bool = False
    peak_tflops: float | None = None


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """DeepSpeed ZeRO over the dp x sp ranks (``parallel.data_parallel: deepspeed``; ``pip install
    distseq[deepspeed]``). The optimizer (AdamW), the learning-rate schedule, micro-batch accumulation and the
    clipping norm (``optim.max_grad_norm``) stay the trainer's; DeepSpeed reduces, shards, clips and steps.

    Attributes:
        zero_stage: 0 (gradients all-reduced, nothing sharded), 1 (optimizer state sharded over dp x sp),
            2 (also gradients) or 3 (also parameters, gathered layer by layer in forward and backward).
        offload_optimizer: ``cpu`` keeps the optimizer state and its step in host memory (stages 1-3).
        offload_param: ``cpu`` keeps the sharded parameters in host memory (stage 3 only).
        reduce_bucket_size: elements per gradient reduction bucket.
        param_persistence_threshold: stage 3: parameters of at most this many elements stay whole on every rank
            after their first gather (saving one gather per layer and micro-batch); 0 shards every parameter.
    """

    zero_stage: int = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    reduce_bucket_size: int = 500_000_000
    param_persistence_threshold: int = 100_000

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(
                f"deepspeed.offload_param={self.offload_param!r} needs zero_stage 3 (parameters are sharded only "
                f"there), got zero_stage={self.zero_stage}"
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError(
                f"deepspeed.offload_optimizer={self.offload_optimizer!r} needs zero_stage 1, 2 or 3, got 0"
            )
        if self.reduce_bucket_size < 1 or self.param_persistence_threshold < 0:
            raise ValueError(
                f"deepspeed.reduce_bucket_size must be >= 1 and param_persistence_threshold >= 0, got "
                f"{self.reduce_bucket_size}, {self.param_persistence_threshold}"
            )


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def check(self, world_size: int) -> dict[str, int]:
        """Validate what needs neither a model nor a process group; returns the parallel degrees."""
        deg = self.parallel.degrees(world_size)
        per_dp = deg["dp"] * self.data.micro_batch
        if self.data.global_batch % per_dp:
            raise ValueError(
                f"data.global_batch={self.data.global_batch} must be divisible by dp * micro_batch = "
                f"{deg['dp']} * {self.data.micro_batch} = {per_dp}"
            )
        pieces = deg["sp"] * (2 if self.parallel.layout == "zigzag" else 1)
        if self.data.seq_len % pieces:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} must be divisible by {pieces} "
                f"(sp={deg['sp']}, layout {self.parallel.layout!r})"
            )
        u = self.parallel.ulysses_degree
        softmax = self.parallel.softmax_strategies()
        if u is not None and ("usp" not in softmax or deg["sp"] % u):
            raise ValueError(
                f"parallel.ulysses_degree={u} needs softmax_strategy 'usp' (or usp in softmax_strategy_per_batch) "
                f"and to divide sp={deg['sp']} (softmax strategies: {softmax})"
            )
        if len(softmax) > 1 and (deg["sp"] == 1 or not self.data.pack_documents):
            warnings.warn(
                f"parallel.softmax_strategy_per_batch={self.parallel.softmax_strategy_per_batch} chooses by the "
                f"batch's documents; with sp={deg['sp']} and data.pack_documents={self.data.pack_documents} every "
                "batch gets the same choice",
                stacklevel=2,
            )
        if self.parallel.data_parallel != "reduce" and deg["ep"] > 1:
            raise ValueError(
                f"expert parallelism (ep={deg['ep']}) needs parallel.data_parallel 'reduce' "
                f"(got {self.parallel.data_parallel!r}): expert weights reduce over their own group"
            )
        if self.parallel.data_parallel == "deepspeed" and deg["tp"] > 1:
            raise ValueError(
                f"parallel.data_parallel 'deepspeed' needs tp=1, got tp={deg['tp']}: DeepSpeed would reduce and "
                "clip tensor-parallel shards as whole weights (use 'reduce', 'ddp' or 'fsdp' with tp > 1)"
            )
        if self.parallel.data_parallel != "deepspeed" and self.deepspeed != DeepSpeedConfig():
            warnings.warn(
                f"the deepspeed section has no effect with parallel.data_parallel {self.parallel.data_parallel!r}",
                stacklevel=2,
            )
        return deg

    @property
    def run_dir(self) -> str:
        return f"{self.output_dir}/{self.name}"

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.run_dir}/checkpoints"
