"""Chunked causal linear attention in PyTorch: the fast path that runs everywhere.

The sequence is cut into chunks of ``C`` tokens. With ``G`` the within-chunk inclusive cumulative log-gate
and ``seg`` the within-chunk count of resets so far, for tokens ``s <= t`` of one chunk:

* intra-chunk: ``o_t += sum_s exp(G_t - G_s) (q_t . k_s) v_s`` where no reset lies in ``(s, t]``;
* inter-chunk: ``o_t += exp(G_t) q_t^T S`` where no reset lies in ``[0, t]`` (``S``: state before the chunk);
* state: ``S <- exp(G_last) S + sum_s exp(G_last - G_s) k_s v_s^T`` (each term only across no reset).

Only differences of cumulative gates are exponentiated, so strong decay never overflows, and masked
terms become ``exp(-inf) = 0`` before any product, so ``-inf`` gates (resets) are exact in forward and
backward. The chunks' own states and intra terms are batched; the states are carried through a short loop
over chunks. Gradients come from autograd and match the naive recurrence.

The pieces (:func:`prefix_states`, :func:`intra_outputs`, :func:`state_outputs`, :func:`block_state`) take
resolved gates (finite log-gate ``g``, 0 at resets, and the bool ``reset`` mask, both ``[B, T, H]``) in the
accumulation dtype and check nothing, so they read no device value: the sequence-parallel strategies build
on them (the state of a block comes out of the same pass that gives its outputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distseq.kernels.linear_attention._gates import accumulation_dtype, check_inputs, resolve_gates

__all__ = [
    "block_state",
    "chunk_linear_attention",
    "intra_outputs",
    "linear_attention_state",
    "prefix_states",
    "state_outputs",
]


def _to_chunks(x: torch.Tensor, chunk: int, pad: int) -> torch.Tensor:
    """``[B, T, H, ...]`` -> ``[B, H, NC, C, ...]``, zero-padding T at the end."""
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    batch, padded, heads = x.shape[:3]
    x = x.reshape(batch, padded // chunk, chunk, heads, *x.shape[3:])
    return x.movedim(3, 1)


def _chunking(seq_len: int, chunk_size: int) -> tuple[int, int]:
    """Tokens per chunk and the padding at the end (an empty sequence is one chunk of padding)."""
    chunk = min(chunk_size, max(seq_len, 1))
    return chunk, max(1, math.ceil(seq_len / chunk)) * chunk - seq_len


def _chunk_gates(g: torch.Tensor, reset: torch.Tensor, chunk: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``G`` (inclusive cumulative log-gate) and ``seg`` (resets in ``[0, t]``), both ``[B, H, NC, C]``.

    Padding tokens have ``g = 0`` (and ``k = v = 0``): they leave every state and output unchanged."""
    return _to_chunks(g, chunk, pad).cumsum(-1), _to_chunks(reset.to(torch.int32), chunk, pad).cumsum(-1)


