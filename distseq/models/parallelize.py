"""How the hybrid model is split: the tensor-parallel plan, expert parallelism and the MoE token group.

Build the model without parallelism (same seed on every rank), then ``parallelize_hybrid`` it. Every check
runs before the model is touched and before any collective.
"""

from __future__ import annotations

import fnmatch
from functools import partial

from distseq.config.model import ModelConfig
from distseq.models.hybrid import HybridLM
from distseq.models.layers import LinearAttention, ShortConv, SoftmaxAttention
from distseq.models.moe import MoE
from distseq.parallel.comm import Communicator
from distseq.parallel.data import TP_PARTIAL_ATTR
from distseq.parallel.expert import apply_expert_parallel
from distseq.parallel.mesh import MeshAxis, ParallelDims
from distseq.parallel.tensor import parallelize_module, vocab_parallel_argmax, vocab_parallel_cross_entropy

__all__ = ["TP_PLAN", "check_parallel_dims", "parallelize_hybrid"]

#: module-name glob -> tensor-parallel style (heads and MLP width split; MoE layers are replicated over tp)
TP_PLAN = {
    "embed": "vocab_embedding",
    "blocks.*.attn.q_proj": "colwise",
    "blocks.*.attn.k_proj": "colwise",
    "blocks.*.attn.v_proj": "colwise",
    "blocks.*.attn.gate_proj": "colwise",
    "blocks.*.attn.out_gate_proj": "colwise",
    "blocks.*.attn.o_proj": "rowwise",
    "blocks.*.mlp.gate_proj": "colwise",
    "blocks.*.mlp.up_proj": "colwise",
    "blocks.*.mlp.down_proj": "rowwise",
    "lm_head": "colwise",
}


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


def parallelize_hybrid(model: HybridLM, dims: ParallelDims, comms: dict[MeshAxis, Communicator]) -> HybridLM:
    """Apply tensor parallelism over ``comms[tp]``, expert parallelism over ``comms[ep]`` and point the MoE
    load-balancing statistics at ``comms[sp]``; in place. Gradients are then reduced with
    ``reduce_gradients(model, comms[dp_sp], comms[edp], comms[tp])``."""
    check_parallel_dims(model.config, dims)
    tp = comms[MeshAxis.TP]
    if tp.size > 1:
        names = [name for name, _ in model.named_modules() if name]
        plan = {k: v for k, v in TP_PLAN.items() if fnmatch.filter(names, k)}  # keys of absent layers dropped
        parallelize_module(model, tp, plan)
        heads = model.config.num_heads // tp.size
        for module in model.modules():
            if isinstance(module, LinearAttention):  # the fixed decays follow their heads
                module.decay = module.decay[tp.rank * heads : (tp.rank + 1) * heads]
            if isinstance(module, ShortConv):  # per-channel filters follow the column-split projections
                module.shard_channels(tp)
            if isinstance(module, (LinearAttention, SoftmaxAttention)):
                # Per-head norms see only this rank's heads: their gradients are partial sums over tp.
                for norm in (
                    module.out_norm if isinstance(module, LinearAttention) else None,
                    getattr(module, "q_norm", None),
                    getattr(module, "k_norm", None),
                ):
                    for p in norm.parameters() if norm is not None else ():
                        setattr(p, TP_PARTIAL_ATTR, True)
        vocab_start = tp.rank * model.config.vocab_size // tp.size
        model.token_losses = partial(vocab_parallel_cross_entropy, comm=tp, vocab_start=vocab_start)
        model.token_argmax = partial(vocab_parallel_argmax, comm=tp, vocab_start=vocab_start)
    for module in model.modules():
        if isinstance(module, MoE):
            module.token_comm = comms[MeshAxis.SP]  # balance statistics per sequence
            if dims.ep > 1:
                apply_expert_parallel(module, comms[MeshAxis.EP])
    return model
