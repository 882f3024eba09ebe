"""SequenceLayout: which global tokens each sequence-parallel rank holds.

The layout is model-wide: every strategy, softmax or linear, reads the same object, so a hybrid model
never permutes tokens between layers.

* ``contiguous``: the sequence is cut into ``P`` chunks; rank ``r`` holds chunk ``r``.
* ``zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks ``r`` and ``2P-1-r`` (in
  that order), which balances causal attention work across ranks.
* ``document_zigzag``: with packed documents, *each document* is cut into ``2P`` chunks and rank ``r`` holds
  chunks ``r`` and ``2P-1-r`` of every document, documents in order (Megatron-Core's split of packed THD
  batches); every document's length must divide by ``2P``. Without documents it is ``zigzag``. Chunks differ
  in size, so only the softmax strategies (which plan from chunk spans) accept it.

Everything here is pure rank arithmetic except :meth:`SequenceLayout.gather`, which all-gathers through
a Communicator.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distseq.parallel.comm import Communicator

__all__ = ["Chunk", "LayoutKind", "SequenceLayout"]


class LayoutKind(StrEnum):
    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"
    DOCUMENT_ZIGZAG = "document_zigzag"


@dataclass(frozen=True)
class Chunk:
    """One run of consecutive global tokens held by a rank."""

    index: int  # global chunk index, 0 .. num_chunks-1 in sequence order
    start: int  # first global position
    end: int  # one past the last global position
    local_start: int  # offset of the chunk inside the rank's local tokens

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def local_slice(self) -> slice:
        return slice(self.local_start, self.local_start + self.size)


def _document_offsets(cu_seqlens: torch.Tensor | Sequence[int], seq_len: int) -> tuple[int, ...]:
    """Validated global document offsets as Python ints.

    Plans are built from these integers, never from device values. A tensor is read once here with
    ``tolist()``: free for a list or a CPU tensor; a CUDA tensor costs one device-to-host copy, so pass
    ``cu_seqlens`` from the host (the data loader has them there).
    """
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.is_complex():
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor of document offsets [0, ..., seq_len], got "
                f"shape={tuple(cu_seqlens.shape)} dtype={cu_seqlens.dtype}"
            )
        offsets = cu_seqlens.tolist()
    else:
        offsets = list(cu_seqlens)
    if len(offsets) < 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets):
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor or list of document offsets [0, ..., seq_len], got {offsets}"
        )
    if offsets[0] != 0 or offsets[-1] != seq_len:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at seq_len={seq_len}, got first={offsets[0]} last={offsets[-1]}"
        )
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        if b <= a:
            raise ValueError(
                f"cu_seqlens must be strictly increasing (no empty documents), got {a} then {b} at index {i}"
            )
    return tuple(offsets)


def _pairs_within(offsets: Sequence[int], start: int, end: int) -> int:
    """Causal pairs of the positions ``[start, end)`` with each other, document by document."""
    total, doc = 0, bisect_right(offsets, start) - 1
    while offsets[doc] < end:
        length = min(end, offsets[doc + 1]) - max(start, offsets[doc])
        total += length * (length + 1) // 2
        doc += 1
    return total


class SequenceLayout:
    """The tokens of a ``seq_len``-token sequence held by ``sp_rank`` of ``sp_size`` ranks.

    Args:
        kind: ``"contiguous"``, ``"zigzag"`` or ``"document_zigzag"``.
        seq_len: global sequence length ``N``; divisible by ``P`` (contiguous) or ``2P`` (zigzag; for
            document_zigzag every document's length).
        sp_size: number of sequence-parallel ranks ``P``.
        sp_rank: this rank, ``0 <= sp_rank < P``.
        cu_seqlens: optional global document offsets ``[0, ..., N]`` for packed documents.
    """

    def __init__(
        self,
        kind: str | LayoutKind,
        seq_len: int,
        sp_size: int,
        sp_rank: int,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ):
        try:
            self.kind = LayoutKind(kind)
        except ValueError:
            raise ValueError(f"unknown layout kind {kind!r}; choose one of {[k.value for k in LayoutKind]}") from None
        if sp_size < 1:
            raise ValueError(f"sp_size must be >= 1, got {sp_size}")
        if not 0 <= sp_rank < sp_size:
            raise ValueError(f"sp_rank must be in [0, {sp_size}), got {sp_rank}")
        self.num_chunks = sp_size if self.kind is LayoutKind.CONTIGUOUS else 2 * sp_size
        if seq_len < 1 or seq_len % self.num_chunks:
            raise ValueError(
                f"{self.kind.value} layout needs seq_len divisible by {self.num_chunks} "
                f"({'sp' if self.kind is LayoutKind.CONTIGUOUS else '2*sp'}): seq_len={seq_len}, sp={sp_size}"
            )
        self.seq_len = seq_len
        self.sp_size = sp_size
        self.sp_rank = sp_rank
        self.chunk_size = seq_len // self.num_chunks
        self.local_len = seq_len // sp_size
        #: global document offsets as Python ints (plans are built from these), or None
        self.doc_offsets = None if cu_seqlens is None else _document_offsets(cu_seqlens, seq_len)
        if self.kind is LayoutKind.DOCUMENT_ZIGZAG and self.doc_offsets is not None:
            lengths = [b - a for a, b in zip(self.doc_offsets[:-1], self.doc_offsets[1:], strict=True)]
            uneven = [(i, n) for i, n in enumerate(lengths) if n % (2 * sp_size)]
            if uneven:
                raise ValueError(
                    f"document_zigzag layout needs every document's length divisible by 2*sp = {2 * sp_size} "
                    f"(pad the documents, as Megatron's cu_seqlens_padded do): (document, length) {uneven[:4]}"
                )
            if len(lengths) > 1:  # one document is the zigzag layout
                self.num_chunks = 2 * sp_size * len(lengths)
                self.chunk_size = None  # chunks differ in size (and documents interleave ranks)

    @property
    def uniform_chunks(self) -> bool:
        """Whether the layout is ``2P`` (or ``P``) chunks of ``chunk_size`` tokens: all kinds but ``document_zigzag``
        with several documents."""
        return self.chunk_size is not None

    def require_uniform_chunks(self, what: str) -> None:
        """ValueError unless every chunk has one size: ``what`` (a linear strategy, a convolution) needs it."""
        if not self.uniform_chunks:
            raise ValueError(
                f"{what} needs the sequence in 2P (or P) chunks of one size; the {self.kind.value} layout with "
                f"{len(self.doc_offsets) - 1} documents cuts each one (only softmax attention runs on it)"
            )

    @property
    def cu_seqlens(self) -> torch.Tensor | None:
        """Global document offsets ``[num_docs + 1]`` int64 on the CPU, or None without documents."""
        return None if self.doc_offsets is None else torch.tensor(self.doc_offsets, dtype=torch.int64)

    def __repr__(self) -> str:
        docs = "" if self.doc_offsets is None else f", documents={len(self.doc_offsets) - 1}"
        return (
            f"SequenceLayout({self.kind.value!r}, seq_len={self.seq_len}, sp_size={self.sp_size}, "
            f"sp_rank={self.sp_rank}{docs})"
        )

    def with_documents(self, cu_seqlens: torch.Tensor | Sequence[int] | None) -> SequenceLayout:
        """This layout with packed documents ``cu_seqlens`` (global offsets); ``None`` keeps it as it is.

        A layout built with documents only accepts the same documents again.
        """
        if cu_seqlens is None:
            return self
        offsets = _document_offsets(cu_seqlens, self.seq_len)
        if self.doc_offsets is not None:
            if offsets != self.doc_offsets:
                raise ValueError(
                    f"cu_seqlens {list(offsets)} differs from the documents the layout was built with "
                    f"{list(self.doc_offsets)}"
                )
            return self
        return SequenceLayout(self.kind, self.seq_len, self.sp_size, self.sp_rank, offsets)

    def for_rank(self, sp_rank: int) -> SequenceLayout:
        """The same layout seen from another rank."""
        return SequenceLayout(self.kind, self.seq_len, self.sp_size, sp_rank, self.doc_offsets)

    def chunk_indices_of(self, sp_rank: int) -> list[int]:
        if self.kind is LayoutKind.CONTIGUOUS:
            return [sp_rank]
        pair = [sp_rank, 2 * self.sp_size - 1 - sp_rank]
        if self.kind is LayoutKind.ZIGZAG or self.doc_offsets is None:
            return pair
        return [2 * self.sp_size * doc + c for doc in range(len(self.doc_offsets) - 1) for c in pair]

    def chunk_owners(self) -> list[int]:
        """The sp rank holding each global chunk, in sequence order."""
        owner = [0] * self.num_chunks
        for rank in range(self.sp_size):
            for c in self.chunk_indices_of(rank):
                owner[c] = rank
        return owner

    def chunk_neighbours(self, sp_rank: int) -> list[tuple[int, int | None, int | None]]:
        """The chunks of ``sp_rank`` in sequence order, each as ``(chunk, owner of the chunk before, owner of the
        chunk after)`` (None at the sequence's ends): where the chains of LASP-1 and All-Scan and the convolution
        halos cross from one rank to another."""
        owner, last = self.chunk_owners(), self.num_chunks - 1
        return [
            (c, owner[c - 1] if c > 0 else None, owner[c + 1] if c < last else None)
            for c in sorted(self.chunk_indices_of(sp_rank))
        ]

    def causal_pairs(self, q_rank: int, k_rank: int) -> int:
        """Causal query-key pairs ``k <= q`` inside one document with ``q`` held by ``q_rank`` and ``k`` by
        ``k_rank``: the attention work of the one rank's queries against the other's keys (a document of ``L``
        tokens has ``L (L + 1) / 2`` in all). From the chunk spans and document offsets alone."""
        offsets = self.doc_offsets or (0, self.seq_len)
        total = 0
        for q_chunk in self.chunk_indices_of(q_rank):
            q_start, q_end = self._chunk_span(q_chunk)
            for k_chunk in self.chunk_indices_of(k_rank):
                k_start, k_end = self._chunk_span(k_chunk)
                if k_chunk == q_chunk:
                    total += _pairs_within(offsets, q_start, q_end)
                elif k_end <= q_start:
                    # Only the document holding the first query can reach back into an earlier chunk.
                    doc = bisect_right(offsets, q_start) - 1
                    if offsets[doc] < k_end:
                        keys = k_end - max(k_start, offsets[doc])
                        total += keys * (min(q_end, offsets[doc + 1]) - q_start)
        return total

    def chunks(self) -> list[int]:
        """Global chunk indices held by this rank, in local order."""
        return self.chunk_indices_of(self.sp_rank)

    def local_chunks(self) -> list[Chunk]:
        """This rank's chunks with their global spans and local offsets."""
        chunks, local_start = [], 0
        for c in self.chunks():
            start, end = self._chunk_span(c)
            chunks.append(Chunk(index=c, start=start, end=end, local_start=local_start))
            local_start += end - start
        return chunks

    def _chunk_span(self, index: int) -> tuple[int, int]:
        """Global ``[start, end)`` of chunk ``index`` (in sequence order)."""
        if self.uniform_chunks:
            return index * self.chunk_size, (index + 1) * self.chunk_size
        doc, c = divmod(index, 2 * self.sp_size)
        first, last = self.doc_offsets[doc], self.doc_offsets[doc + 1]
        size = (last - first) // (2 * self.sp_size)
        return first + c * size, first + (c + 1) * size

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Global position of each local token, ``[local_len]`` int64 (RoPE position ids)."""
        return torch.cat([torch.arange(c.start, c.end, device=device) for c in self.local_chunks()])

    def global_order(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions of the tokens of ranks ``0 .. P-1`` concatenated, ``[seq_len]``."""
        return torch.cat([self.for_rank(r).positions(device) for r in range(self.sp_size)])

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of the full-sequence tensor ``x`` (sequence along ``dim``)."""
        dim = dim % x.dim()
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"shard expects {self.seq_len} tokens along dim {dim}, got shape {tuple(x.shape)}")
        return torch.cat([x.narrow(dim, c.start, c.size) for c in self.local_chunks()], dim=dim)

    def unshard(self, shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """Rebuild the full sequence from every rank's local tensor (rank order), inverse of :meth:`shard`."""
        if len(shards) != self.sp_size:
            raise ValueError(f"unshard needs {self.sp_size} shards, got {len(shards)}")
        dim = dim % shards[0].dim()
        pieces: list[torch.Tensor | None] = [None] * self.num_chunks
        for r, local in enumerate(shards):
            if local.shape[dim] != self.local_len:
                raise ValueError(
                    f"rank {r} shard has {local.shape[dim]} tokens along dim {dim}, expected {self.local_len}"
                )
            for c in self.for_rank(r).local_chunks():
                pieces[c.index] = local.narrow(dim, c.local_start, c.size)
        return torch.cat(pieces, dim=dim)

    def gather(self, x_local: torch.Tensor, comm: Communicator, dim: int = 1) -> torch.Tensor:
        """All-gather every rank's tokens over ``comm`` and return the full sequence in natural order."""
        if comm.size != self.sp_size:
            raise ValueError(f"gather needs a communicator of size sp={self.sp_size}, got {comm.size}")
        dim = dim % x_local.dim()
        if x_local.shape[dim] != self.local_len:
            raise ValueError(
                f"gather expects {self.local_len} local tokens along dim {dim}, got shape {tuple(x_local.shape)}"
            )
        gathered = comm.all_gather(x_local, dim)
        return self.unshard(gathered.split(self.local_len, dim=dim), dim)

    def document_ids(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Document index of each local token, ``[local_len]`` int64, or None without ``cu_seqlens``."""
        if self.doc_offsets is None:
            return None
        pos = self.positions()
        return (torch.searchsorted(self.cu_seqlens, pos, right=True) - 1).to(device)

    def document_starts(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Bool ``[local_len]``: True where a local token begins a document (state resets there)."""
        if self.doc_offsets is None:
            return None
        local = [
            c.local_start + start - c.start
            for c in self.local_chunks()
            for start in self.doc_offsets[:-1]
            if c.start <= start < c.end
        ]
        starts = torch.zeros(self.local_len, dtype=torch.bool)
        starts[local] = True
        return starts.to(device)
