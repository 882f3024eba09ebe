"""Attention over lists of token spans: the one piece of block logic every softmax strategy shares.

A strategy holds some queries and some keys, each a concatenation of layout chunks (this rank's chunks,
another rank's chunks arriving on a ring, every rank's chunks after an all-gather or all-to-all). A
:class:`Span` names one run of consecutive global positions inside such a tensor, all in one document.

Spans are cut on the host, from Python integers, at chunk boundaries, at document boundaries and every
``max_span`` tokens (for backends that materialise scores). Every strategy cuts its queries and its keys
from the same global set of cut points, so two spans are either the same run of positions or disjoint, and
each (query span, key span) pair is one of three kinds decided from six integers:

* EMPTY: different documents, or (causal) every key after every query: skipped, never merged as -inf;
* FULL: every query attends every key;
* CAUSAL: the same run of positions: the kernel's aligned causal mask.

So a fused kernel never needs an explicit mask (the idea of varlen attention), plans are built once per
(layout, documents, causality, span length) and cached, and running them reads nothing back from the device.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distseq.kernels.attention import BlockKind
from distseq.kernels.attention.backends import AttentionBackend
from distseq.kernels.merge import merge_attention_
from distseq.parallel.layout import SequenceLayout

__all__ = [
    "AttentionSpec",
    "Plan",
    "Span",
    "attend",
    "attend_backward",
    "block_plan",
    "new_accumulators",
    "rank_spans",
]


@dataclass(frozen=True)
class Span:
    """Global positions ``[start, start + length)`` of one document, at tokens ``[offset, offset + length)``
    of some tensor."""

    offset: int
    start: int
    length: int
    doc: int  # document index (0 without documents)

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def local(self) -> slice:
        return slice(self.offset, self.offset + self.length)


Plan = tuple[tuple[Span, Span, BlockKind], ...]


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention call computes, shared by its forward and backward."""

    layout: SequenceLayout
    causal: bool
    scale: float
    backend: AttentionBackend
    doc_offsets: tuple[int, ...] | None  # global document offsets [0, ..., seq_len], or None
    max_span: int | None = None  # longest span handed to the kernel (None: whole chunks)

    @property
    def key(self) -> tuple:
        """Everything a plan depends on, hashable."""
        layout = self.layout
        return (layout.kind, layout.seq_len, layout.sp_size, self.doc_offsets, self.causal, self.max_span)


def rank_spans(spec: AttentionSpec, sp_ranks: Sequence[int]) -> tuple[Span, ...]:
    """Spans of the tokens of ``sp_ranks`` concatenated in that order (each rank in its local order)."""
    return _rank_spans(spec.key, tuple(sp_ranks))


def block_plan(spec: AttentionSpec, q_ranks: Sequence[int], k_ranks: Sequence[int]) -> Plan:
    """The non-empty (query span, key span) pairs, with their kinds, of the queries of ``q_ranks`` against the
    keys of ``k_ranks`` (each concatenated in that order). Cached: a plan is built once per key."""
    return _block_plan(spec.key, tuple(q_ranks), tuple(k_ranks))


@functools.lru_cache(maxsize=4096)
def _rank_spans(key: tuple, sp_ranks: tuple[int, ...]) -> tuple[Span, ...]:
    kind, seq_len, sp_size, doc_offsets, _, max_span = key
    layout = SequenceLayout(kind, seq_len, sp_size, 0)
    bounds = doc_offsets or (0, seq_len)
    spans = []
    for i, r in enumerate(sp_ranks):
        for chunk in layout.for_rank(r).local_chunks():
            # cut points inside the chunk: document starts, then tiles of at most max_span per document piece
            lo, hi = bisect.bisect_right(bounds, chunk.start), bisect.bisect_left(bounds, chunk.end)
            cuts = [chunk.start, *bounds[lo:hi], chunk.end]
            base = i * layout.local_len + chunk.local_start - chunk.start
            for start, end in zip(cuts[:-1], cuts[1:], strict=True):
                doc = bisect.bisect_right(bounds, start) - 1 if doc_offsets else 0
                step = max_span or end - start
                for tile in range(start, end, step):
                    length = min(step, end - tile)
                    spans.append(Span(base + tile, tile, length, doc))
    return tuple(spans)


@functools.lru_cache(maxsize=4096)
def _block_plan(key: tuple, q_ranks: tuple[int, ...], k_ranks: tuple[int, ...]) -> Plan:
    causal = key[4]
    plan = []
    for qs in _rank_spans(key, q_ranks):
        for ks in _rank_spans(key, k_ranks):
            kind = _pair_kind(qs, ks, causal)
            if kind is not BlockKind.EMPTY:
                plan.append((qs, ks, kind))
    return tuple(plan)


def _pair_kind(qs: Span, ks: Span, causal: bool) -> BlockKind:
    if qs.doc != ks.doc:
        return BlockKind.EMPTY
    if not causal or ks.end <= qs.start + 1:  # non-causal, or every key at or before the first query
        return BlockKind.FULL
    if ks.start >= qs.end:  # every key after the last query
        return BlockKind.EMPTY
    assert (qs.start, qs.length) == (ks.start, ks.length), f"spans overlap without being equal: {qs} {ks}"
    return BlockKind.CAUSAL


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
    plan: Plan,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """Accumulate attention of ``q`` over ``k``/``v`` for every pair of ``plan`` into ``(out, lse)`` in place."""
    for qs, ks, kind in plan:
        block_out, block_lse = spec.backend.forward(q[:, qs.local], k[:, ks.local], v[:, ks.local], kind, spec.scale)
        merge_attention_(out[:, qs.local], lse[:, :, qs.local], block_out, block_lse)


def attend_backward(
    spec: AttentionSpec,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    delta: torch.Tensor,
    plan: Plan,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Accumulate the gradients of every pair of ``plan`` into ``dq``, ``dk``, ``dv`` in place.

    ``out`` (may be None), ``lse`` and ``delta`` (``rowsum(dout * out)``) belong to the final output of the
    queries; each backend reads the one it needs.
    """
    for qs, ks, kind in plan:
        rows = qs.local
        dq_b, dk_b, dv_b = spec.backend.backward(
            dout[:, rows],
            q[:, rows],
            k[:, ks.local],
            v[:, ks.local],
            None if out is None else out[:, rows],
            lse[:, :, rows].contiguous(),
            kind,
            spec.scale,
            delta=delta[:, :, rows],
        )
        dq[:, rows] += dq_b
        dk[:, ks.local] += dk_b
        dv[:, ks.local] += dv_b
