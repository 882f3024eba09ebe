"""How the hybrid model is split: the tensor-parallel plan, expert parallelism and the MoE token group.

Build the model without parallelism (same seed on every rank), then ``parallelize_hybrid`` it. Every check
runs before the model is touched and before any collective.
"""

from __future__ import annotations

import fnmatch
from functools import partial

from distseq.config.model import ModelConfig
from distseq.models.deltanet import GatedDeltaNet, require_delta_rule
from distseq.models.hybrid import HybridLM
from distseq.models.layers import LinearAttention, SoftmaxAttention
from distseq.models.mamba import Mamba2
from distseq.models.moe import MoE
from distseq.parallel.comm import Communicator
from distseq.parallel.data import TP_PARTIAL_ATTR
from distseq.parallel.expert import apply_expert_parallel
from distseq.parallel.mesh import MeshAxis, ParallelDims
from distseq.parallel.sequence.registry import strategy_class
from distseq.parallel.tensor import (
    ColumnParallelLinear,
    parallelize_module,
    shard_parameter,
    tp_slice,
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)

__all__ = ["MAMBA_GROUPS_TP_PLAN", "TP_PLAN", "check_parallel_dims", "check_strategies", "parallelize_hybrid"]

#: module-name glob -> tensor-parallel style (heads and MLP width split; MoE layers are replicated over tp)
TP_PLAN = {
    "embed": "vocab_embedding",
    "blocks.*.attn.q_proj": "colwise",
    "blocks.*.attn.k_proj": "colwise",
    "blocks.*.attn.v_proj": "colwise",
    "blocks.*.attn.gate_proj": "colwise",
    "blocks.*.attn.out_gate_proj": "colwise",
    "blocks.*.attn.o_proj": "rowwise",
    "blocks.*.attn.beta_proj": "colwise",  # gated DeltaNet
    "blocks.*.attn.z_proj": "colwise",  # Mamba2: z, x and dt by heads
    "blocks.*.attn.x_proj": "colwise",
    "blocks.*.attn.dt_proj": "colwise",
    "blocks.*.mlp.gate_proj": "colwise",
    "blocks.*.mlp.up_proj": "colwise",
    "blocks.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise",
}
#: Mamba2's B and C projections when tp divides ``mamba_groups`` (split with their heads); with one group they
#: stay whole on every rank (``parallelize_hybrid``)
MAMBA_GROUPS_TP_PLAN = {"blocks.*.attn.b_proj": "colwise", "blocks.*.attn.c_proj": "colwise"}


def check_parallel_dims(cfg: ModelConfig, dims: ParallelDims) -> None:
    """Raise ValueError naming the numbers when ``dims`` cannot split a model of ``cfg`` (no collectives)."""
    numbers = {
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
    }
    bad = {k: v for k, v in numbers.items() if v % dims.tp}
    if bad:
        raise ValueError(f"tp={dims.tp} must divide {bad}")
    if dims.tp > 1 and cfg.tie_embeddings:
        raise ValueError("tie_embeddings is not supported with tp > 1")
    if "M" in cfg.mlp_kinds() and cfg.num_experts % dims.ep:
        raise ValueError(f"ep must divide num_experts: num_experts={cfg.num_experts}, ep={dims.ep}")
    if "M" in cfg.layer_pattern and cfg.mamba_groups > 1 and cfg.mamba_groups % dims.tp:
        raise ValueError(
            f"Mamba2 layers need mamba_groups 1 (B and C whole on every tp rank) or divisible by tp: "
            f"mamba_groups={cfg.mamba_groups}, tp={dims.tp}"
        )


def check_strategies(cfg: ModelConfig, *, linear: str) -> None:
    """Raise ValueError when the linear strategy ``linear`` cannot run a layer of ``cfg`` (no collectives): gated
    DeltaNet layers need one with the delta rule."""
    if "G" in cfg.layer_pattern:
        require_delta_rule(strategy_class(linear), linear)


