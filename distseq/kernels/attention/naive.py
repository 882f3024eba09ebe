"""Reference block attention in plain PyTorch: forward returning ``(out, lse)`` and an explicit backward.

A block is one (query chunk, key chunk) pair of a sequence-parallel attention. The forward returns the
block's partial output and log-sum-exp so partial results can be merged with
:func:`distseq.kernels.merge.merge_attention`; the backward takes the final (merged) ``out`` and ``lse`` so
per-block gradients can simply be summed over blocks, as a ring strategy does.

Everything is computed in the accumulation dtype (fp64 for fp64 inputs, fp32 otherwise) and the full
``[B, H, Tq, Tk]`` score matrix of the block is materialised: this is the slow, obviously correct
backend; keeping blocks small is the caller's job.
"""

from __future__ import annotations

import torch

from distseq.kernels._dtypes import accumulation_dtype
from distseq.kernels.attention.mask import _check_positions, _kind_and_mask

__all__ = [
    "attention_delta",
    "block_attention",
    "block_attention_backward",
    "causal_mask",
    "masked_attention",
    "masked_attention_backward",
]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D], got q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Tk, Hkv, D], got k={tuple(k.shape)} v={tuple(v.shape)}")
    batch, _, heads, head_dim = q.shape
    kv_batch, _, kv_heads, kv_head_dim = k.shape
    if kv_batch != batch:
        raise ValueError(f"batch mismatch: q batch={batch}, k/v batch={kv_batch}")
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim mismatch: q head_dim={head_dim}, k/v head_dim={kv_head_dim}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads must be divisible by kv heads: heads={heads}, kv_heads={kv_heads}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got q={q.dtype} k={k.dtype} v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got q={q.device} k={k.device} v={v.device}")


