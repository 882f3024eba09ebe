"""SequenceLayout: which global tokens each sequence-parallel rank holds.

The layout is model-wide: every strategy, softmax or linear, reads the same object, so a hybrid model
never permutes tokens between layers.

* ``contiguous``: the sequence is cut into ``P`` chunks; rank ``r`` holds chunk ``r``.
* ``zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks ``r`` and ``2P-1-r`` (in
  that order), which balances causal attention work across ranks.

Everything here is pure rank arithmetic except :meth:`SequenceLayout.gather`, which all-gathers through
a Communicator.
"""

from __future__ import annotations

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


def _validate_cu_seqlens(cu_seqlens: torch.Tensor | Sequence[int], seq_len: int) -> torch.Tensor:
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point() or cu.is_complex():
        raise ValueError(
            f"cu_seqlens must be a 1-D integer tensor of document offsets [0, ..., seq_len], got "
            f"shape={tuple(cu.shape)} dtype={cu.dtype}"
        )
    cu = cu.to(device="cpu", dtype=torch.int64)
    if cu[0].item() != 0 or cu[-1].item() != seq_len:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at seq_len={seq_len}, got first={cu[0].item()} last={cu[-1].item()}"
        )
    steps = cu[1:] - cu[:-1]
    if (steps <= 0).any():
        bad = int(torch.nonzero(steps <= 0)[0].item())
        raise ValueError(
            f"cu_seqlens must be strictly increasing (no empty documents), got {cu[bad].item()} "
            f"then {cu[bad + 1].item()} at index {bad}"
        )
    return cu


class SequenceLayout:
    """The tokens of a ``seq_len``-token sequence held by ``sp_rank`` of ``sp_size`` ranks.

    Args:
        kind: ``"contiguous"`` or ``"zigzag"``.
        seq_len: global sequence length ``N``; divisible by ``P`` (contiguous) or ``2P`` (zigzag).
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
        self.cu_seqlens = None if cu_seqlens is None else _validate_cu_seqlens(cu_seqlens, seq_len)

    def __repr__(self) -> str:
        docs = "" if self.cu_seqlens is None else f", documents={self.cu_seqlens.numel() - 1}"
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
        cu = _validate_cu_seqlens(cu_seqlens, self.seq_len)
        if self.cu_seqlens is not None:
            if not torch.equal(cu, self.cu_seqlens):
                raise ValueError(
                    f"cu_seqlens {cu.tolist()} differs from the documents the layout was built with "
                    f"{self.cu_seqlens.tolist()}"
                )
            return self
        return SequenceLayout(self.kind, self.seq_len, self.sp_size, self.sp_rank, cu)

    def for_rank(self, sp_rank: int) -> SequenceLayout:
        """The same layout seen from another rank."""
        return SequenceLayout(self.kind, self.seq_len, self.sp_size, sp_rank, self.cu_seqlens)

    def chunk_indices_of(self, sp_rank: int) -> list[int]:
        if self.kind is LayoutKind.CONTIGUOUS:
            return [sp_rank]
        return [sp_rank, 2 * self.sp_size - 1 - sp_rank]

    def chunks(self) -> list[int]:
        """Global chunk indices held by this rank, in local order."""
        return self.chunk_indices_of(self.sp_rank)

    def local_chunks(self) -> list[Chunk]:
        """This rank's chunks with their global spans and local offsets."""
        return [
            Chunk(
                index=c,
                start=c * self.chunk_size,
                end=(c + 1) * self.chunk_size,
                local_start=i * self.chunk_size,
            )
            for i, c in enumerate(self.chunks())
        ]

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
        if self.cu_seqlens is None:
            return None
        pos = self.positions()
        return (torch.searchsorted(self.cu_seqlens, pos, right=True) - 1).to(device)

    def document_starts(self, device: torch.device | str | None = None) -> torch.Tensor | None:
        """Bool ``[local_len]``: True where a local token begins a document (state resets there)."""
        if self.cu_seqlens is None:
            return None
        starts = torch.zeros(self.seq_len, dtype=torch.bool)
        starts[self.cu_seqlens[:-1]] = True
        return starts[self.positions()].to(device)
