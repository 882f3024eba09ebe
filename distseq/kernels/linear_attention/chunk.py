"""Chunked causal linear attention in PyTorch: the fast path that runs everywhere.

The sequence is cut into chunks of ``C`` tokens. With ``G`` the within-chunk inclusive cumulative log-gate
and ``seg`` the within-chunk count of resets so far, for tokens ``s <= t`` of one chunk:

* intra-chunk: ``o_t += sum_s exp(G_t - G_s) (q_t . k_s) v_s`` where no reset lies in ``(s, t]``;
* inter-chunk: ``o_t += exp(G_t) q_t^T S`` where no reset lies in ``[0, t]`` (``S``: state before the chunk);
* state: ``S <- exp(G_last) S + sum_s exp(G_last - G_s) k_s v_s^T`` (each term only across no reset).

Only differences of cumulative gates are exponentiated, so strong decay never overflows, and masked
terms become ``exp(-inf) = 0`` before any product, so ``-inf`` gates (resets) are exact in forward and
backward. The chunks' intra terms are batched; the state is carried through a short loop over chunks.
Gradients come from autograd and match the naive recurrence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distseq.kernels.linear_attention._gates import accumulation_dtype, check_inputs, resolve_gates

__all__ = ["chunk_linear_attention", "linear_attention_state"]


def _to_chunks(x: torch.Tensor, chunk: int, pad: int) -> torch.Tensor:
    """``[B, T, H, ...]`` -> ``[B, H, NC, C, ...]``, zero-padding T at the end."""
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    batch, padded, heads = x.shape[:3]
    x = x.reshape(batch, padded // chunk, chunk, heads, *x.shape[3:])
    return x.movedim(3, 1)


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
    dtype = accumulation_dtype(q.dtype)
    g, reset = resolve_gates(q, decay, gate, cu, dtype)
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[3]
    chunk = min(chunk_size, max(seq_len, 1))
    num_chunks = max(1, math.ceil(seq_len / chunk))
    pad = num_chunks * chunk - seq_len

    # Padding tokens have k = v = 0 and g = 0: they leave every state and output unchanged.
    qc, kc, vc = (_to_chunks(x.to(dtype), chunk, pad) for x in (q, k, v))  # [B, H, NC, C, K|V]
    gc = _to_chunks(g, chunk, pad)  # [B, H, NC, C]
    seg = _to_chunks(reset.to(torch.int32), chunk, pad).cumsum(-1)  # resets in [0, t] of the chunk
    cum = gc.cumsum(-1)  # G_t, inclusive

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    connected = causal & (seg[..., :, None] == seg[..., None, :])  # [.., t, s]: no reset in (s, t]
    decay_ts = torch.exp(torch.where(connected, cum[..., :, None] - cum[..., None, :], float("-inf")))
    out = (qc @ kc.transpose(-1, -2) * decay_ts) @ vc  # [B, H, NC, C, V]

    last_cum, last_seg = cum[..., -1:], seg[..., -1:]
    to_end = torch.exp(torch.where(seg == last_seg, last_cum - cum, float("-inf")))  # [B, H, NC, C]
    chunk_states = (kc * to_end[..., None]).transpose(-1, -2) @ vc  # [B, H, NC, K, V]
    carry = torch.where(last_seg[..., 0] == 0, torch.exp(last_cum[..., 0]), 0.0)  # [B, H, NC]

    state = q.new_zeros(batch, heads, key_dim, value_dim, dtype=dtype)
    if initial_state is not None:
        state = initial_state.to(dtype)
    incoming = []
    # unbind, not indexing: the backward of x[:, :, c] would write a full-size zero tensor per chunk.
    for carry_c, chunk_state in zip(carry.unbind(2), chunk_states.unbind(2), strict=True):
        incoming.append(state)
        state = carry_c[..., None, None] * state + chunk_state
    incoming = torch.stack(incoming, dim=2)  # [B, H, NC, K, V], the state before each chunk

    from_start = torch.where(seg == 0, torch.exp(cum), 0.0)  # [B, H, NC, C]
    out = out + (qc * from_start[..., None]) @ incoming
    out = out.movedim(1, 3).reshape(batch, num_chunks * chunk, heads, value_dim)[:, :seq_len]
    return out.to(q.dtype), (state if output_final_state else None)


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
    ``exp(log_carry) * S_before + state``. Used by LASP-2 for each chunk of the sequence.

    Args:
        k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; decay, gate, cu_seqlens: as in :func:`chunk_linear_attention`.

    Returns:
        ``state`` ``[B, H, K, V]`` and ``log_carry`` ``[B, H]``, fp32 (fp64 for fp64 inputs).
    """
    check_inputs(k, k, v, decay, gate, None, cu_seqlens)
    dtype = accumulation_dtype(k.dtype)
    cu = None if cu_seqlens is None else torch.as_tensor(cu_seqlens).to(torch.int64).cpu()
    g, reset = resolve_gates(k, decay, gate, cu, dtype)  # [B, T, H]
    # Suffix sums computed from the end keep the exponents of the surviving (recent) tokens accurate.
    after = g.flip(1).cumsum(1).flip(1) - g  # g(s, T-1]
    resets_after = reset.flip(1).to(torch.int32).cumsum(1).flip(1) - reset.to(torch.int32)
    weight = torch.exp(torch.where(resets_after == 0, after, float("-inf")))  # [B, T, H]
    state = torch.einsum("bthk,bthv->bhkv", k.to(dtype) * weight[..., None], v.to(dtype))
    log_carry = torch.where(reset.any(1), float("-inf"), g.sum(1))  # [B, H]
    return state, log_carry
