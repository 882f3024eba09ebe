"""Attention over lists of token spans: the one piece of block logic every softmax strategy shares.

A strategy holds some queries and some keys, each a concatenation of layout chunks (this rank's chunks,
another rank's chunks arriving on a ring, every rank's chunks after an all-gather or all-to-all). A
:class:`Span` names one chunk inside such a tensor with its global positions and document ids; the pair
of spans is classified (DESIGN.md section 4a) and empty pairs are skipped, never merged as -inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distseq.kernels.attention import BlockKind, block_attention, block_attention_backward, classify_block
from distseq.kernels.merge import merge_attention_
from distseq.parallel.layout import SequenceLayout

__all__ = ["AttentionSpec", "Span", "attend", "attend_backward", "block_plan", "new_accumulators", "rank_spans"]


@dataclass(frozen=True)
class Span:
    """A run of consecutive global tokens at ``local`` (a slice of the token dim) of some tensor."""

    local: slice
    pos: torch.Tensor  # [len] global positions
    doc: torch.Tensor | None  # [len] document ids, or None for one unbroken sequence


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention call computes, shared by its forward and backward."""

    layout: SequenceLayout
    causal: bool
    scale: float
    doc_ids: torch.Tensor | None  # [seq_len] global document id per position, or None
    # Chunks longer than this are cut into tiles so a block never materialises more than
    # block_size x block_size scores per head (the reference kernel is not flash-style).
    block_size: int = 2048


def rank_spans(spec: AttentionSpec, sp_ranks: Sequence[int], device: torch.device | None = None) -> list[Span]:
    """Spans of the tokens of ``sp_ranks`` concatenated in that order (each rank in its local order), each
    chunk cut into tiles of at most ``spec.block_size`` tokens."""
    spans = []
    layout = spec.layout
    for i, r in enumerate(sp_ranks):
        for c in layout.for_rank(r).local_chunks():
            for start in range(c.start, c.end, spec.block_size):
                end = min(start + spec.block_size, c.end)
                offset = i * layout.local_len + c.local_start + (start - c.start)
                doc = None if spec.doc_ids is None else spec.doc_ids[start:end].to(device)
                spans.append(Span(slice(offset, offset + end - start), torch.arange(start, end, device=device), doc))
    return spans


def block_plan(spec: AttentionSpec, q_spans: list[Span], k_spans: list[Span]) -> list[tuple[Span, Span, BlockKind]]:
    """The non-empty (query span, key span) pairs with their kinds."""
    plan = []
    for qs in q_spans:
        for ks in k_spans:
            kind = classify_block(qs.pos, ks.pos, causal=spec.causal, q_doc=qs.doc, k_doc=ks.doc)
            if kind is not BlockKind.EMPTY:
                plan.append((qs, ks, kind))
    return plan


def _mask_args(spec: AttentionSpec, qs: Span, ks: Span, kind: BlockKind) -> dict:
    # A FULL block needs no mask: drop causality and documents so the kernel does not build one.
    if kind is BlockKind.FULL:
        return {"q_pos": qs.pos, "k_pos": ks.pos, "causal": False, "softmax_scale": spec.scale}
    return {
        "q_pos": qs.pos,
        "k_pos": ks.pos,
        "causal": spec.causal,
        "softmax_scale": spec.scale,
        "q_doc": qs.doc,
        "k_doc": ks.doc,
    }


def new_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(out, lse)`` accumulators for ``q`` ``[B, T, H, D]``: zeros and ``-inf``, fp32 (fp64 for fp64)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, tokens, heads, dim = q.shape
    return (
        torch.zeros(batch, tokens, heads, dim, dtype=dtype, device=q.device),
        torch.full((batch, heads, tokens), float("-inf"), dtype=dtype, device=q.device),
    )


def attend(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: list[tuple[Span, Span, BlockKind]],
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Accumulate attention of ``q`` over ``k``/``v`` for every pair of ``plan`` into ``(out, lse)`` in place."""
    for qs, ks, kind in plan:
        block_out, block_lse = block_attention(
            q[:, qs.local], k[:, ks.local], v[:, ks.local], **_mask_args(spec, qs, ks, kind)
        )
        merge_attention_(out[:, qs.local], lse[:, :, qs.local], block_out, block_lse)


def attend_backward(
    spec: AttentionSpec,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    plan: list[tuple[Span, Span, BlockKind]],
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Accumulate the gradients of every pair of ``plan`` into ``dq``, ``dk``, ``dv`` in place.

    ``lse`` and ``delta`` (``rowsum(dout * out)``) belong to the final output of the queries.
    """
    for qs, ks, kind in plan:
        dq_b, dk_b, dv_b = block_attention_backward(
            dout[:, qs.local],
            q[:, qs.local],
            k[:, ks.local],
            v[:, ks.local],
            None,
            lse[:, :, qs.local],
            delta=delta[:, :, qs.local],
            **_mask_args(spec, qs, ks, kind),
        )
        dq[:, qs.local] += dq_b
        dk[:, ks.local] += dk_b
        dv[:, ks.local] += dv_b
