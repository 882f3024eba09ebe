"""The dry-run plan of a training step: layout, parameters, memory, FLOPs and communication per rank, by
arithmetic alone (no process group, no model).

Sequence-parallel bytes are the exact formulas of docs/communication.md (asserted against ``CommStats`` by the
distributed tests); the LASP-1 chain and the linear-attention Ulysses gate are derived from their strategy
code. Tensor-parallel bytes follow the TP plan's layers one collective at a time; expert-parallel bytes are the
expected value under uniform routing; gradient reduction uses the ring all-reduce convention
``2 (P-1) ceil(e/P) s`` that ``CommStats`` counts. Every figure is per rank.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any, NamedTuple

from distseq.config.model import ModelConfig
from distseq.models.parallelize import check_parallel_dims, check_strategies
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import MeshAxis, ParallelDims
from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from distseq.train.metrics import model_flops_per_sequence

__all__ = [
    "DATA_PARALLEL",
    "OPTIMIZER_STATES",
    "LayerBytes",
    "delta_rule_layer_bytes",
    "format_plan",
    "linear_layer_bytes",
    "parameter_counts",
    "plan_report",
    "softmax_layer_bytes",
]

#: optimizer -> state tensors per parameter (kept in fp32, fp64 for fp64 parameters); sgd without momentum
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0}
#: how gradients are summed over dp x sp (``distseq.config.run.ParallelConfig.data_parallel``)
DATA_PARALLEL = ("reduce", "ddp", "fsdp", "deepspeed")

_PRIMITIVES = {
    "ring": "send_recv (K/V ring; fp32 dK/dV ring backward)",
    "allgather_kv": "all_gather (K/V); reduce_scatter (dK/dV) backward",
    "ulysses": "all_to_all (sequence <-> heads)",
    "usp": "all_to_all (ulysses group) + send_recv (ring group)",
    "token_ring": "send_recv (Q ring, partial results to their owner)",
    "lasp2": "all_gather (chunk states)",
    "lasp1": "send / recv (serial state chain)",
    "allscan": "send_recv (pipelined state chain, in blocks)",
}
_DELTA_PRIMITIVES = {
    "lasp2": "all_gather (chunk summaries M, N); reduce_scatter backward",
    "allscan": "send_recv (pipelined chain of entering states, in blocks)",
    "ulysses": "all_to_all (sequence <-> heads)",
}


class LayerBytes(NamedTuple):
    """Bytes one rank sends and receives for one layer on one micro-batch."""

    fwd_sent: int
    fwd_received: int
    bwd_sent: int
    bwd_received: int


def _acc_bytes(elem_bytes: int) -> int:
    return 8 if elem_bytes == 8 else 4


def _sees(layout: SequenceLayout, q_rank: int, k_rank: int, causal: bool) -> bool:
    """Does any query of ``q_rank`` attend to any key of ``k_rank`` (within the layout's documents, if any)?"""
    if not causal and layout.doc_offsets is None:
        return True
    if not causal:  # some document holds tokens of both
        q_docs = {int(d) for d in layout.for_rank(q_rank).document_ids()}
        return bool(q_docs & {int(d) for d in layout.for_rank(k_rank).document_ids()})
    return layout.causal_pairs(q_rank, k_rank) > 0


def softmax_layer_bytes(
    name: str,
    layout: SequenceLayout,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    elem_bytes: int,
    causal: bool = True,
    ulysses_degree: int | None = None,
) -> LayerBytes:
    """Bytes of one softmax-attention layer on rank ``layout.sp_rank`` (docs/communication.md). Documents only
    make token_ring cheaper: with the layout's documents, the partial results it skips between ranks that share no
    document are not counted. ``heads`` / ``kv_heads`` are this rank's heads (after tensor parallelism);
    ``ulysses_degree`` is needed for ``usp``."""
    p, r, n = layout.sp_size, layout.sp_rank, layout.local_len
    s, a = elem_bytes, _acc_bytes(elem_bytes)
    kv = 2 * batch * n * kv_heads * head_dim  # K and V elements of this rank
    if name == "ring":
        fwd = (p - 1) * kv * s
        bwd = fwd + (p * kv * a if p > 1 else 0)
        return LayerBytes(fwd, fwd, bwd, bwd)
    if name == "allgather_kv":
        fwd = (p - 1) * kv * s
        return LayerBytes(fwd, fwd, fwd + (p - 1) * kv * a, fwd + (p - 1) * kv * a)
    if name in ("ulysses", "usp"):
        u = p if name == "ulysses" else ulysses_degree
        if u is None:
            raise ValueError("usp needs ulysses_degree")
        ring_size = p // u
        kv_rep = kv_heads * (u // math.gcd(kv_heads, u))  # KV heads replicated to a multiple of u
        a2a = (u - 1) * batch * n * (2 * heads + 2 * kv_rep) * head_dim * s // u
        ring_kv = (ring_size - 1) * 2 * batch * n * kv_rep * head_dim * s
        ring_grad = ring_size * 2 * batch * n * kv_rep * head_dim * a if ring_size > 1 else 0
        fwd, bwd = a2a + ring_kv, a2a + ring_kv + ring_grad
        return LayerBytes(fwd, fwd, bwd, bwd)
    if name == "token_ring":
        m_out = sum(_sees(layout, j, r, causal) for j in range(p) if j != r)  # ranks we send partials to
        m_in = sum(_sees(layout, r, j, causal) for j in range(p) if j != r)  # ranks we receive partials from
        q_bytes = (p - 1) * batch * n * heads * head_dim * s
        bundle = (p - 1) * batch * n * (2 * heads * head_dim * s + 2 * heads * a)  # (q, dout) + (lse, delta)
        partial = batch * n * (heads * head_dim + heads) * a  # (out, lse)
        dq_partial = batch * n * heads * head_dim * a
        return LayerBytes(
            q_bytes + m_out * partial, q_bytes + m_in * partial, bundle + m_out * dq_partial, bundle + m_in * dq_partial
        )
    raise ValueError(f"softmax layers take one of {SOFTMAX_STRATEGIES}, got {name!r}")


def linear_layer_bytes(
    name: str,
    layout: SequenceLayout,
    *,
    batch: int,
    heads: int,
    key_dim: int,
    value_dim: int,
    elem_bytes: int,
    gate: bool = False,
) -> LayerBytes:
    """Bytes of one linear-attention layer on rank ``layout.sp_rank`` (docs/communication.md). ``gate``: the
    layer has a data-dependent gate; the model computes it in fp32 (fp64 for fp64), so Ulysses moves it and its
    gradient in the accumulation dtype (derived from ``UlyssesAttention.linear_attention``)."""
    p, n = layout.sp_size, layout.local_len
    s, a = elem_bytes, _acc_bytes(elem_bytes)
    state = batch * heads * key_dim * value_dim * a
    if name == "lasp2":
        chunks = len(layout.chunks())
        fwd = (p - 1) * chunks * (state + batch * heads * a)  # states and one log-decay per chunk and head
        bwd = (p - 1) * chunks * state
        return LayerBytes(fwd, fwd, bwd, bwd)
    if name in ("lasp1", "allscan"):
        return _chain_bytes(layout, state)
    if name == "ulysses":
        # q, k, v and (with a gate) the gate there, the output back; the backward the transposes.
        width = (2 * key_dim + 2 * value_dim) * s + (a if gate else 0)
        fwd = (p - 1) * batch * n * heads * width // p
        return LayerBytes(fwd, fwd, fwd, fwd)
    raise ValueError(f"linear layers take one of {[*LINEAR_STRATEGIES, 'ulysses']}, got {name!r}")


def _chain_bytes(layout: SequenceLayout, state: int) -> LayerBytes:
    """A chain over the chunks in sequence order (LASP-1, All-Scan): a hop between chunks of different ranks moves
    one ``state`` forward (to the next chunk's owner) and its gradient backward (to the previous one's)."""
    r, steps = layout.sp_rank, layout.chunk_neighbours(layout.sp_rank)
    to_next = sum(after is not None and after != r for _, _, after in steps)
    to_prev = sum(before is not None and before != r for _, before, _ in steps)
    return LayerBytes(to_next * state, to_prev * state, to_prev * state, to_next * state)


def delta_rule_layer_bytes(
    name: str, layout: SequenceLayout, *, batch: int, heads: int, key_dim: int, value_dim: int, elem_bytes: int
) -> LayerBytes:
    """Bytes of one gated DeltaNet layer's delta rule on rank ``layout.sp_rank``. ``lasp2``: every chunk's affine
    summary ``(M, N)`` (``K x K`` and ``K x V``, fp32) all-gathered forward, its gradient reduce-scattered
    backward (``distseq.parallel.sequence.delta``); ``ulysses``: q, k, v and beta (``s``) and the fp32 gate
    there, the output back, and the transposes backward."""
    p, n = layout.sp_size, layout.local_len
    s, a = elem_bytes, _acc_bytes(elem_bytes)
    if name == "lasp2":
        both = (p - 1) * len(layout.chunks()) * batch * heads * key_dim * (key_dim + value_dim) * a
        return LayerBytes(both, both, both, both)
    if name == "allscan":  # the entering state (K x V) crosses each boundary between ranks, each way
        return _chain_bytes(layout, batch * heads * key_dim * value_dim * a)
    if name == "ulysses":
        width = (2 * key_dim + 2 * value_dim + 1) * s + a
        both = (p - 1) * batch * n * heads * width // p
        return LayerBytes(both, both, both, both)
    raise ValueError(f"gated DeltaNet layers take 'lasp2', 'allscan' or 'ulysses', got {name!r}")


def parameter_counts(cfg: ModelConfig, dims: ParallelDims) -> dict[str, int]:
    """Parameters of ``HybridLM(cfg)`` and per rank after ``parallelize_hybrid``: the TP plan's layers
    (embedding, attention projections and gate, dense MLPs, LM head) are split over tp with the convolutions'
    filters and the per-head parameters, routed experts over ep; norms, routers and shared experts are
    replicated, and so are Mamba2's B and C (projections and filters) unless tp divides mamba_groups."""
    h, d, heads, kv_heads = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    n_softmax, n_linear = cfg.layer_pattern.count("A"), cfg.layer_pattern.count("L")
    n_mamba, n_deltanet = cfg.layer_pattern.count("M"), cfg.layer_pattern.count("G")
    conv = cfg.short_conv_size + 1 if cfg.short_conv_size else 0  # filter taps and bias per channel
    mamba_conv, mamba_bc = cfg.mamba_conv_size + 1, 2 * cfg.mamba_groups * cfg.mamba_state_size
    bc_split = cfg.mamba_groups % dims.tp == 0
    n_moe = cfg.mlp_kinds().count("M")
    n_dense = cfg.num_layers - n_moe
    tp_sharded = (
        cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)
        + n_softmax * 2 * h * d * (heads + kv_heads)
        + n_linear * (4 * h * heads * d + (h + 1) * heads * cfg.linear_gate + h * heads * d * cfg.linear_output_gate)
        + n_dense * 3 * h * cfg.intermediate_size
        + n_softmax * (heads + 2 * kv_heads) * d * conv * cfg.short_conv_softmax
        + n_linear * 3 * heads * d * conv
        # Mamba2: z, x, o; dt; A_log, dt_bias, D; the norm weight; x's filters; B and C when split
        + n_mamba * (3 * h * heads * d + h * heads + 3 * heads + heads * d * (1 + mamba_conv))
        + n_mamba * mamba_bc * (h + mamba_conv) * bc_split
        # gated DeltaNet: q, k, v, output gate, o; decay step and beta; A_log, dt_bias; q, k, v filters
        + n_deltanet * (5 * h * heads * d + 2 * h * heads + 2 * heads + 3 * heads * d * conv)
    )
    # per-head norms and Mamba2's whole B and C: grads summed over tp
    tp_partial = (
        n_softmax * 2 * d * cfg.qk_norm
        + (n_linear + n_deltanet) * d
        + n_mamba * mamba_bc * (h + mamba_conv) * (not bc_split)
    )
    moe_width = cfg.moe_intermediate_size
    experts = n_moe * cfg.num_experts * 3 * h * moe_width
    replicated = (
        (2 * cfg.num_layers + 1) * h
        + tp_partial
        + n_moe * (h * cfg.num_experts + 3 * h * moe_width * cfg.shared_expert)
    )
    per_rank_tp = tp_sharded // dims.tp
    per_rank_experts = experts // dims.ep
    return {
        "total": tp_sharded + experts + replicated,
        "per_rank": per_rank_tp + per_rank_experts + replicated,
        "per_rank_tp_sharded": per_rank_tp,
        "per_rank_experts": per_rank_experts,
        "per_rank_replicated": replicated,
        "per_rank_tp_partial": tp_partial if dims.tp > 1 else 0,
    }


def _all_reduce(numel: int, size: int, elem_bytes: int) -> int:
    """CommStats' all_reduce convention (ring reduce-scatter + all-gather)."""
    return 2 * (size - 1) * math.ceil(numel / size) * elem_bytes if size > 1 else 0


def _check(cfg, dims, seq_len, micro_batch, grad_accum, softmax, linear, layout, optimizer, dp_mode, u, zero) -> None:
    if micro_batch < 1 or grad_accum < 1:
        raise ValueError(f"micro_batch and grad_accum must be >= 1, got {micro_batch} and {grad_accum}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZER_STATES)}")
    if dp_mode not in DATA_PARALLEL:
        raise ValueError(f"unknown data-parallel mode {dp_mode!r}; choose one of {DATA_PARALLEL}")
    if dp_mode == "deepspeed":
        if zero not in (0, 1, 2, 3):
            raise ValueError(f"data_parallel='deepspeed' needs zero_stage 0, 1, 2 or 3, got {zero!r}")
        if dims.tp > 1:
            raise ValueError(f"data_parallel='deepspeed' needs tp=1, got tp={dims.tp}")
    elif zero is not None:
        warnings.warn(f"zero_stage={zero} has no effect with data_parallel={dp_mode!r}", stacklevel=3)
    if dp_mode != "reduce" and dims.ep > 1 and "M" in cfg.mlp_kinds():
        raise ValueError(
            f"data_parallel={dp_mode!r} does not handle expert-parallel weights (ep={dims.ep}); use 'reduce'"
        )
    if softmax not in SOFTMAX_STRATEGIES:
        raise ValueError(f"softmax layers take one of {SOFTMAX_STRATEGIES}, got {softmax!r}")
    if linear not in [*LINEAR_STRATEGIES, "ulysses"]:
        raise ValueError(f"linear layers take one of {[*LINEAR_STRATEGIES, 'ulysses']}, got {linear!r}")
    SequenceLayout(layout, seq_len, dims.sp, 0)  # kind and divisibility
    check_parallel_dims(cfg, dims)  # the checks parallelize_hybrid runs
    heads = cfg.num_heads // dims.tp
    if softmax == "usp":
        if u is None or u < 1 or dims.sp % u:
            raise ValueError(f"usp needs ulysses_degree dividing sp: ulysses_degree={u}, sp={dims.sp}")
    elif u is not None:
        warnings.warn(f"ulysses_degree={u} has no effect with softmax_strategy={softmax!r}", stacklevel=3)
    needs = []
    if "A" in cfg.layer_pattern and softmax in ("ulysses", "usp"):
        needs.append((softmax, dims.sp if softmax == "ulysses" else u, "sp" if softmax == "ulysses" else "ulysses"))
    if set("LMG") & set(cfg.layer_pattern) and linear == "ulysses":
        needs.append(("ulysses (linear)", dims.sp, "sp"))
    check_strategies(cfg, linear=linear)
    for name, degree, axis in needs:
        if heads % degree:
            raise ValueError(
                f"{name} needs heads per tp rank divisible by {axis}: num_heads={cfg.num_heads} / tp={dims.tp} = "
                f"{heads}, {axis}={degree}; use strategy='ring' or 'usp' (softmax) or 'lasp2' (linear)"
            )


def _layer_activation_bytes(cfg: ModelConfig, dims: ParallelDims, s: int) -> list[int]:
    """Bytes per token each block keeps for its backward (see plan_report)."""
    a = _acc_bytes(s)
    h, d, tp = cfg.hidden_size, cfg.head_dim, dims.tp
    heads, kv_heads = cfg.num_heads // tp, cfg.num_kv_heads // tp
    per_layer = []
    for layer, mlp in zip(cfg.layer_pattern, cfg.mlp_kinds(), strict=True):
        kept = 4 * h * s  # both norms: input and output
        if layer == "A":
            kept += (2 * heads + 2 * kv_heads) * d * s + heads * a  # q, k, v, attention output; lse
        else:
            kept += (4 + 3 * cfg.linear_output_gate) * heads * d * s + heads * a * cfg.linear_gate
        if mlp == "D":
            kept += 4 * (cfg.intermediate_size // tp) * s  # gate, up, silu(gate), product
        else:
            width = cfg.moe_intermediate_size
            kept += cfg.num_experts * a + cfg.top_k * (2 * h + 4 * width) * s + 4 * width * s * cfg.shared_expert
        per_layer.append(kept)
    return per_layer


def _activation_bytes(cfg: ModelConfig, dims: ParallelDims, tokens: int, s: int, checkpointing: bool) -> int:
    """Activations of one micro-batch of ``tokens`` local tokens at the start of its backward."""
    per_layer = _layer_activation_bytes(cfg, dims, s)
    if checkpointing:  # block inputs, plus one block recomputed at a time
        blocks = cfg.num_layers * cfg.hidden_size * s + max(per_layer)
    else:
        blocks = sum(per_layer)
    final_norm = 2 * cfg.hidden_size * s
    loss_chunk = min(cfg.loss_chunk_size, tokens) * (cfg.vocab_size // dims.tp) * (s + 2 * _acc_bytes(s))
    return tokens * (blocks + final_norm) + loss_chunk


def _tensor_parallel(cfg: ModelConfig, dims: ParallelDims, tokens: int, s: int, checkpointing: bool) -> dict:
    """TP all-reduces of one micro-batch, layer by layer (sent = received)."""
    tp, h, a = dims.tp, cfg.hidden_size, _acc_bytes(s)
    hidden = _all_reduce(tokens * h, tp, s)  # one all-reduce of a [tokens, hidden] activation or gradient
    n_softmax, n_linear = cfg.layer_pattern.count("A"), cfg.layer_pattern.count("L")
    n_mamba, n_deltanet = cfg.layer_pattern.count("M"), cfg.layer_pattern.count("G")
    n_dense = cfg.mlp_kinds().count("D")
    linear_columns = 3 + cfg.linear_gate + cfg.linear_output_gate
    # A checkpointed block repeats its forward in the backward, up to the last op that saves a tensor
    # (torch's non-reentrant checkpoint stops early): o_proj's all-reduce again, down_proj's (the block's
    # last op) not.
    recompute = int(checkpointing)
    chunks = [min(cfg.loss_chunk_size, tokens - i) for i in range(0, tokens, cfg.loss_chunk_size)]
    loss_fwd = sum(3 * _all_reduce(c, tp, a) for c in chunks)  # row max, target logit, exp-sum (fp32)
    items = {
        "embedding (vocab-parallel, forward)": (hidden, 0),
        "softmax attention (o_proj forward; q, k, v input grads backward)": (
            n_softmax * hidden,
            n_softmax * (3 + recompute) * hidden,
        ),
        "linear attention (o_proj forward; column inputs backward)": (
            n_linear * hidden,
            n_linear * (linear_columns + recompute) * hidden,
        ),
        # Mamba2's B and C are column layers whether split or whole (their input gradients are partial either way)
        "Mamba2 (o_proj forward; z, x, B, C, dt input grads backward)": (
            n_mamba * hidden,
            n_mamba * (5 + recompute) * hidden,
        ),
        "gated DeltaNet (o_proj forward; q, k, v, gate, beta, output gate input grads backward)": (
            n_deltanet * hidden,
            n_deltanet * (6 + recompute) * hidden,
        ),
        "dense MLP (down_proj forward; gate, up input grads backward)": (n_dense * hidden, n_dense * 2 * hidden),
        # The loss chunks are recomputed (checkpoint) in the backward, with their three all-reduces.
        "LM head + vocab-parallel loss": (loss_fwd, loss_fwd + sum(_all_reduce(c * h, tp, s) for c in chunks)),
    }
    return {
        "primitive": "all_reduce over tp",
        "items": {k: {"forward": f, "backward": b} for k, (f, b) in items.items()},
        "forward": sum(f for f, _ in items.values()),
        "backward": sum(b for _, b in items.values()),
    }


def _sequence_parallel(cfg, dims, *, seq_len, micro_batch, grad_accum, softmax, linear, layout, s, u, checkpointing):
    heads, kv_heads = cfg.num_heads // dims.tp, cfg.num_kv_heads // dims.tp
    d = cfg.head_dim
    # Mamba2 is linear attention with keys of the state size and a data-dependent gate (its A dt)
    bytes_of = {
        "softmax": partial(softmax_layer_bytes, heads=heads, kv_heads=kv_heads, head_dim=d, ulysses_degree=u),
        "linear": partial(linear_layer_bytes, heads=heads, key_dim=d, value_dim=d, gate=cfg.linear_gate),
        "mamba2": partial(linear_layer_bytes, heads=heads, key_dim=cfg.mamba_state_size, value_dim=d, gate=True),
        "gated deltanet": partial(delta_rule_layer_bytes, heads=heads, key_dim=d, value_dim=d),
    }
    out = []
    for kind, letter, strategy in (
        ("softmax", "A", softmax),
        ("linear", "L", linear),
        ("mamba2", "M", linear),
        ("gated deltanet", "G", linear),
    ):
        layers = cfg.layer_pattern.count(letter)
        if not layers:
            continue
        per_rank = []
        for rank in range(dims.sp):
            rank_layout = SequenceLayout(layout, seq_len, dims.sp, rank)
            one = bytes_of[kind](strategy, rank_layout, batch=micro_batch, elem_bytes=s)
            if checkpointing:  # the recomputed forward moves its bytes again during the backward
                one = one._replace(
                    bwd_sent=one.bwd_sent + one.fwd_sent, bwd_received=one.bwd_received + one.fwd_received
                )
            per_rank.append(one)
        worst = LayerBytes(*(max(field) for field in zip(*per_rank, strict=True)))
        out.append(
            {
                "kind": kind,
                "layers": layers,
                "strategy": strategy,
                "primitive": _DELTA_PRIMITIVES[strategy] if letter == "G" else _PRIMITIVES[strategy],
                "per_layer": worst._asdict(),  # per micro-batch, the most any sp rank moves
                "rank_dependent": len(set(per_rank)) > 1,
                "per_sp_rank": [b._asdict() for b in per_rank],
                "per_step_sent": layers * grad_accum * (worst.fwd_sent + worst.bwd_sent),
                "per_step_received": layers * grad_accum * (worst.fwd_received + worst.bwd_received),
            }
        )
    if dims.sp > 1:
        out += _short_conv(cfg, dims, seq_len, micro_batch, grad_accum, layout, s, checkpointing)
    return out


def _short_conv(cfg, dims, seq_len, micro_batch, grad_accum, layout, s, checkpointing) -> list[dict]:
    """The short convolutions' halo exchange: one tail of ``W-1`` tokens (``(W-1) B C s`` bytes) per boundary
    between this rank's chunk and another rank's: forward to the next chunk's owner, its gradient backward, so
    sp rank ``r`` sends ``b_next(r)`` tails and receives ``b_prev(r)`` forward (the backward the other way)."""
    head_dim, heads, kv_heads = cfg.head_dim, cfg.num_heads // dims.tp, cfg.num_kv_heads // dims.tp
    # Mamba2 convolves x and its B and C (every group's on each tp rank unless tp divides mamba_groups)
    groups = cfg.mamba_groups // dims.tp if cfg.mamba_groups % dims.tp == 0 else cfg.mamba_groups
    out = []
    for kind, letter, channels, width in (
        ("short conv (softmax)", "A", (heads + 2 * kv_heads) * head_dim, cfg.short_conv_size * cfg.short_conv_softmax),
        ("short conv (linear)", "L", 3 * heads * head_dim, cfg.short_conv_size),
        ("short conv (mamba2)", "M", heads * head_dim + 2 * groups * cfg.mamba_state_size, cfg.mamba_conv_size),
        ("short conv (gated deltanet)", "G", 3 * heads * head_dim, cfg.short_conv_size),
    ):
        layers = cfg.layer_pattern.count(letter) if width > 1 else 0  # width 1 needs no halo
        if not layers:
            continue
        tail = (width - 1) * micro_batch * channels * s
        again = 2 if checkpointing else 1  # a recomputed forward exchanges its halos again
        ranks = []
        for rank in range(dims.sp):
            chain = _chain_bytes(SequenceLayout(layout, seq_len, dims.sp, rank), tail)
            ranks.append(
                LayerBytes(chain.fwd_sent * again, chain.fwd_received * again, chain.bwd_sent, chain.bwd_received)
            )
        worst = LayerBytes(*(max(field) for field in zip(*ranks, strict=True)))
        out.append(
            {
                "kind": kind,
                "layers": layers,
                "strategy": "halo",
                "primitive": "send_recv (each chunk's tail to the next chunk's owner)",
                "per_layer": worst._asdict(),  # per micro-batch, the most any sp rank moves
                "rank_dependent": len(set(ranks)) > 1,
                "per_sp_rank": [r._asdict() for r in ranks],
                "per_step_sent": layers * grad_accum * (worst.fwd_sent + worst.bwd_sent),
                "per_step_received": layers * grad_accum * (worst.fwd_received + worst.bwd_received),
            }
        )
    return out


def _expert_parallel(cfg: ModelConfig, dims: ParallelDims, tokens: int, s: int, grad_accum: int, checkpointing: bool):
    n_moe = cfg.mlp_kinds().count("M")
    ep, experts = dims.ep, cfg.num_experts
    remote_rows = tokens * cfg.top_k * (ep - 1) / ep  # assignments leaving this rank, uniform routing
    rows = round(remote_rows * cfg.hidden_size * s)
    forward = (ep - 1) * (experts // ep) * 8 + 2 * rows if ep > 1 else 0  # int64 counts, rows there and back
    backward = 2 * rows + forward * checkpointing
    return {
        "primitive": "all_to_all (int64 counts) + all_to_all_v (token rows there and back)",
        "expected": "dropless, uniform routing: (ep-1)/ep of the B n top_k assignments leave the rank",
        "moe_layers": n_moe,
        "forward_per_layer": forward,
        "backward_per_layer": backward,
        "per_step": n_moe * grad_accum * (forward + backward),
    }


def _zero_stage(data_parallel: str, zero_stage: int | None) -> int:
    """What the engine shards over dp x sp, as a ZeRO stage: 1 optimizer state, 2 also gradients, 3 also
    parameters (FSDP2 shards all three)."""
    if data_parallel == "deepspeed":
        return zero_stage
    return 3 if data_parallel == "fsdp" else 0


def _deepspeed_gradients(dims: ParallelDims, weights: int, p_bytes: int, stage: int, grad_accum: int) -> dict:
    """DeepSpeed's collectives over dp x sp: stages 0 and 1 reduce on the step's last micro-batch, 2 and 3 on every
    micro-batch; 1 and 2 all-gather the updated parameters after the step, 3 gathers them in forward and backward."""
    shard = (dims.dp_sp - 1) * math.ceil(weights / dims.dp_sp) * p_bytes
    if stage == 0:
        items = {"all_reduce of the gradients over dp_sp (last micro-batch)": _all_reduce(weights, dims.dp_sp, p_bytes)}
    elif stage == 1:
        items = {
            "reduce_scatter of the gradients over dp_sp (last micro-batch)": shard,
            "all_gather of the updated parameters over dp_sp": shard,
        }
    elif stage == 2:
        items = {
            "reduce_scatter of the gradients over dp_sp (every micro-batch)": grad_accum * shard,
            "all_gather of the updated parameters over dp_sp": shard,
        }
    else:
        items = {
            "all_gather of the parameters over dp_sp (forward and backward, every micro-batch)": 2 * grad_accum * shard,
            "reduce_scatter of the gradients over dp_sp (every micro-batch)": grad_accum * shard,
        }
    return {
        "primitive": f"deepspeed ZeRO-{stage}: gradients summed over dp_sp (as a mean of F x the loss)",
        "convention": "(P-1) ceil(W/P) s per gather or scatter, 2 (P-1) ceil(W/P) s per all-reduce, ignoring "
        "DeepSpeed's buckets and padding (approximate)",
        "items": items,
        "per_step": sum(items.values()),
    }


def _gradients(cfg, params: dict[str, int], dims: ParallelDims, p_bytes: int, mode: str, grad_accum: int) -> dict:
    expert = params["per_rank_experts"] if dims.ep > 1 else 0  # ep == 1: experts reduce with everything else
    dense = params["per_rank"] - expert
    partial = params["per_rank_tp_partial"]
    if mode == "reduce":  # reduce_gradients: one flat buffer per group
        tp_partial = _all_reduce(partial, dims.tp, p_bytes)
    else:  # the trainer's per-parameter sum of the per-head norms
        norms = partial // cfg.head_dim if dims.tp > 1 else 0
        tp_partial = norms * _all_reduce(cfg.head_dim, dims.tp, p_bytes)
    if mode == "fsdp":
        # The whole model is one FSDP2 unit: its root keeps the parameters gathered from forward to backward,
        # so one all-gather per micro-batch; gradients reduce-scatter once, on the last micro-batch.
        shard = (dims.dp_sp - 1) * math.ceil(dense / dims.dp_sp) * p_bytes
        items = {
            "all_gather of the parameters over dp_sp (every micro-batch)": grad_accum * shard,
            "reduce_scatter of the gradients over dp_sp (last micro-batch)": shard,
            "tp-partial norms over tp": tp_partial,
        }
        convention = "(P-1) ceil(W/P) s each, ignoring FSDP's padding (approximate)"
    else:
        items = {
            "tp-partial norms over tp": tp_partial,
            "replicated and tp-sharded weights over dp_sp": _all_reduce(dense, dims.dp_sp, p_bytes),
            "expert weights over edp": _all_reduce(expert, dims.edp, p_bytes),
        }
        convention = "ring all-reduce 2 (P-1) ceil(e/P) s per rank, as CommStats counts all_reduce"
        if mode == "ddp":
            convention += "; DDP rounds per bucket"
    return {
        "primitive": f"{mode}: gradients summed once per step (no reduction between micro-batches)",
        "convention": convention,
        "items": items,
        "per_step": sum(items.values()),
    }


def _step_totals(dims: ParallelDims, data_parallel: str) -> dict[str, int]:
    """The trainer's small all-reduces of every step: the labelled-token count (int64) and the loss shares (lm
    and balance loss, fp32) over dp x sp; and, unless DeepSpeed computes it, the gradient norm's fp64 sums of
    squares (two over tp, two over ep; the four kinds over dp x sp first under FSDP)."""
    items = {
        "step totals over dp_sp (labelled tokens, losses)": _all_reduce(1, dims.dp_sp, 8)
        + _all_reduce(2, dims.dp_sp, 4)
    }
    if data_parallel != "deepspeed":
        fsdp = _all_reduce(4, dims.dp_sp, 8) if data_parallel == "fsdp" else 0
        items["gradient norm sums over tp, ep (and dp_sp under fsdp)"] = (
            fsdp + _all_reduce(2, dims.tp, 8) + _all_reduce(2, dims.ep, 8)
        )
    return items


def plan_report(
    cfg: ModelConfig,
    dims: ParallelDims,
    *,
    seq_len: int,
    micro_batch: int,
    grad_accum: int,
    softmax_strategy: str,
    linear_strategy: str,
    layout: str,
    dtype_bytes: int = 4,
    optimizer: str = "adamw",
    data_parallel: str = "reduce",
    ulysses_degree: int | None = None,
    param_bytes: int | None = None,
    activation_checkpointing: bool = False,
    zero_stage: int | None = None,
) -> dict[str, Any]:
    """Everything one training step of ``cfg`` on ``dims`` costs per rank, without running it.

    A step is ``grad_accum`` micro-batches of ``micro_batch`` sequences of ``seq_len`` tokens on each of the
    ``dp`` replicas; each rank holds ``n = seq_len / sp`` tokens of each sequence. ``dtype_bytes`` (``s``) is
    the element size of activations and of what the layers communicate; ``param_bytes`` (``p``, default ``s``)
    that of parameters and gradients: 4 for bf16 autocast over fp32 weights (``dtype_bytes=2``). With
    autocast some activations stay fp32 (the residual stream, so the expert-parallel rows and the TP input
    gradients); the plan counts them in ``s``. ``data_parallel``: ``reduce`` (``reduce_gradients``), ``ddp``,
    ``fsdp`` (the whole model one FSDP2 unit, as the trainer wraps it) or ``deepspeed`` (ZeRO ``zero_stage``).

    Memory per rank (bytes; ``W`` = parameters per rank after tp/ep sharding; ``F`` = dp * sp where the engine
    shards that part, else 1: fsdp shards all, deepspeed optimizer state and master weights from stage 1,
    gradients from stage 2, parameters at stage 3; optimizer offloading is not modelled):
    ``W p / F`` (params) + ``W p / F`` (grads) + ``k W o / F`` (optimizer: ``k`` states of ``o = max(p, 4)``
    bytes) + ``4 W / F`` (fp32 master weights when ``p < 4``) + with fsdp ``2 W p (1 - 1/F)`` (the unit's
    parameters and gradients whole during the step) + the activations of one micro-batch: ``B n`` tokens
    times, per layer, both norms' input and output ``4 h s``; softmax ``(2 H + 2 Hkv) D s + H a`` (q, k, v,
    attention output; lse); linear ``(4 + 3 [out gate]) H D s + H a [gate]`` (q, k, v, output, normed, gate,
    gated); dense MLP ``4 I s``; MoE ``E a + k (2 h + 4 Im) s + 4 Im s [shared]``; then the final norm
    ``2 h s``, plus one loss chunk of logits ``C V (s + 2 a)`` (H, Hkv, I, V per tp rank; ``a`` = 4, or 8 for
    fp64). With ``activation_checkpointing`` the blocks keep only their inputs ``L h s`` per token plus one
    block at a time (the largest). Not counted: kernel scratch (attention score blocks, chunk scores, fp32
    accumulators), strategies' transient buffers (gathered K/V), allocator overhead.
    """
    _check(
        cfg,
        dims,
        seq_len,
        micro_batch,
        grad_accum,
        softmax_strategy,
        linear_strategy,
        layout,
        optimizer,
        data_parallel,
        ulysses_degree,
        zero_stage,
    )
    for name, value in (("dtype_bytes", dtype_bytes), ("param_bytes", param_bytes)):
        if value is not None and value not in (2, 4, 8):
            raise ValueError(f"{name} must be 2 (bf16/fp16), 4 (fp32) or 8 (fp64), got {value}")
    s = dtype_bytes
    p_bytes = param_bytes if param_bytes is not None else dtype_bytes
    n = seq_len // dims.sp
    tokens = micro_batch * n  # local tokens of one micro-batch
    sequences = dims.dp * micro_batch * grad_accum
    params = parameter_counts(cfg, dims)
    flops = model_flops_per_sequence(cfg, seq_len)

    weights = params["per_rank"]
    stage = _zero_stage(data_parallel, zero_stage)
    state_shards, grad_shards, param_shards = (dims.dp_sp if stage >= s else 1 for s in (1, 2, 3))
    memory = {
        "params": math.ceil(weights * p_bytes / param_shards),
        "grads": math.ceil(weights * p_bytes / grad_shards),
        "optimizer": math.ceil(OPTIMIZER_STATES[optimizer] * weights * max(p_bytes, 4) / state_shards),
        "master_weights": math.ceil(4 * weights / state_shards) if p_bytes < 4 else 0,
        "fsdp_unsharded": (
            2 * (weights * p_bytes - math.ceil(weights * p_bytes / dims.dp_sp)) if data_parallel == "fsdp" else 0
        ),
        "activations": _activation_bytes(cfg, dims, tokens, s, activation_checkpointing),
    }
    memory["total"] = sum(memory.values())

    sequence_parallel = _sequence_parallel(
        cfg,
        dims,
        seq_len=seq_len,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        softmax=softmax_strategy,
        linear=linear_strategy,
        layout=layout,
        s=s,
        u=ulysses_degree,
        checkpointing=activation_checkpointing,
    )
    tensor_parallel = _tensor_parallel(cfg, dims, tokens, s, activation_checkpointing)
    tensor_parallel["per_step"] = grad_accum * (tensor_parallel["forward"] + tensor_parallel["backward"])
    expert_parallel = _expert_parallel(cfg, dims, tokens, s, grad_accum, activation_checkpointing)
    moe_stats = {
        "primitive": "all_reduce over sp (per sequence: E expert counts + token count, int64, forward)",
        "per_layer": _all_reduce(micro_batch * (cfg.num_experts + 1), dims.sp, 8) * (1 + activation_checkpointing),
    }
    moe_stats["per_step"] = cfg.mlp_kinds().count("M") * grad_accum * moe_stats["per_layer"]
    if data_parallel == "deepspeed":
        gradients = _deepspeed_gradients(dims, weights, p_bytes, stage, grad_accum)
    else:
        gradients = _gradients(cfg, params, dims, p_bytes, data_parallel, grad_accum)
    gradients["items"] |= _step_totals(dims, data_parallel)
    gradients["per_step"] = sum(gradients["items"].values())
    totals = [
        sum(layer["per_step_sent"] for layer in sequence_parallel),
        tensor_parallel["per_step"],
        expert_parallel["per_step"],
        moe_stats["per_step"],
        gradients["per_step"],
    ]
    return {
        "inputs": {
            "seq_len": seq_len,
            "micro_batch": micro_batch,
            "grad_accum": grad_accum,
            "softmax_strategy": softmax_strategy,
            "linear_strategy": linear_strategy,
            "layout": layout,
            "dtype_bytes": dtype_bytes,
            "param_bytes": p_bytes,
            "optimizer": optimizer,
            "data_parallel": data_parallel,
            "zero_stage": zero_stage,
            "ulysses_degree": ulysses_degree,
            "activation_checkpointing": activation_checkpointing,
        },
        "layout": {
            "world_size": dims.world_size,
            **{axis.value: dims.degree(axis) for axis in MeshAxis},
            "groups": {axis.value: dims.axis_groups(axis) for axis in MeshAxis},
        },
        "tokens": {
            "local_per_sequence": n,
            "local_per_micro_batch": tokens,
            "global_per_step": sequences * seq_len,
            "sequences_per_step": sequences,
        },
        "params": params,
        "flops": {
            "per_sequence": flops,
            "train_per_step_per_rank": flops["total_train"] * sequences // dims.world_size,
        },
        "memory": memory,
        "communication": {
            "sequence_parallel": sequence_parallel,
            "tensor_parallel": tensor_parallel,
            "expert_parallel": expert_parallel,
            "moe_stats": moe_stats,
            "gradients": gradients,
            "total_per_step_sent": sum(totals),
        },
    }


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def format_plan(report: dict[str, Any]) -> str:
    """The report of :func:`plan_report` as text, one line per item (``distseq train --dry-run``)."""
    inputs, lay, params, mem = report["inputs"], report["layout"], report["params"], report["memory"]
    comm, flops, tokens = report["communication"], report["flops"], report["tokens"]
    lines = [
        f"layout: world_size={lay['world_size']} dp={lay['dp']} sp={lay['sp']} tp={lay['tp']} ep={lay['ep']} "
        f"edp={lay['edp']} ({inputs['layout']} sequence layout)",
        *(f"  {axis} groups: {groups}" for axis, groups in lay["groups"].items()),
        f"tokens: {tokens['local_per_sequence']:,} per rank per sequence, {tokens['global_per_step']:,} per step "
        f"({tokens['sequences_per_step']} sequences of {inputs['seq_len']:,}; micro_batch={inputs['micro_batch']}, "
        f"grad_accum={inputs['grad_accum']})",
        f"parameters: {params['total']:,} total, {params['per_rank']:,} per rank "
        f"({params['per_rank_tp_sharded']:,} tp-sharded, {params['per_rank_experts']:,} experts, "
        f"{params['per_rank_replicated']:,} replicated)",
        f"flops: {flops['per_sequence']['total_forward']:.4g} forward per sequence, "
        f"{flops['train_per_step_per_rank']:.4g} train per step per rank",
        f"memory per rank (estimate; {inputs['dtype_bytes']}-byte activations, {inputs['param_bytes']}-byte "
        f"params, {inputs['optimizer']}, {inputs['data_parallel']}"
        f"{' ZeRO-' + str(inputs['zero_stage']) if inputs['data_parallel'] == 'deepspeed' else ''}"
        f"{', activation checkpointing' if inputs['activation_checkpointing'] else ''}): "
        f"params {_size(mem['params'])}, grads {_size(mem['grads'])}, optimizer {_size(mem['optimizer'])}, "
        f"master {_size(mem['master_weights'])}, fsdp unsharded {_size(mem['fsdp_unsharded'])}, "
        f"activations {_size(mem['activations'])}, total {_size(mem['total'])}",
        "communication per rank (sent; received is the same unless noted):",
    ]
    for layer in comm["sequence_parallel"]:
        per = layer["per_layer"]
        note = ", max over sp ranks" if layer["rank_dependent"] else ""
        lines.append(
            f"  {layer['kind']} x{layer['layers']}: {layer['strategy']} [{layer['primitive']}] per layer per "
            f"micro-batch forward {per['fwd_sent']:,} B, backward {per['bwd_sent']:,} B{note}; "
            f"per step {_size(layer['per_step_sent'])}"
        )
    tp, ep, stats, grads = comm["tensor_parallel"], comm["expert_parallel"], comm["moe_stats"], comm["gradients"]
    lines += [
        f"  tensor parallel [{tp['primitive']}]: per micro-batch forward {tp['forward']:,} B, backward "
        f"{tp['backward']:,} B; per step {_size(tp['per_step'])}",
        f"  expert parallel [{ep['primitive']}], expected ({ep['expected']}): per MoE layer per micro-batch "
        f"forward {ep['forward_per_layer']:,} B, backward {ep['backward_per_layer']:,} B; "
        f"per step {_size(ep['per_step'])}",
        f"  MoE load-balancing stats [{stats['primitive']}]: per step {_size(stats['per_step'])}",
        f"  gradients [{grads['primitive']}; {grads['convention']}]: per step {_size(grads['per_step'])}",
        f"  total per step: {_size(comm['total_per_step_sent'])}",
    ]
    return "\n".join(lines)