def prefix_states(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    reset: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state pass: every chunk's own state once, then the scan over chunks.

    k: ``[B, T, H, K]``, v: ``[B, T, H, V]``, g, reset: ``[B, T, H]``, initial_state ``[B, H, K, V]``.
    Returns the state before each chunk ``[B, H, NC, K, V]``, the state after the last ``[B, H, K, V]`` and the
    block's log-decay ``sum_t g_t`` ``[B, H]`` (``-inf`` when the block holds a reset).
    """
    batch, seq_len, heads, key_dim = k.shape
    chunk, pad = _chunking(seq_len, chunk_size)
    kc, vc = (_to_chunks(x.to(g.dtype), chunk, pad) for x in (k, v))  # [B, H, NC, C, K|V]
    cum, seg = _chunk_gates(g, reset, chunk, pad)
    last_cum, last_seg = cum[..., -1:], seg[..., -1:]
    to_end = torch.exp(torch.where(seg == last_seg, last_cum - cum, float("-inf")))  # [B, H, NC, C]
    chunk_states = (kc * to_end[..., None]).transpose(-1, -2) @ vc  # [B, H, NC, K, V]
    carry = torch.where(last_seg[..., 0] == 0, torch.exp(last_cum[..., 0]), 0.0)  # [B, H, NC]

    state = k.new_zeros(batch, heads, key_dim, v.shape[3], dtype=g.dtype)
    if initial_state is not None:
        state = initial_state.to(g.dtype)
    incoming = []
    # unbind, not indexing: the backward of x[:, :, c] would write a full-size zero tensor per chunk.
    for carry_c, chunk_state in zip(carry.unbind(2), chunk_states.unbind(2), strict=True):
        incoming.append(state)
        state = carry_c[..., None, None] * state + chunk_state
    log_decay = torch.where(reset.any(1), float("-inf"), g.sum(1))
    return torch.stack(incoming, dim=2), state, log_decay


def intra_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    reset: torch.Tensor,
    incoming: torch.Tensor,
    *,
    chunk_size: int,
) -> torch.Tensor:
    """``o`` ``[B, T, H, V]`` (accumulation dtype) from the states before each chunk (:func:`prefix_states`):
    the causal attention within each chunk plus ``exp(G_t) q_t^T S_c``."""
    batch, seq_len, heads, _ = q.shape
    chunk, pad = _chunking(seq_len, chunk_size)
    qc, kc, vc = (_to_chunks(x.to(g.dtype), chunk, pad) for x in (q, k, v))  # [B, H, NC, C, K|V]
    cum, seg = _chunk_gates(g, reset, chunk, pad)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    connected = causal & (seg[..., :, None] == seg[..., None, :])  # [.., t, s]: no reset in (s, t]
    decay_ts = torch.exp(torch.where(connected, cum[..., :, None] - cum[..., None, :], float("-inf")))
    out = (qc @ kc.transpose(-1, -2) * decay_ts) @ vc  # [B, H, NC, C, V]
    from_start = torch.where(seg == 0, torch.exp(cum), 0.0)  # [B, H, NC, C]
    out = out + (qc * from_start[..., None]) @ incoming
    return out.movedim(1, 3).reshape(batch, seq_len + pad, heads, v.shape[3])[:, :seq_len]


def state_outputs(q: torch.Tensor, g: torch.Tensor, reset: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """What a state ``[B, H, K, V]`` entering the block adds to its outputs: ``exp(G_t) q_t^T S`` ``[B, T, H, V]``,
    with ``G_t = sum_{u <= t} g_u``, and 0 from the block's first reset on."""
    weight = torch.where(reset.to(torch.int32).cumsum(1) == 0, torch.exp(g.cumsum(1)), 0.0)  # [B, T, H]
    return torch.einsum("bthk,bhkv->bthv", q.to(g.dtype) * weight[..., None], state)


def block_state(
    k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, reset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state ``[B, H, K, V]`` a block adds and its log-decay ``[B, H]``, in one product (no chunking)."""
    # Suffix sums computed from the end keep the exponents of the surviving (recent) tokens accurate.
    after = g.flip(1).cumsum(1).flip(1) - g  # g(s, T-1]
    resets_after = reset.flip(1).to(torch.int32).cumsum(1).flip(1) - reset.to(torch.int32)
    weight = torch.exp(torch.where(resets_after == 0, after, float("-inf")))  # [B, T, H]
    state = torch.einsum("bthk,bthv->bhkv", k.to(g.dtype) * weight[..., None], v.to(g.dtype))
    return state, torch.where(reset.any(1), float("-inf"), g.sum(1))


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention computed chunk by chunk; same arguments and results as
    :func:`~distseq.kernels.linear_attention.naive.naive_recurrent_linear_attention`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        decay: ``[H]`` log decay (<= 0); gate: ``[B, T, H]`` log gate (<= 0, ``-inf`` resets the state).
        initial_state: ``[B, H, K, V]``; output_final_state: also return the state after the last token.
        cu_seqlens: ``[0, ..., T]`` document offsets along T; the state resets at every offset but 0.
        chunk_size: tokens per chunk ``C``; need not divide T.

    Returns:
        ``o`` ``[B, T, H, V]`` in q's dtype, and the final state ``[B, H, K, V]`` (fp32; fp64 for fp64) or None.
    """
    cu = check_inputs(q, k, v, decay, gate, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    g, reset = resolve_gates(q, decay, gate, cu, accumulation_dtype(q.dtype))
    incoming, final, _ = prefix_states(k, v, g, reset, chunk_size=chunk_size, initial_state=initial_state)
    out = intra_outputs(q, k, v, g, reset, incoming, chunk_size=chunk_size)
    return out.to(q.dtype), (final if output_final_state else None)


def linear_attention_state(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state a block of tokens adds, and the log-decay it applies to the state before it.

    ``state = sum_s exp(g(s, T-1]) k_s v_s^T`` (terms across a reset dropped) and ``log_carry = sum_t g_t``
    (``-inf`` when the block contains a reset), so that the state after the block is
    ``exp(log_carry) * S_before + state``. LASP-2 relies on this identity for each chunk of the sequence.

    Args:
        k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; decay, gate, cu_seqlens: as in :func:`chunk_linear_attention`.

    Returns:
        ``state`` ``[B, H, K, V]`` and ``log_carry`` ``[B, H]``, fp32 (fp64 for fp64 inputs).
    """
    cu = check_inputs(k, k, v, decay, gate, None, cu_seqlens)
    g, reset = resolve_gates(k, decay, gate, cu, accumulation_dtype(k.dtype))  # [B, T, H]
    return block_state(k, v, g, reset)
