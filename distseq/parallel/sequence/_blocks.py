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
Where the backend has a varlen entry (flash attention on CUDA), consecutive pairs of one kind whose query spans
and key spans each lie back to back (e.g. the diagonal blocks of many short documents) run as one call.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distseq.kernels.attention import BlockKind, accumulation_dtype, attention_delta
from distseq.kernels.attention.backends import AttentionBackend, VarlenPieces
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
    layout = SequenceLayout(kind, seq_len, sp_size, 0, doc_offsets)  # document_zigzag chunks by documents
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


def _coalesced(spans: tuple[Span, ...], max_span: int | None) -> tuple[Span, ...]:
    """Join spans that continue each other in memory, in positions and in one document (up to ``max_span``)."""
    joined: list[Span] = []
    for span in spans:
        last = joined[-1] if joined else None
        if (
            last is not None
            and span.offset == last.offset + last.length
            and span.start == last.end
            and span.doc == last.doc
            and (max_span is None or last.length + span.length <= max_span)
        ):
            joined[-1] = Span(last.offset, last.start, last.length + span.length, last.doc)
        else:
            joined.append(span)
    return tuple(joined)


@functools.lru_cache(maxsize=4096)
def _block_plan(key: tuple, q_ranks: tuple[int, ...], k_ranks: tuple[int, ...]) -> Plan:
    causal = key[4]
    q_spans, k_spans = _rank_spans(key, q_ranks), _rank_spans(key, k_ranks)
    if q_ranks == k_ranks:
        # Queries and keys are the same tokens (Ulysses): chunks that continue each other are one span on both
        # sides (the contiguous layout's whole sequence is one causal block), so spans stay equal or disjoint.
        q_spans = k_spans = _coalesced(q_spans, key[5])
    plan = []
    for qs in q_spans:
        for ks in k_spans:
            kind = _pair_kind(qs, ks, causal)
            if kind is not BlockKind.EMPTY:
                plan.append((qs, ks, kind))
    return tuple(plan)


def _pair_kind(qs: Span, ks: Span, causal: bool) -> BlockKind:
    if qs.doc != ks.doc:
        return BlockKind.EMPTY
    if not causal:
        return BlockKind.FULL
    if (qs.start, qs.length) == (ks.start, ks.length):  # the diagonal (also of one token: runs stay whole)
        return BlockKind.CAUSAL
    if ks.end <= qs.start + 1:  # every key at or before the first query
        return BlockKind.FULL
    assert ks.start >= qs.end, f"spans overlap without being equal: {qs} {ks}"
    return BlockKind.EMPTY  # every key after the last query


@dataclass(frozen=True)
class Run:
    """Consecutive plan pairs of one kind whose query spans, and whose key spans, lie back to back: piece ``i``
    of the queries attends piece ``i`` of the keys. One varlen kernel call."""

    pairs: tuple[tuple[Span, Span, BlockKind], ...]

    @property
    def q(self) -> slice:
        return slice(self.pairs[0][0].offset, self.pairs[-1][0].offset + self.pairs[-1][0].length)

    @property
    def k(self) -> slice:
        return slice(self.pairs[0][1].offset, self.pairs[-1][1].offset + self.pairs[-1][1].length)

    @property
    def causal(self) -> bool:
        return self.pairs[0][2] is BlockKind.CAUSAL


@functools.lru_cache(maxsize=4096)
def varlen_runs(plan: Plan) -> tuple[Run, ...]:
    """``plan`` cut into :class:`Run` s: pairs of each kind in query order, joined while both sides stay back to
    back (merges commute, so the order of the plan does not matter)."""
    runs: list[list] = []
    for kind in (BlockKind.CAUSAL, BlockKind.FULL):
        start = len(runs)
        for pair in sorted((p for p in plan if p[2] is kind), key=lambda p: (p[0].offset, p[1].offset)):
            if len(runs) > start:
                last_q, last_k, _ = runs[-1][-1]
                qs, ks, _ = pair
                if qs.offset == last_q.offset + last_q.length and ks.offset == last_k.offset + last_k.length:
                    runs[-1].append(pair)
                    continue
            runs.append([pair])
    return tuple(Run(tuple(r)) for r in runs)


@functools.lru_cache(maxsize=4096)
def _pieces(run: Run, batch: int, device: torch.device) -> VarlenPieces:
    """Piece boundaries of ``run`` with the batch folded into the tokens (row ``b`` after row ``b - 1``)."""

    def offsets(lengths: list[int]) -> torch.Tensor:
        cu = [0]
        for n in lengths * batch:
            cu.append(cu[-1] + n)
        return torch.tensor(cu, dtype=torch.int32, device=device)

    q_lengths = [qs.length for qs, _, _ in run.pairs]
    k_lengths = [ks.length for _, ks, _ in run.pairs]
    return VarlenPieces(offsets(q_lengths), offsets(k_lengths), max(q_lengths), max(k_lengths))


