"""A short causal depthwise convolution over a sequence sharded by a :class:`SequenceLayout`.

Linear-attention layers (and, optionally, softmax layers) mix each token with the few before it through a
depthwise convolution of width ``W`` (usually 4) on their q, k and v projections, as flash-linear-attention's
layers, Mamba2 and Gated DeltaNet do. Under sequence parallelism the first ``W - 1`` tokens of every chunk
need the last ``W - 1`` tokens of the chunk before it in sequence order, which another rank may hold: the
owner sends that tail (``W - 1`` tokens) straight to the rank holding the next chunk, one point-to-point message
per boundary between ranks, and the backward sends each halo's gradient back to the tail's owner.

Packed documents: a token never sees a token of an earlier document (the lags that would cross a document
start are masked; the masks come from the layout's integer offsets, so nothing is read back from the device).

Communication per rank and call: ``b (W - 1) B C s`` bytes, ``b`` the boundaries between this rank's chunks and
another rank's that the pass crosses (forward: its chunks whose next chunk another rank holds, sent, and whose
previous chunk another rank holds, received; the backward the other way round): on the contiguous layout 1 each
way (0 at the ends), on zigzag up to 2 (``C`` channels, ``s`` bytes per element).
"""

from __future__ import annotations

import functools

import torch

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout

__all__ = ["causal_conv", "causal_conv1d"]


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    comm: Communicator,
    layout: SequenceLayout,
    cu_seqlens: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """A depthwise causal conv1d over the sharded sequence, equal to the full-sequence
    ``F.conv1d(F.pad(x, (W - 1, 0)), weight[:, None], bias, groups=C)`` per document: ``x`` ``[B, n, C]`` this
    rank's tokens in ``layout``'s order, ``weight`` ``[C, W]``, ``cu_seqlens`` global document offsets (no token
    sees an earlier document). The halo (``W - 1`` tokens before each chunk) comes from the rank that holds it;
    the backward sends its gradient back. See :func:`causal_conv`."""
    return causal_conv(x, weight, layout.with_documents(cu_seqlens), comm, bias=bias)


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    layout: SequenceLayout,
    comm: Communicator,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[t] = bias + sum_j weight[:, W - 1 - j] * x[t - j]`` over ``j = 0 .. W-1`` and global positions
    ``t - j`` inside ``t``'s document (a ``torch.nn.Conv1d(C, C, W, groups=C, padding=W - 1)`` cut to the
    sequence length, per document).

    Args:
        x: ``[B, n, C]`` this rank's tokens in the layout's order.
        weight: ``[C, W]`` one filter per channel (the last tap multiplies the current token).
        layout: the sequence layout, with its documents if any.
        comm: the SP communicator (size ``layout.sp_size``).
        bias: ``[C]`` or None.
    """
    batch, tokens, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"causal_conv needs weight [C, W] with C={channels} channels, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"causal_conv needs bias [{channels}], got {tuple(bias.shape)}")
    if tokens != layout.local_len:
        raise ValueError(f"causal_conv expects {layout.local_len} local tokens (the layout's), got {tokens}")
    if comm.size != layout.sp_size:
        raise ValueError(f"causal_conv needs a communicator of size sp={layout.sp_size}, got {comm.size}")
    layout.require_uniform_chunks("causal_conv")
    halo = weight.shape[1] - 1
    if halo > layout.chunk_size:  # a chunk's tail is the whole halo of the chunk after it
        raise ValueError(
            f"causal_conv of width {halo + 1} needs chunks of at least {halo} tokens; this layout's chunks have "
            f"{layout.chunk_size} (seq_len={layout.seq_len}, sp={layout.sp_size}, {layout.kind})"
        )
    if halo == 0:
        out = x * weight[:, 0]
        return out if bias is None else out + bias
    size = layout.chunk_size
    windows = _Windows.apply(x, layout, comm, halo)  # [B, chunks, W - 1 + size, C]
    masks = _lag_masks(layout, halo, x.device, x.dtype)
    out = None
    for lag in range(halo + 1):
        term = windows[:, :, halo - lag : halo - lag + size] * weight[:, halo - lag]
        if lag and masks is not None:
            term = term * masks[lag - 1]
        out = term if out is None else out + term
    out = out.reshape(batch, tokens, channels)
    return out if bias is None else out + bias


def _boundaries(layout: SequenceLayout, rank: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The chunk boundaries of ``rank`` that cross to another rank: ``sends`` (local chunk ``c`` whose tail the
    owner of chunk ``c + 1`` needs) and ``receives`` (local chunk ``c`` whose halo is chunk ``c - 1``'s tail, held
    elsewhere), each as ``(global chunk, peer rank)``, in sequence order."""
    steps = layout.chunk_neighbours(rank)
    sends = [(c, after) for c, _, after in steps if after is not None and after != rank]
    receives = [(c, before) for c, before, _ in steps if before is not None and before != rank]
    return sends, receives


