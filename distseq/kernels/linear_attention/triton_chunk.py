"""Chunked causal linear attention in Triton: the same math and results as ``chunk.py``, forward and backward.

Per ``(batch, head)`` the sequence is cut into chunks of ``C`` tokens. With ``G`` the within-chunk inclusive
cumulative log-gate and ``seg`` the within-chunk count of resets so far (both rebuilt inside every kernel):

* ``_chunk_state_kernel``: the chunk's own state ``M_c = sum_s exp(G_last - G_s) k_s v_s^T`` (only for ``s``
  with no reset after it in the chunk) and the carry ``exp(G_last)`` (0 when the chunk holds a reset);
* ``_state_scan_kernel``: ``S_{c+1} = carry_c S_c + M_c`` chunk after chunk, overwriting ``M_c`` with the
  incoming state ``S_c``; run in reverse it carries the state gradient ``dS_c = carry_c dS_{c+1} + dQ_c``;
* ``_chunk_output_kernel``: ``o = ((q k^T) * D) v + exp(G) q S_c`` with ``D[t, s] = exp(G_t - G_s)`` where no
  reset lies in ``(s, t]``;
* ``_chunk_backward_kernel``: ``dq, dk, dv`` and the gradient of the per-token log-gate ``g`` of one chunk,
  from the saved incoming state ``S_c`` and the gradient ``dS_{c+1}`` of the state after the chunk.

Masked terms are ``exp(-inf) = 0`` before any product, so resets never produce ``inf - inf`` or ``0 * inf``.
Every product accumulates in fp32 (fp64 for fp64 inputs) with exact fp32 dots (no tf32). The autograd Function
takes the finite log-gate and reset mask from ``resolve_gates``; torch autograd routes ``dg`` back to ``decay``
and ``gate``. Each program holds a whole chunk and the whole key and value dims (padded to powers of two >= 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distseq.kernels.linear_attention._gates import accumulation_dtype, check_inputs, resolve_gates
from distseq.kernels.linear_attention.chunk import chunk_linear_attention

__all__ = ["triton_chunk_linear_attention"]


@triton.jit
def _dot(a, b):
    # Exact fp32 products (tf32 would cost ~1e-3 relative error against the PyTorch paths).
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _chunk_gates(g_ptr, reset_ptr, row, valid):
    """Within-chunk cumulative log-gate ``G``, reset count ``seg`` and their last values, for rows ``[BC]``."""
    g = tl.load(g_ptr + row, mask=valid, other=0.0)
    reset = tl.load(reset_ptr + row, mask=valid, other=0)
    # Padding rows have g = 0 and no reset, so the chunk sums equal G and seg at the last real token.
    return tl.cumsum(g, 0), tl.cumsum(reset, 0), tl.sum(g, 0), tl.sum(reset, 0)


@triton.jit
def _chunk_state_kernel(
    x_ptr,
    y_ptr,
    g_ptr,
    reset_ptr,
    out_ptr,
    carry_ptr,
    T,
    H: tl.constexpr,
    DX: tl.constexpr,
    DY: tl.constexpr,
    CHUNK: tl.constexpr,
    BC: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    FROM_START: tl.constexpr,
    WRITE_CARRY: tl.constexpr,
):
    """``out[c] = (x * weight)^T y`` over one chunk, ``[DX, DY]``.

    ``weight_s = exp(G_last - G_s)`` past no reset (the chunk state, x = k, y = v) or, with FROM_START,
    ``weight_t = exp(G_t)`` before any reset (the state gradient from the outputs, x = q, y = do).
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    num_chunks = tl.num_programs(0)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BC)
    tok = i_c * CHUNK + offs_t
    valid = (offs_t < CHUNK) & (tok < T)
    row = (i_b.to(tl.int64) * T + tok) * H + i_h  # token rows of [B, T, H]
    offs_x, offs_y = tl.arange(0, BX), tl.arange(0, BY)
    mask_x, mask_y = offs_x < DX, offs_y < DY

    cum, seg, last_cum, last_seg = _chunk_gates(g_ptr, reset_ptr, row, valid)
    acc = cum.dtype
    x = tl.load(x_ptr + row[:, None] * DX + offs_x[None, :], mask=valid[:, None] & mask_x[None, :], other=0.0)
    y = tl.load(y_ptr + row[:, None] * DY + offs_y[None, :], mask=valid[:, None] & mask_y[None, :], other=0.0)
    if FROM_START:
        weight = tl.exp(tl.where(seg == 0, cum, float("-inf")))
    else:
        weight = tl.exp(tl.where(seg == last_seg, last_cum - cum, float("-inf")))
    state = _dot(tl.trans(x.to(acc) * weight[:, None]), y.to(acc))  # [BX, BY]

    chunk_row = i_bh.to(tl.int64) * num_chunks + i_c
    out = out_ptr + chunk_row * DX * DY + offs_x[:, None] * DY + offs_y[None, :]
    tl.store(out, state, mask=mask_x[:, None] & mask_y[None, :])
    if WRITE_CARRY:
        carry = tl.where(last_seg == 0, tl.exp(last_cum), 0.0)
        tl.store(carry_ptr + chunk_row, carry)