def _fold(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, ...]`` -> ``[B * T, ...]`` (a view when B == 1)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def new_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(out, lse)`` accumulators for ``q`` ``[B, T, H, D]``: zeros and ``-inf``, fp32 (fp64 for fp64)."""
    dtype = accumulation_dtype(q.dtype)
    batch, tokens, heads, dim = q.shape
    return (
        torch.zeros(batch, tokens, heads, dim, dtype=dtype, device=q.device),
        torch.full((batch, heads, tokens), float("-inf"), dtype=dtype, device=q.device),
    )


def single_block(plan: Plan, q_len: int, k_len: int) -> tuple[Span, Span, BlockKind] | None:
    """The plan's one pair when it covers all ``q_len`` queries and ``k_len`` keys (the kernel's own outputs are
    then the results: no accumulators to fill or merge into), else None."""
    if len(plan) != 1:
        return None
    qs, ks, _ = plan[0]
    return plan[0] if (qs.offset, qs.length, ks.offset, ks.length) == (0, q_len, 0, k_len) else None


def attend(
    spec: AttentionSpec,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    fresh: bool = False,
) -> None:
    """Accumulate attention of ``q`` over ``k``/``v`` for every pair of ``plan`` into ``(out, lse)`` in place.

    ``fresh``: the accumulators hold nothing yet (zeros and -inf), so the first block of each query span is
    copied in rather than merged.
    """
    backend = spec.backend
    written: set[int] = set() if fresh else {qs.offset for qs, _, _ in plan}

    def accumulate(spans, rows: slice, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
        offsets = {qs.offset for qs in spans}
        if written.isdisjoint(offsets):
            out[:, rows].copy_(block_out)
            lse[:, :, rows].copy_(block_lse)
        else:
            merge_attention_(out[:, rows], lse[:, :, rows], block_out, block_lse)
        written.update(offsets)

    if not backend.varlen(q.device):
        for qs, ks, kind in plan:
            block_out, block_lse = backend.forward(q[:, qs.local], k[:, ks.local], v[:, ks.local], kind, spec.scale)
            accumulate([qs], qs.local, block_out, block_lse)
        return
    batch, heads = q.shape[0], q.shape[2]
    for run in varlen_runs(plan):
        rows, keys = run.q, run.k
        pieces = _pieces(run, batch, q.device)
        folded = [_fold(x) for x in (q[:, rows], k[:, keys], v[:, keys])]
        run_out, run_lse = backend.forward_varlen(*folded, pieces, run.causal, spec.scale)  # [B*L, H, D], [H, B*L]
        length = rows.stop - rows.start
        run_lse = run_lse.view(heads, batch, length).transpose(0, 1)
        accumulate([qs for qs, _, _ in run.pairs], rows, run_out.view(batch, length, *run_out.shape[1:]), run_lse)


def attend_backward(
    spec: AttentionSpec,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor,
    delta: torch.Tensor | None,
    plan: Plan,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Accumulate the gradients of every pair of ``plan`` into ``dq``, ``dk``, ``dv`` in place.

    ``out``, ``lse`` and ``delta`` (``rowsum(dout * out)``) belong to the final output of the queries; either
    ``out`` or ``delta`` may be None, and each backend reads the one it needs (``delta`` is computed here once
    when the backend wants it and only ``out`` is given).
    """
    backend = spec.backend
    if delta is None and backend.uses_delta:
        delta = attention_delta(dout, out)
    if backend.varlen(q.device):
        _attend_backward_varlen(spec, dout, q, k, v, out, lse, delta, plan, dq, dk, dv)
        return
    for qs, ks, kind in plan:
        rows = qs.local
        dq_b, dk_b, dv_b = backend.backward(
            dout[:, rows],
            q[:, rows],
            k[:, ks.local],
            v[:, ks.local],
            None if out is None else out[:, rows],
            lse[:, :, rows].contiguous(),
            kind,
            spec.scale,
            delta=None if delta is None else delta[:, :, rows],
        )
        dq[:, rows] += dq_b
        dk[:, ks.local] += dk_b
        dv[:, ks.local] += dv_b


def _attend_backward_varlen(spec, dout, q, k, v, out, lse, delta, plan, dq, dk, dv) -> None:
    batch, heads = q.shape[0], q.shape[2]

    def tokens_last(x: torch.Tensor) -> torch.Tensor:  # [B, H, L] -> [H, B * L]
        return x.transpose(0, 1).reshape(heads, -1)

    for run in varlen_runs(plan):
        rows, keys = run.q, run.k
        dq_r, dk_r, dv_r = spec.backend.backward_varlen(
            _fold(dout[:, rows]),
            _fold(q[:, rows]),
            _fold(k[:, keys]),
            _fold(v[:, keys]),
            None if out is None else _fold(out[:, rows]),
            tokens_last(lse[:, :, rows]),
            _pieces(run, batch, q.device),
            run.causal,
            spec.scale,
            delta=None if delta is None else tokens_last(delta[:, :, rows]),
        )
        dq[:, rows] += dq_r.view(batch, -1, *dq_r.shape[1:])
        dk[:, keys] += dk_r.view(batch, -1, *dk_r.shape[1:])
        dv[:, keys] += dv_r.view(batch, -1, *dv_r.shape[1:])