def parallelize_hybrid(model: HybridLM, dims: ParallelDims, comms: dict[MeshAxis, Communicator]) -> HybridLM:
    """Apply tensor parallelism over ``comms[tp]``, expert parallelism over ``comms[ep]`` and point the MoE
    load-balancing statistics at ``comms[sp]``; in place. Gradients are then reduced with
    ``reduce_gradients(model, comms[dp_sp], comms[edp], comms[tp])``."""
    check_parallel_dims(model.config, dims)
    tp = comms[MeshAxis.TP]
    if tp.size > 1:
        cfg = model.config
        names = [name for name, _ in model.named_modules() if name]
        split_groups = cfg.mamba_groups % tp.size == 0
        full_plan = TP_PLAN | (MAMBA_GROUPS_TP_PLAN if split_groups else {})
        plan = {k: v for k, v in full_plan.items() if fnmatch.filter(names, k)}  # keys of absent layers dropped
        parallelize_module(model, tp, plan)
        heads = cfg.num_heads // tp.size
        for module in model.modules():
            if isinstance(module, LinearAttention):  # the fixed decays follow their heads
                module.decay = module.decay[tp.rank * heads : (tp.rank + 1) * heads]
            if isinstance(module, (LinearAttention, SoftmaxAttention, GatedDeltaNet)):
                if module.conv is not None:  # per-channel filters follow the column-split projections
                    module.conv.shard_channels(tp)
                # Per-head norms see only this rank's heads: their gradients are partial sums over tp.
                for norm in (
                    getattr(module, "out_norm", None),
                    getattr(module, "q_norm", None),
                    getattr(module, "k_norm", None),
                ):
                    _mark_tp_partial(norm.parameters() if norm is not None else ())
            if isinstance(module, (Mamba2, GatedDeltaNet)):
                _shard_per_head(module, tp)
            if isinstance(module, Mamba2):
                module.conv.shard_channels(tp, replicated=() if split_groups else ("q", "k"))
                if not split_groups:
                    _replicate_over_tp(module, tp)
        vocab_start = tp.rank * model.config.vocab_size // tp.size
        model.token_losses = partial(vocab_parallel_cross_entropy, comm=tp, vocab_start=vocab_start)
        model.token_argmax = partial(vocab_parallel_argmax, comm=tp, vocab_start=vocab_start)
    for module in model.modules():
        if isinstance(module, MoE):
            module.token_comm = comms[MeshAxis.SP]  # balance statistics per sequence
            if dims.ep > 1:
                apply_expert_parallel(module, comms[MeshAxis.EP])
    return model


def _mark_tp_partial(params) -> None:
    for p in params:
        setattr(p, TP_PARTIAL_ATTR, True)


def _shard_per_head(module: Mamba2 | GatedDeltaNet, tp: Communicator) -> None:
    """Keep this rank's heads of the per-head parameters (``[H]``, or ``[H * P]`` for Mamba2's norm weight)."""
    for name in ("A_log", "dt_bias", "D", "norm_weight"):
        param = getattr(module, name, None)
        if param is not None:
            setattr(module, name, shard_parameter(param, tp_slice(param.shape[0], tp, f"{name} heads"), 0))


def _replicate_over_tp(module: Mamba2, tp: Communicator) -> None:
    """One B / C group shared by every head: its projections and filters stay whole on every tp rank. Each rank's
    heads use it, so the gradients of their weights and of their input are partial sums over tp: the input's is
    all-reduced as a column-parallel layer's, the weights' are summed with the other tp-partial gradients."""
    for name in ("b_proj", "c_proj"):
        linear = getattr(module, name)
        whole = ColumnParallelLinear(shard_parameter(linear.weight, slice(None), None), None, tp)
        setattr(module, name, whole)
    conv = module.conv
    _mark_tp_partial(
        [module.b_proj.weight, module.c_proj.weight, conv.q_weight, conv.q_bias, conv.k_weight, conv.k_bias]
    )