def _resolve_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    q_doc: torch.Tensor | None,
    k_doc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Default positions to ``arange``, validate, and move everything to the device of ``q``."""
    q_len, k_len = q.shape[1], k.shape[1]
    q_pos = torch.arange(q_len, device=q.device) if q_pos is None else q_pos
    k_pos = torch.arange(k_len, device=q.device) if k_pos is None else k_pos
    _check_positions(q_pos, k_pos, q_doc, k_doc)
    if q_pos.numel() != q_len or k_pos.numel() != k_len:
        raise ValueError(
            f"positions must match sequence lengths: q_pos={q_pos.numel()} vs Tq={q_len}, "
            f"k_pos={k_pos.numel()} vs Tk={k_len}"
        )
    if q_doc is not None:
        q_doc, k_doc = q_doc.to(q.device), k_doc.to(q.device)
    return q_pos.to(q.device), k_pos.to(q.device), q_doc, k_doc


def _to_groups(x: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, Hkv, G*T, D]`` with query head ``h = hkv * G + g``."""
    batch, seq_len, heads, head_dim = x.shape
    group = heads // kv_heads
    x = x.to(dtype).view(batch, seq_len, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    return x.reshape(batch, kv_heads, group * seq_len, head_dim)


def _from_groups(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, Hkv, G*T, D]`` -> ``[B, T, H, D]``, inverse of :func:`_to_groups`."""
    batch, kv_heads, _, head_dim = x.shape
    x = x.view(batch, kv_heads, -1, seq_len, head_dim).permute(0, 3, 1, 2, 4)
    return x.reshape(batch, seq_len, -1, head_dim)


def _kv_heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).transpose(1, 2)  # [B, Hkv, Tk, D]


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one query block against one key block, differentiable with autograd.

    Query ``i`` attends key ``j`` iff ``k_pos[j] <= q_pos[i]`` (when ``causal``) and ``q_doc[i] == k_doc[j]``
    (when document ids are given). Query head ``h`` uses kv head ``h // (H // Hkv)`` (GQA).

    Args:
        q: ``[B, Tq, H, D]``.
        k, v: ``[B, Tk, Hkv, D]``, same dtype as ``q``; ``H`` divisible by ``Hkv``.
        q_pos, k_pos: ``[Tq]``, ``[Tk]`` int global positions; default ``arange`` (so with ``Tq != Tk`` the
            default causal mask is aligned top-left; pass positions for any other alignment).
        causal: apply the causal rule above.
        softmax_scale: score scale; default ``1 / sqrt(D)``.
        q_doc, k_doc: ``[Tq]``, ``[Tk]`` int document ids, both or neither.

    Returns:
        ``out`` ``[B, Tq, H, D]`` and ``lse`` ``[B, H, Tq]`` (natural log of the sum of exp of the scaled,
        masked scores), both in the accumulation dtype (fp64 for fp64 inputs, fp32 otherwise). ``out`` is
        NOT cast back to the dtype of ``q``: partial results are merged in fp32, the caller casts the final
        output. A query row with no allowed key gets ``out = 0`` and ``lse = -inf``, with finite gradients.
    """
    _check_qkv(q, k, v)
    q_pos, k_pos, q_doc, k_doc = _resolve_positions(q, k, q_pos, k_pos, q_doc, k_doc)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    _, mask = _kind_and_mask(q_pos, k_pos, causal, q_doc, k_doc)  # [Tq, Tk] or None when FULL
    return masked_attention(q, k, v, mask, scale)


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """``[T, T]`` lower-triangular mask of a block whose queries and keys are the same run of positions."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_attention` with the ``[Tq, Tk]`` mask given (None: every pair allowed); reads no value
    back to the host."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads, k_len = k.shape[2], k.shape[1]
    group = heads // kv_heads
    dtype = accumulation_dtype(q.dtype)

    q_grouped = _to_groups(q, kv_heads, dtype)  # [B, Hkv, G*Tq, D]
    k_heads_first = _kv_heads_first(k, dtype)  # [B, Hkv, Tk, D]
    v_heads_first = _kv_heads_first(v, dtype)
    scores = torch.matmul(q_grouped, k_heads_first.transpose(-1, -2)) * scale  # [B, Hkv, G*Tq, Tk]
    scores = scores.view(batch, kv_heads, group, q_len, k_len)
    if mask is not None:
        empty_rows = ~mask.any(dim=-1, keepdim=True)  # [Tq, 1]
        # Rows with no allowed key get finite dummy scores so that logsumexp, softmax and their gradients
        # stay NaN-free; their out and lse are overwritten below.
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty_rows, 0.0)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, G, Tq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs.view(batch, kv_heads, group * q_len, k_len), v_heads_first)  # [B, Hkv, G*Tq, D]
    if mask is not None:
        out = out.view(batch, kv_heads, group, q_len, head_dim).masked_fill(empty_rows, 0.0)
        lse = lse.masked_fill(empty_rows.squeeze(-1), float("-inf"))
    out = out.reshape(batch, kv_heads, group * q_len, head_dim)
    return _from_groups(out, q_len), lse.reshape(batch, heads, q_len)


def attention_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``Dsum = rowsum(dout * out)`` ``[B, H, T]`` in the accumulation dtype, for the attention backward."""
    dtype = accumulation_dtype(dout.dtype)
    return (dout.to(dtype) * out.to(dtype)).sum(-1).transpose(1, 2)


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    *,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    q_doc: torch.Tensor | None = None,
    k_doc: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block of an attention whose final output is ``out`` (flash-attention style).

    ``out`` and ``lse`` are those of the WHOLE attention (after merging every key block), so the returned
    ``dq`` summed over key blocks is the full ``dq``, and ``dk``, ``dv`` are the full gradients of this
    block's keys and values. With ``P = exp(S - lse)`` (0 where masked or where ``lse = -inf``)::

        dV = P^T dO,  dP = dO V^T,  Dsum = rowsum(dO * out),  dS = P * (dP - Dsum),
        dQ = scale * dS K,  dK = scale * dS^T Q

    with ``dK``, ``dV`` summed over the query heads of each GQA group.

    Args:
        dout: ``[B, Tq, H, D]`` gradient of the final output.
        q, k, v, q_pos, k_pos, causal, softmax_scale, q_doc, k_doc: as in :func:`block_attention`.
        out: ``[B, Tq, H, D]`` final output of the whole attention.
        lse: ``[B, H, Tq]`` final log-sum-exp of the whole attention.
        delta: optional ``[B, H, Tq]`` ``Dsum`` precomputed by :func:`attention_delta`; when given, ``out``
            is not read (may be None), so a strategy can ship ``h`` numbers per token instead of ``out``.

    Returns:
        ``dq`` ``[B, Tq, H, D]``, ``dk`` and ``dv`` ``[B, Tk, Hkv, D]`` in the accumulation dtype (fp64 for
        fp64 inputs, fp32 otherwise).
    """
    _check_qkv(q, k, v)
    if out is None and delta is None:
        raise ValueError("block_attention_backward needs out or delta")
    if dout.shape != q.shape or (delta is None and out.shape != q.shape):
        raise ValueError(
            f"dout and out must have the shape of q {tuple(q.shape)}, got dout={tuple(dout.shape)} "
            f"out={None if out is None else tuple(out.shape)}"
        )
    batch, q_len, heads, head_dim = q.shape
    if lse.shape != (batch, heads, q_len):
        raise ValueError(f"lse must be [B, H, Tq]={(batch, heads, q_len)}, got {tuple(lse.shape)}")
    if delta is not None and delta.shape != lse.shape:
        raise ValueError(f"delta must be [B, H, Tq]={(batch, heads, q_len)}, got {tuple(delta.shape)}")
    q_pos, k_pos, q_doc, k_doc = _resolve_positions(q, k, q_pos, k_pos, q_doc, k_doc)
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    _, mask = _kind_and_mask(q_pos, k_pos, causal, q_doc, k_doc)
    if delta is None:
        delta = attention_delta(dout, out)
    return masked_attention_backward(dout, q, k, v, lse, delta, mask, scale)


def masked_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`block_attention_backward` with the mask given and ``Dsum = delta``; reads no value back to the
    host."""
    batch, q_len, heads, _ = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    dtype = accumulation_dtype(q.dtype)

    q_grouped = _to_groups(q, kv_heads, dtype)  # [B, Hkv, G*Tq, D]
    dout_grouped = _to_groups(dout, kv_heads, dtype)
    k_heads_first = _kv_heads_first(k, dtype)  # [B, Hkv, Tk, D]
    v_heads_first = _kv_heads_first(v, dtype)
    lse = lse.to(dtype).reshape(batch, kv_heads, group * q_len, 1)

    scores = torch.matmul(q_grouped, k_heads_first.transpose(-1, -2)) * scale  # [B, Hkv, G*Tq, Tk]
    alive = torch.isfinite(lse)  # rows with at least one allowed key in the whole attention
    probs = torch.exp(scores - torch.where(alive, lse, 0.0))
    disallowed = ~alive
    if mask is not None:
        disallowed = disallowed | ~mask.repeat(group, 1)  # [G*Tq, Tk], row g*Tq + i is query i
    probs = probs.masked_fill(disallowed, 0.0)

    dv = torch.matmul(probs.transpose(-1, -2), dout_grouped)  # [B, Hkv, Tk, D]
    dprobs = torch.matmul(dout_grouped, v_heads_first.transpose(-1, -2))  # [B, Hkv, G*Tq, Tk]
    row_dot = delta.to(dtype).reshape(batch, kv_heads, group * q_len, 1)  # Dsum
    dscores = probs * (dprobs - row_dot)
    dq = torch.matmul(dscores, k_heads_first) * scale  # [B, Hkv, G*Tq, D]
    dk = torch.matmul(dscores.transpose(-1, -2), q_grouped) * scale  # [B, Hkv, Tk, D]
    return _from_groups(dq, q_len), dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()