def _exchange(comm: Communicator, outgoing: list[tuple[torch.Tensor, int, int]], incoming: list[tuple[int, int]], like):
    """Post every one-sided send ``(tensor, peer, tag)`` and receive ``(peer, tag)`` (shaped ``like``), then wait;
    returns the received tensors by tag. Each crossing boundary carries one message per direction of the pass,
    tagged by the boundary (its later chunk), and both ends post in sequence order (NCCL matches by order)."""
    received = {tag: comm.send_recv(like, comm.rank - peer, tag=tag, send=False).commit() for peer, tag in incoming}
    sent = [comm.send_recv(t, peer - comm.rank, tag=tag, recv=False).commit() for t, peer, tag in outgoing]
    out = {tag: exchange.wait()[0] for tag, exchange in received.items()}
    for exchange in sent:
        exchange.wait()
    return out


class _Windows(torch.autograd.Function):
    """Each local chunk after the ``halo`` tokens before it in sequence order (zeros before the first):
    ``[B, n, C]`` -> ``[B, chunks, halo + size, C]``. A chunk's tail goes straight to the rank holding the chunk
    after it (one point-to-point message per boundary between ranks); the backward sends each halo's gradient
    back to the tail's owner the same way. One Function, so every rank runs the backward exchange even where
    its halos need no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: SequenceLayout, comm: Communicator, halo: int) -> torch.Tensor:
        chunks = layout.local_chunks()
        ctx.layout, ctx.comm, ctx.halo = layout, comm, halo
        by_index = {c.index: c for c in chunks}
        tail = lambda c: x[:, by_index[c].local_slice][:, -halo:].contiguous()  # noqa: E731
        sends, receives = _boundaries(layout, comm.rank)
        like = x.new_empty(x.shape[0], halo, x.shape[2])
        received = _exchange(comm, [(tail(c), peer, c + 1) for c, peer in sends], [(p, c) for c, p in receives], like)
        zeros = x.new_zeros(x.shape[0], halo, x.shape[2])

        def before(c: int) -> torch.Tensor:
            if c == 0:
                return zeros
            return tail(c - 1) if c - 1 in by_index else received[c]

        return torch.stack([torch.cat([before(c.index), x[:, c.local_slice]], dim=1) for c in chunks], dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layout, comm, halo = ctx.layout, ctx.comm, ctx.halo
        chunks = layout.local_chunks()
        batch, _, _, channels = grad.shape
        grad_x = grad[:, :, halo:].reshape(batch, layout.local_len, channels).clone()
        position = {c.index: i for i, c in enumerate(chunks)}
        sends, receives = _boundaries(layout, comm.rank)
        for c in chunks:  # halos taken from this rank's own previous chunk
            if c.index > 0 and c.index - 1 in position:
                grad_x[:, chunks[position[c.index - 1]].local_slice][:, -halo:] += grad[:, position[c.index], :halo]
        # the reverse pass: a halo's gradient to the tail's owner (tag: the boundary), received where tails left
        outgoing = [(grad[:, position[c], :halo].contiguous(), peer, c) for c, peer in receives]
        like = grad.new_empty(batch, halo, channels)
        returned = _exchange(comm, outgoing, [(peer, c + 1) for c, peer in sends], like)
        for c, _ in sends:
            grad_x[:, chunks[position[c]].local_slice][:, -halo:] += returned[c + 1]
        return grad_x, None, None, None


def _lag_masks(layout: SequenceLayout, halo: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """``[halo, 1, chunks, size, 1]``: 1 where lag ``j + 1`` stays inside the token's document, else 0; None
    without documents (the zero halo of the first chunk already covers the sequence start)."""
    if layout.doc_offsets is None:
        return None
    masks = _lag_masks_cached(layout.kind, layout.seq_len, layout.sp_size, layout.sp_rank, layout.doc_offsets, halo)
    return masks.to(device=device, dtype=dtype, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _lag_masks_cached(
    kind: str, seq_len: int, sp_size: int, sp_rank: int, doc_offsets: tuple[int, ...], halo: int
) -> torch.Tensor:
    layout = SequenceLayout(kind, seq_len, sp_size, sp_rank, doc_offsets)
    positions = torch.stack([torch.arange(c.start, c.end) for c in layout.local_chunks()])  # [chunks, size]
    offsets = torch.tensor(doc_offsets)
    starts = offsets[torch.searchsorted(offsets, positions, right=True) - 1]  # each token's document start
    lags = torch.arange(1, halo + 1)[:, None, None]
    return (positions[None] - lags >= starts[None]).float()[:, None, :, :, None]
