"""Chunked causal linear attention in Triton: the same math and results as ``chunk.py``, forward and backward.

Per ``(batch, head)`` the sequence is cut into chunks of ``C`` tokens. With ``G`` the within-chunk inclusive
cumulative log-gate and ``seg`` the within-chunk count of resets so far (both rebuilt inside every kernel), and
``S_c`` the state before chunk ``c``:

* ``_chunk_state_kernel``: the chunk's own state ``M_c = sum_s exp(G_last - G_s) k_s v_s^T`` (only for ``s``
  with no reset after it in the chunk) and the carry ``exp(G_last)`` (0 when the chunk holds a reset);
* ``_state_scan_kernel``: ``S_{c+1} = carry_c S_c + M_c`` chunk after chunk, overwriting ``M_c`` with ``S_c``;
  run in reverse it carries the state gradient ``dS_c = carry_c dS_{c+1} + sum_t exp(G_t) q_t do_t^T``;
* ``_chunk_output_kernel``: ``o = ((q k^T) * D) v + exp(G) q S_c`` with ``D[t, s] = exp(G_t - G_s)`` where no
  reset lies in ``(s, t]``;
* ``_chunk_dv_kernel``, ``_chunk_dqk_kernel``: dv, and dq and dk, of one chunk from ``S_c`` and ``dS_{c+1}``;
* ``_chunk_dg_kernel``: the gradient of the per-token log-gate ``g`` from ``q . dq - k . dk`` and
  ``<dS_{c+1}, S_{c+1}>``.

Masked terms are ``exp(-inf) = 0`` before any product, so resets never produce ``inf - inf`` or ``0 * inf``.
Every product accumulates in fp32 (fp64 for fp64 inputs) with exact fp32 dots (no tf32). A program holds one
whole chunk and loops over 64-wide (32 for fp64 or chunks over 64) tiles of the key and value dims. The autograd
Function takes the finite log-gate and reset mask from ``resolve_gates``; torch autograd routes ``dg`` back to
``decay`` and ``gate``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from distseq.kernels.linear_attention._gates import accumulation_dtype, check_inputs, resolve_gates
from distseq.kernels.linear_attention.chunk import chunk_linear_attention

__all__ = ["triton_chunk_linear_attention"]


@triton.jit
def _dot(a, b):
    # Exact fp32 products (tf32 would cost ~1e-3 relative error against the PyTorch paths); fp16/bf16 operands
    # multiply exactly into the fp32 accumulator anyway.
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _chunk_rows(i_c, i_bh, T, H: tl.constexpr, CHUNK: tl.constexpr, BC: tl.constexpr):
    """Position in the chunk ``[BC]``, the token's row of ``[B, T, H]`` and whether it is a real token."""
    offs_t = tl.arange(0, BC)
    tok = i_c * CHUNK + offs_t
    valid = (offs_t < CHUNK) & (tok < T)
    row = ((i_bh // H).to(tl.int64) * T + tok) * H + i_bh % H
    return offs_t, row, valid


@triton.jit
def _load_rows(ptr, row, valid, offs, D: tl.constexpr):
    """``[BC, BD]`` tile of a ``[B, T, H, D]`` tensor (zeros outside)."""
    return tl.load(ptr + row[:, None] * D + offs[None, :], mask=valid[:, None] & (offs < D)[None, :], other=0.0)


@triton.jit
def _state_tile(ptr, slot, offs_x, offs_y, DX: tl.constexpr, DY: tl.constexpr):
    """``[BX, BY]`` tile of state ``slot`` of a ``[B, H, NC + 1, DX, DY]`` tensor (zeros outside)."""
    mask = (offs_x < DX)[:, None] & (offs_y < DY)[None, :]
    return tl.load(ptr + slot * DX * DY + offs_x[:, None] * DY + offs_y[None, :], mask=mask, other=0.0)


@triton.jit
def _chunk_gates(g_ptr, reset_ptr, row, valid):
    """Within-chunk cumulative log-gate ``G``, reset count ``seg`` and their last values, for rows ``[BC]``."""
    g = tl.load(g_ptr + row, mask=valid, other=0.0)
    reset = tl.load(reset_ptr + row, mask=valid, other=0)
    # Padding rows have g = 0 and no reset, so the chunk sums equal G and seg at the last real token.
    return tl.cumsum(g, 0), tl.cumsum(reset, 0), tl.sum(g, 0), tl.sum(reset, 0)


@triton.jit
def _intra_decay(offs_t, cum, seg):
    """``D[t, s] = exp(G_t - G_s)`` where ``s <= t`` with no reset in ``(s, t]``, else 0."""
    connected = (offs_t[:, None] >= offs_t[None, :]) & (seg[:, None] == seg[None, :])
    return tl.exp(tl.where(connected, cum[:, None] - cum[None, :], float("-inf")))


@triton.jit
def _chunk_state_kernel(
    x_ptr,
    y_ptr,
    g_ptr,
    reset_ptr,
    states_ptr,
    carry_ptr,
    T,
    NC,
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
    """``states[c] = (x * weight)^T y`` over one chunk, one ``[BX, BY]`` tile of ``[DX, DY]``.

    ``weight_s = exp(G_last - G_s)`` past no reset (the chunk state, x = k, y = v) or, with FROM_START,
    ``weight_t = exp(G_t)`` before any reset (the state gradient from the outputs, x = q, y = do).
    """
    i_xy, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_x, i_y = i_xy // tl.cdiv(DY, BY), i_xy % tl.cdiv(DY, BY)
    offs_t, row, valid = _chunk_rows(i_c, i_bh, T, H, CHUNK, BC)
    offs_x, offs_y = i_x * BX + tl.arange(0, BX), i_y * BY + tl.arange(0, BY)
    cum, seg, last_cum, last_seg = _chunk_gates(g_ptr, reset_ptr, row, valid)
    acc = cum.dtype
    if FROM_START:
        weight = tl.exp(tl.where(seg == 0, cum, float("-inf")))
    else:
        weight = tl.exp(tl.where(seg == last_seg, last_cum - cum, float("-inf")))
    x = _load_rows(x_ptr, row, valid, offs_x, DX).to(acc) * weight[:, None]
    state = _dot(tl.trans(x), _load_rows(y_ptr, row, valid, offs_y, DY).to(acc))  # [BX, BY]

    slot = i_bh.to(tl.int64) * (NC + 1) + i_c
    mask = (offs_x < DX)[:, None] & (offs_y < DY)[None, :]
    tl.store(states_ptr + slot * DX * DY + offs_x[:, None] * DY + offs_y[None, :], state, mask=mask)
    if WRITE_CARRY and i_xy == 0:
        tl.store(carry_ptr + i_bh.to(tl.int64) * NC + i_c, tl.where(last_seg == 0, tl.exp(last_cum), 0.0))


@triton.jit
def _state_scan_kernel(
    states_ptr,
    carry_ptr,
    initial_ptr,
    NC,
    DX: tl.constexpr,
    DY: tl.constexpr,
    BX: tl.constexpr,
    BY: tl.constexpr,
    HAS_INITIAL: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """``h <- carry_c h + states[c]`` over the chunks of one (batch, head) tile, writing ``h`` before the step
    into ``states[c]`` and the last ``h`` into ``states[NC]``. Forward: the state before each chunk and the
    final state; in REVERSE: the gradient of the state after each chunk and that of the initial state."""
    i_x, i_y, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_x, offs_y = i_x * BX + tl.arange(0, BX), i_y * BY + tl.arange(0, BY)
    mask = (offs_x < DX)[:, None] & (offs_y < DY)[None, :]
    tile = offs_x[:, None] * DY + offs_y[None, :]
    acc = states_ptr.dtype.element_ty
    if HAS_INITIAL:
        h = tl.load(initial_ptr + i_bh.to(tl.int64) * DX * DY + tile, mask=mask, other=0.0).to(acc)
    else:
        h = tl.zeros([BX, BY], dtype=acc)
    for step in range(NC):
        if REVERSE:
            i_c = NC - 1 - step
        else:
            i_c = step
        slot = states_ptr + (i_bh.to(tl.int64) * (NC + 1) + i_c) * DX * DY + tile
        chunk_state = tl.load(slot, mask=mask, other=0.0)
        tl.store(slot, h, mask=mask)
        h = tl.load(carry_ptr + i_bh.to(tl.int64) * NC + i_c) * h + chunk_state
    tl.store(states_ptr + (i_bh.to(tl.int64) * (NC + 1) + NC) * DX * DY + tile, h, mask=mask)


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
    NC,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """``o = ((q k^T) * D) v + exp(G) q S_c`` for one chunk and one ``BV`` tile of V."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t, row, valid = _chunk_rows(i_c, i_bh, T, H, CHUNK, BC)
    offs_v = i_v * BV + tl.arange(0, BV)
    slot = i_bh.to(tl.int64) * (NC + 1) + i_c
    cum, seg, _, _ = _chunk_gates(g_ptr, reset_ptr, row, valid)
    acc = cum.dtype
    from_start = tl.exp(tl.where(seg == 0, cum, float("-inf")))

    scores = tl.zeros([BC, BC], dtype=acc)
    out = tl.zeros([BC, BV], dtype=acc)
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        q = _load_rows(q_ptr, row, valid, offs_k, K)
        scores += _dot(q, tl.trans(_load_rows(k_ptr, row, valid, offs_k, K)))
        out += _dot(q.to(acc) * from_start[:, None], _state_tile(states_ptr, slot, offs_k, offs_v, K, V))
    v = _load_rows(v_ptr, row, valid, offs_v, V).to(acc)
    out += _dot(scores * _intra_decay(offs_t, cum, seg), v)
    mask = valid[:, None] & (offs_v < V)[None, :]
    tl.store(o_ptr + row[:, None] * V + offs_v[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_dv_kernel(
    q_ptr,
    k_ptr,
    do_ptr,
    g_ptr,
    reset_ptr,
    dstates_ptr,
    dv_ptr,
    T,
    NC,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """``dv = ((q k^T) * D)^T do + exp(G_last - G) k dS_{c+1}`` for one chunk and one ``BV`` tile of V."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t, row, valid = _chunk_rows(i_c, i_bh, T, H, CHUNK, BC)
    offs_v = i_v * BV + tl.arange(0, BV)
    slot = i_bh.to(tl.int64) * (NC + 1) + i_c
    cum, seg, last_cum, last_seg = _chunk_gates(g_ptr, reset_ptr, row, valid)
    acc = cum.dtype
    to_end = tl.exp(tl.where(seg == last_seg, last_cum - cum, float("-inf")))

    scores = tl.zeros([BC, BC], dtype=acc)
    dv = tl.zeros([BC, BV], dtype=acc)
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k = _load_rows(k_ptr, row, valid, offs_k, K)
        scores += _dot(_load_rows(q_ptr, row, valid, offs_k, K), tl.trans(k))
        dv += _dot(k.to(acc), _state_tile(dstates_ptr, slot, offs_k, offs_v, K, V))
    do = _load_rows(do_ptr, row, valid, offs_v, V).to(acc)
    dv = to_end[:, None] * dv + _dot(tl.trans(scores * _intra_decay(offs_t, cum, seg)), do)
    mask = valid[:, None] & (offs_v < V)[None, :]
    tl.store(dv_ptr + row[:, None] * V + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_dqk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    g_ptr,
    reset_ptr,
    states_ptr,
    dstates_ptr,
    dq_ptr,
    dk_ptr,
    T,
    NC,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """dq and dk of one chunk and one ``BK`` tile of K:

    ``dq = ((do v^T) * D) k + exp(G) do S_c^T``, ``dk = ((do v^T) * D)^T q + exp(G_last - G) v dS_{c+1}^T``.
    """
    i_k, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t, row, valid = _chunk_rows(i_c, i_bh, T, H, CHUNK, BC)
    offs_k = i_k * BK + tl.arange(0, BK)
    slot = i_bh.to(tl.int64) * (NC + 1) + i_c
    cum, seg, last_cum, last_seg = _chunk_gates(g_ptr, reset_ptr, row, valid)
    acc = cum.dtype

    dscores = tl.zeros([BC, BC], dtype=acc)  # d(q_t . k_s) before the decay
    dq = tl.zeros([BC, BK], dtype=acc)
    dk = tl.zeros([BC, BK], dtype=acc)
    for i_v in range(tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        do = _load_rows(do_ptr, row, valid, offs_v, V)
        v = _load_rows(v_ptr, row, valid, offs_v, V)
        dscores += _dot(do, tl.trans(v))
        dq += _dot(do.to(acc), tl.trans(_state_tile(states_ptr, slot, offs_k, offs_v, K, V)))
        dk += _dot(v.to(acc), tl.trans(_state_tile(dstates_ptr, slot, offs_k, offs_v, K, V)))
    dscores *= _intra_decay(offs_t, cum, seg)
    from_start = tl.exp(tl.where(seg == 0, cum, float("-inf")))
    to_end = tl.exp(tl.where(seg == last_seg, last_cum - cum, float("-inf")))
    dq = from_start[:, None] * dq + _dot(dscores, _load_rows(k_ptr, row, valid, offs_k, K).to(acc))
    dk = to_end[:, None] * dk + _dot(tl.trans(dscores), _load_rows(q_ptr, row, valid, offs_k, K).to(acc))
    mask = valid[:, None] & (offs_k < K)[None, :]
    tl.store(dq_ptr + row[:, None] * K + offs_k[None, :], dq, mask=mask)
    tl.store(dk_ptr + row[:, None] * K + offs_k[None, :], dk, mask=mask)


@triton.jit
def _chunk_dg_kernel(
    q_ptr,
    k_ptr,
    dq_ptr,
    dk_ptr,
    states_ptr,
    dstates_ptr,
    dg_ptr,
    T,
    NC,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    CHUNK: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """Gradient of the per-token log-gate ``g`` over one chunk.

    Every term holds ``exp(G_t)`` with ``q_t``, ``exp(-G_s)`` with ``k_s``, or ``exp(G_last)`` with the state
    after the chunk, so ``dG_t = q_t . dq_t - k_t . dk_t`` and ``dG_last = <dS_{c+1}, S_{c+1}>``; then
    ``G_t = sum_{s <= t} g_s`` and ``G_last = sum_s g_s`` give ``dg``.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    _, row, valid = _chunk_rows(i_c, i_bh, T, H, CHUNK, BC)
    slot = i_bh.to(tl.int64) * (NC + 1) + i_c
    acc = dq_ptr.dtype.element_ty

    dcum = tl.zeros([BC], dtype=acc)
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        q_dq = _load_rows(q_ptr, row, valid, offs_k, K).to(acc) * _load_rows(dq_ptr, row, valid, offs_k, K)
        k_dk = _load_rows(k_ptr, row, valid, offs_k, K).to(acc) * _load_rows(dk_ptr, row, valid, offs_k, K)
        dcum += tl.sum(q_dq - k_dk, 1)
    dlast_cum = tl.zeros([BK, BV], dtype=acc)
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        for i_v in range(tl.cdiv(V, BV)):
            offs_v = i_v * BV + tl.arange(0, BV)
            dstate = _state_tile(dstates_ptr, slot, offs_k, offs_v, K, V)  # dS_{c+1}
            dlast_cum += dstate * _state_tile(states_ptr, slot + 1, offs_k, offs_v, K, V)  # S_{c+1}
    dg = tl.cumsum(dcum, 0, reverse=True) + tl.sum(tl.sum(dlast_cum, 1), 0)
    tl.store(dg_ptr + row, dg, mask=valid)


# Decided when the kernels above were decorated: interpreted kernels run on CPU tensors.
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def _blocks(chunk: int, key_dim: int, value_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Block sizes: the whole chunk, and K and V tiles; powers of two >= 16 (``tl.dot`` needs it). Tiles are
    64 wide, or 32 for fp64 or chunks over 64, so one program stays well inside 160 KB of shared memory."""
    block_c = max(16, triton.next_power_of_2(chunk))
    cap = 64 if dtype != torch.float64 and block_c <= 64 else 32
    return block_c, *(max(16, min(cap, triton.next_power_of_2(n))) for n in (key_dim, value_dim))


def _chunk_states(x, y, g, reset, chunk, num_chunks, *, from_start, carry=None):
    """``[B, H, NC + 1, DX, DY]`` buffer with the per-chunk ``x^T y`` states in its first NC slots (and the
    ``[B, H, NC]`` carry when none is given)."""
    batch, seq_len, heads, dx = x.shape
    dy = y.shape[3]
    states = torch.empty(batch, heads, num_chunks + 1, dx, dy, dtype=g.dtype, device=x.device)
    write_carry = carry is None
    if write_carry:
        carry = torch.empty(batch, heads, num_chunks, dtype=g.dtype, device=x.device)
    block_c, block_x, block_y = _blocks(chunk, dx, dy, g.dtype)
    grid = (triton.cdiv(dx, block_x) * triton.cdiv(dy, block_y), num_chunks, batch * heads)
    _chunk_state_kernel[grid](
        x, y, g, reset, states, carry, seq_len, num_chunks, heads, dx, dy, chunk, block_c, block_x, block_y,
        FROM_START=from_start, WRITE_CARRY=write_carry,
    )  # fmt: skip
    return states, carry


def _scan_states(states, carry, initial, *, reverse):
    """Scan ``h <- carry_c h + states[c]`` in place: ``states[c]`` becomes ``h`` before the step and
    ``states[NC]`` the last ``h``."""
    batch, heads, slots, dx, dy = states.shape
    block_x, block_y = min(64, triton.next_power_of_2(dx)), min(64, triton.next_power_of_2(dy))
    grid = (triton.cdiv(dx, block_x), triton.cdiv(dy, block_y), batch * heads)
    _state_scan_kernel[grid](
        states, carry, states if initial is None else initial, slots - 1, dx, dy, block_x, block_y,
        HAS_INITIAL=initial is not None, REVERSE=reverse,
    )  # fmt: skip


def _forward(q, k, v, g, reset, initial_state, chunk):
    """Output, and the states ``[B, H, NC + 1, K, V]`` before each chunk and after the last, and the carry."""
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[3]
    num_chunks = triton.cdiv(seq_len, chunk)
    states, carry = _chunk_states(k, v, g, reset, chunk, num_chunks, from_start=False)
    _scan_states(states, carry, initial_state, reverse=False)
    out = torch.empty_like(v)
    block_c, block_k, block_v = _blocks(chunk, key_dim, value_dim, g.dtype)
    sizes = (seq_len, num_chunks, heads, key_dim, value_dim, chunk, block_c, block_k, block_v)
    grid = (triton.cdiv(value_dim, block_v), num_chunks, batch * heads)
    _chunk_output_kernel[grid](q, k, v, g, reset, states, out, *sizes)
    return out, states, carry


def _backward(q, k, v, g, reset, states, carry, dout, dfinal, chunk):
    """dq, dk, dv (fp32; fp64 for fp64), dg and the initial state's gradient."""
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[3]
    num_chunks = states.shape[2] - 1
    # dS_c = carry_c dS_{c+1} + sum_t exp(G_t) q_t do_t^T: dstates[c] becomes dS_{c+1}, dstates[NC] dS_0.
    dstates, _ = _chunk_states(q, dout, g, reset, chunk, num_chunks, from_start=True, carry=carry)
    _scan_states(dstates, carry, dfinal, reverse=True)
    dq = torch.empty(q.shape, dtype=g.dtype, device=q.device)  # kept wide: dg is computed from them
    dk = torch.empty(k.shape, dtype=g.dtype, device=k.device)
    dv, dg = torch.empty_like(v), torch.empty_like(g)
    block_c, block_k, block_v = _blocks(chunk, key_dim, value_dim, g.dtype)
    sizes = (seq_len, num_chunks, heads, key_dim, value_dim, chunk, block_c, block_k, block_v)
    _chunk_dv_kernel[(triton.cdiv(value_dim, block_v), num_chunks, batch * heads)](
        q, k, dout, g, reset, dstates, dv, *sizes
    )
    _chunk_dqk_kernel[(triton.cdiv(key_dim, block_k), num_chunks, batch * heads)](
        q, k, v, dout, g, reset, states, dstates, dq, dk, *sizes
    )
    _chunk_dg_kernel[(num_chunks, batch * heads)](q, k, dq, dk, states, dstates, dg, *sizes)
    return dq, dk, dv, dg, dstates[:, :, num_chunks].clone()  # not a view pinning the whole buffer


class _TritonChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, reset, initial_state, chunk):
        q, k, v, g = (x.contiguous() for x in (q, k, v, g))
        reset = reset.to(torch.int32).contiguous()
        initial = None if initial_state is None else initial_state.to(g.dtype).contiguous()
        out, states, carry = _forward(q, k, v, g, reset, initial, chunk)
        ctx.save_for_backward(q, k, v, g, reset, states, carry)
        final_state = states[:, :, -1].clone()  # not a view: the caller may change it in place
        ctx.chunk = chunk
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return out, final_state

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal):
        q, k, v, g, reset, states, carry = ctx.saved_tensors
        dfinal = dfinal.to(g.dtype).contiguous()  # zeros when the final state is unused
        dq, dk, dv, dg, dinitial = _backward(q, k, v, g, reset, states, carry, dout.contiguous(), dfinal, ctx.chunk)
        dinitial = None if ctx.initial_dtype is None else dinitial.to(ctx.initial_dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg, None, dinitial, None


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
    seq_len = q.shape[1]
    if seq_len == 0:
        # No chunk to launch a kernel for: the PyTorch path returns the empty output and the initial state.
        return chunk_linear_attention(
            q, k, v, decay=decay, gate=gate, initial_state=initial_state, output_final_state=output_final_state
        )
    g, reset = resolve_gates(q, decay, gate, cu, accumulation_dtype(q.dtype))
    chunk = min(chunk_size, seq_len)
    out, final_state = _TritonChunkLinearAttention.apply(q, k, v, g, reset, initial_state, chunk)
    return out, (final_state if output_final_state else None)