@triton.jit
def _state_scan_kernel(
    states_ptr,
    carry_ptr,
    initial_ptr,
    final_ptr,
    NC,
    DX: tl.constexpr,
    DY: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """``h <- carry_c h + states[c]`` over the chunks of one (batch, head) tile, writing ``h`` before the step
    into ``states[c]``: forward, the incoming states; in REVERSE, the gradient of the state after each chunk."""
    i_x, i_y, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_x = i_x * BX + tl.arange(0, BX)
    offs_y = i_y * BY + tl.arange(0, BY)
    mask = (offs_x < DX)[:, None] & (offs_y < DY)[None, :]
    tile = offs_x[:, None] * DY + offs_y[None, :]
    head_offset = i_bh.to(tl.int64) * DX * DY
    if HAS_INITIAL:
        h = tl.load(initial_ptr + head_offset + tile, mask=mask, other=0.0).to(final_ptr.dtype.element_ty)
    else:
        h = tl.zeros([BX, BY], dtype=final_ptr.dtype.element_ty)
    for step in range(NC):
        if REVERSE:
            i_c = NC - 1 - step
        else:
            i_c = step
        chunk_row = i_bh.to(tl.int64) * NC + i_c
        slot = states_ptr + chunk_row * DX * DY + tile
        chunk_state = tl.load(slot, mask=mask, other=0.0)
        tl.store(slot, h, mask=mask)
        h = tl.load(carry_ptr + chunk_row) * h + chunk_state
    tl.store(final_ptr + head_offset + tile, h, mask=mask)


@triton.jit
def _chunk_output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    reset_ptr,
    states_ptr,
    o_ptr,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """``o = ((q k^T) * D) v + exp(G) q S_c`` for one chunk."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    num_chunks = tl.num_programs(0)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BC)
    tok = i_c * CHUNK + offs_t
    valid = (offs_t < CHUNK) & (tok < T)
    row = (i_b.to(tl.int64) * T + tok) * H + i_h
    offs_k, offs_v = tl.arange(0, BK), tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_tk, mask_tv = valid[:, None] & mask_k[None, :], valid[:, None] & mask_v[None, :]

    cum, seg, _, _ = _chunk_gates(g_ptr, reset_ptr, row, valid)
    acc = cum.dtype
    q = tl.load(q_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0).to(acc)
    k = tl.load(k_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0).to(acc)
    v = tl.load(v_ptr + row[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0).to(acc)
    chunk_row = i_bh.to(tl.int64) * num_chunks + i_c
    state_tile = offs_k[:, None] * V + offs_v[None, :]
    state = tl.load(states_ptr + chunk_row * K * V + state_tile, mask=mask_k[:, None] & mask_v[None, :], other=0.0)

    connected = (offs_t[:, None] >= offs_t[None, :]) & (seg[:, None] == seg[None, :])  # [t, s]
    decay_ts = tl.exp(tl.where(connected, cum[:, None] - cum[None, :], float("-inf")))
    from_start = tl.exp(tl.where(seg == 0, cum, float("-inf")))
    out = _dot(_dot(q, tl.trans(k)) * decay_ts, v) + _dot(q * from_start[:, None], state)
    tl.store(o_ptr + row[:, None] * V + offs_v[None, :], out.to(o_ptr.dtype.element_ty), mask=mask_tv)


@triton.jit
def _chunk_backward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    g_ptr,
    reset_ptr,
    states_ptr,
    dstates_ptr,
    carry_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dg_ptr,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """dq, dk, dv, dg of one chunk from its incoming state ``S_c`` and the gradient ``dS_{c+1}`` after it."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    num_chunks = tl.num_programs(0)
    i_b, i_h = i_bh // H, i_bh % H
    offs_t = tl.arange(0, BC)
    tok = i_c * CHUNK + offs_t
    valid = (offs_t < CHUNK) & (tok < T)
    row = (i_b.to(tl.int64) * T + tok) * H + i_h
    offs_k, offs_v = tl.arange(0, BK), tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_tk, mask_tv = valid[:, None] & mask_k[None, :], valid[:, None] & mask_v[None, :]

    cum, seg, last_cum, last_seg = _chunk_gates(g_ptr, reset_ptr, row, valid)
    acc = cum.dtype
    q = tl.load(q_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0).to(acc)
    k = tl.load(k_ptr + row[:, None] * K + offs_k[None, :], mask=mask_tk, other=0.0).to(acc)
    v = tl.load(v_ptr + row[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0).to(acc)
    do = tl.load(do_ptr + row[:, None] * V + offs_v[None, :], mask=mask_tv, other=0.0).to(acc)
    chunk_row = i_bh.to(tl.int64) * num_chunks + i_c
    state_tile = chunk_row * K * V + offs_k[:, None] * V + offs_v[None, :]
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state = tl.load(states_ptr + state_tile, mask=mask_kv, other=0.0)  # S_c, [BK, BV]
    dstate = tl.load(dstates_ptr + state_tile, mask=mask_kv, other=0.0)  # dS_{c+1}, [BK, BV]
    carry = tl.load(carry_ptr + chunk_row)

    connected = (offs_t[:, None] >= offs_t[None, :]) & (seg[:, None] == seg[None, :])  # [t, s]
    decay_ts = tl.exp(tl.where(connected, cum[:, None] - cum[None, :], float("-inf")))
    from_start = tl.exp(tl.where(seg == 0, cum, float("-inf")))
    to_end = tl.exp(tl.where(seg == last_seg, last_cum - cum, float("-inf")))

    # Intra-chunk: o_t += sum_s (q_t . k_s) D_ts v_s.
    scores = _dot(q, tl.trans(k))  # [t, s]
    dscores = _dot(do, tl.trans(v)) * decay_ts  # d(q_t . k_s)
    dq = _dot(dscores, k)
    dk = _dot(tl.trans(dscores), q)
    dv = _dot(tl.trans(scores * decay_ts), do)
    ddecay = dscores * scores  # d D_ts * D_ts = d(G_t - G_s)
    dcum = tl.sum(ddecay, 1) - tl.sum(ddecay, 0)

    # Inter-chunk: o_t += exp(G_t) q_t S_c.
    dq += from_start[:, None] * _dot(do, tl.trans(state))
    dcum += from_start * tl.sum(_dot(q, state) * do, 1)

    # State after the chunk: carry S_c + sum_s exp(G_last - G_s) k_s v_s^T.
    k_dstate = _dot(k, dstate)  # [t, V]
    dk += to_end[:, None] * _dot(v, tl.trans(dstate))
    dv += to_end[:, None] * k_dstate
    dto_end = to_end * tl.sum(k_dstate * v, 1)  # d(G_last - G_s)
    dcum -= dto_end
    dlast_cum = tl.sum(dto_end, 0) + carry * tl.sum(tl.sum(dstate * state, 1), 0)

    # G_t = sum_{s <= t} g_s and G_last = sum_s g_s.
    dg = tl.cumsum(dcum, 0, reverse=True) + dlast_cum
    tl.store(dq_ptr + row[:, None] * K + offs_k[None, :], dq.to(dq_ptr.dtype.element_ty), mask=mask_tk)
    tl.store(dk_ptr + row[:, None] * K + offs_k[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask_tk)
    tl.store(dv_ptr + row[:, None] * V + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask_tv)
    tl.store(dg_ptr + row, dg, mask=valid)


# Decided when the kernels above were decorated: interpreted kernels run on CPU tensors.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def _block(n: int) -> int:
    """Power of two >= 16 holding ``n`` (``tl.dot`` needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(n))


def _chunk_states(x, y, g, reset, chunk, num_chunks, *, from_start, carry=None):
    """``[B, H, NC, DX, DY]`` per-chunk states of ``x^T y`` (and the ``[B, H, NC]`` carry when not given)."""
    batch, seq_len, heads, dx = x.shape
    dy = y.shape[3]
    states = torch.empty(batch, heads, num_chunks, dx, dy, dtype=g.dtype, device=x.device)
    write_carry = carry is None
    if write_carry:
        carry = torch.empty(batch, heads, num_chunks, dtype=g.dtype, device=x.device)
    _chunk_state_kernel[(num_chunks, batch * heads)](
        x, y, g, reset, states, carry, seq_len, heads, dx, dy, chunk, _block(chunk), _block(dx), _block(dy),
        FROM_START=from_start, WRITE_CARRY=write_carry,
    )  # fmt: skip
    return states, carry


def _scan_states(states, carry, initial, *, reverse):
    """Scan ``h <- carry_c h + states[c]`` in place (``states[c]`` becomes ``h`` before the step); returns ``h``."""
    batch, heads, num_chunks, dx, dy = states.shape
    final = torch.empty(batch, heads, dx, dy, dtype=states.dtype, device=states.device)
    block_x, block_y = min(64, triton.next_power_of_2(dx)), min(64, triton.next_power_of_2(dy))
    grid = (triton.cdiv(dx, block_x), triton.cdiv(dy, block_y), batch * heads)
    _state_scan_kernel[grid](
        states, carry, initial if initial is not None else final, final, num_chunks, dx, dy, block_x, block_y,
        HAS_INITIAL=initial is not None, REVERSE=reverse,
    )  # fmt: skip
    return final


def _forward(q, k, v, g, reset, initial_state, chunk):
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[3]
    num_chunks = triton.cdiv(seq_len, chunk)
    states, carry = _chunk_states(k, v, g, reset, chunk, num_chunks, from_start=False)
    final_state = _scan_states(states, carry, initial_state, reverse=False)  # states: now S_c before chunk c
    out = torch.empty_like(v)
    _chunk_output_kernel[(num_chunks, batch * heads)](
        q, k, v, g, reset, states, out, seq_len, heads, key_dim, value_dim, chunk, _block(chunk),
        _block(key_dim), _block(value_dim),
    )  # fmt: skip
    return out, final_state, states, carry


def _backward(q, k, v, g, reset, states, carry, dout, dfinal, chunk):
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[3]
    num_chunks = states.shape[2]
    # dS_c = carry_c dS_{c+1} + sum_t exp(G_t) q_t do_t^T; dstates[c] becomes dS_{c+1}.
    dstates, _ = _chunk_states(q, dout, g, reset, chunk, num_chunks, from_start=True, carry=carry)
    dinitial = _scan_states(dstates, carry, dfinal, reverse=True)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = torch.empty_like(g)
    _chunk_backward_kernel[(num_chunks, batch * heads)](
        q, k, v, dout, g, reset, states, dstates, carry, dq, dk, dv, dg, seq_len, heads, key_dim, value_dim, chunk,
        _block(chunk), _block(key_dim), _block(value_dim),
    )  # fmt: skip
    return dq, dk, dv, dg, dinitial


class _TritonChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, reset, initial_state, chunk):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        reset = reset.to(torch.int32).contiguous()
        initial = None if initial_state is None else initial_state.to(g.dtype).contiguous()
        out, final_state, states, carry = _forward(q, k, v, g, reset, initial, chunk)
        ctx.save_for_backward(q, k, v, g, reset, states, carry)
        ctx.chunk = chunk
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return out, final_state

    @staticmethod
    def backward(ctx, dout, dfinal):
        q, k, v, g, reset, states, carry = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(v)
        dfinal = None if dfinal is None else dfinal.to(g.dtype).contiguous()
        dq, dk, dv, dg, dinitial = _backward(q, k, v, g, reset, states, carry, dout.contiguous(), dfinal, ctx.chunk)
        dinitial = None if ctx.initial_dtype is None else dinitial.to(ctx.initial_dtype)
        return dq, dk, dv, dg, None, dinitial, None


def triton_chunk_linear_attention(
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
    """Causal linear attention with Triton kernels; same arguments and results as
    :func:`~distseq.kernels.linear_attention.chunk.chunk_linear_attention`.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``).
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
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"triton_chunk_linear_attention needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            f"triton), got device={q.device}; use chunk_linear_attention"
        )
    batch, seq_len, heads, key_dim = q.shape
    if seq_len == 0:
        # No chunk to launch a kernel for: the PyTorch path returns the empty output and the initial state.
        return chunk_linear_attention(
            q, k, v, decay=decay, gate=gate, initial_state=initial_state, output_final_state=output_final_state
        )
    g, reset = resolve_gates(q, decay, gate, cu, accumulation_dtype(q.dtype))
    chunk = min(chunk_size, seq_len)
    out, final_state = _TritonChunkLinearAttention.apply(q, k, v, g, reset, initial_state, chunk)
    return out, (final_state if output_final_state else None)
