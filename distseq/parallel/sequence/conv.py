"""A short causal depthwise convolution over a sequence sharded by a :class:`SequenceLayout`.

Linear-attention layers (and, optionally, softmax layers) mix each token with the few before it through a
depthwise convolution of width ``W`` (usually 4) on their q, k and v projections, as flash-linear-attention's
layers, Mamba2 and Gated DeltaNet do. Under sequence parallelism the first ``W - 1`` tokens of every chunk
need the last ``W - 1`` tokens of the chunk before it in sequence order, which another rank holds: each rank
all-gathers the tails of its chunks (``W - 1`` tokens each) and takes the one before each of its chunks. The
gather is differentiable (its backward reduce-scatters the tails' gradients to their owners).

Packed documents: a token never sees a token of an earlier document (the lags that would cross a document
start are masked; the masks come from the layout's integer offsets, so nothing is read back from the device).

Communication per rank and call: an all-gather of ``chunks x (W - 1)`` tokens, ``(P - 1) chunks (W - 1) B C s``
bytes sent forward and the same in the backward (``chunks`` = 1 contiguous, 2 zigzag; ``C`` channels, ``s``
bytes per element).
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


class _Windows(torch.autograd.Function):
    """Each local chunk after the ``halo`` tokens before it in sequence order (zeros before the first):
    ``[B, n, C]`` -> ``[B, chunks, halo + size, C]``. The tails come from one all-gather; the backward sends
    their gradients home with one reduce-scatter. One Function rather than an autograd all-gather, so that
    every rank runs the backward collective even where none of the gathered tails is used (rank 0's first
    chunk has none before it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: SequenceLayout, comm: Communicator, halo: int) -> torch.Tensor:
        chunks = layout.local_chunks()
        ctx.layout, ctx.comm, ctx.halo = layout, comm, halo
        tails = torch.cat([x[:, c.local_slice][:, -halo:] for c in chunks], dim=1)  # [B, chunks * halo, C]
        gathered = comm.all_gather(tails, dim=1) if comm.size > 1 else tails
        where = _tail_offsets(layout.kind, layout.sp_size, halo)
        zeros = x.new_zeros(x.shape[0], halo, x.shape[2])
        return torch.stack(
            [
                torch.cat(
                    [
                        zeros if c.index == 0 else gathered[:, where[c.index - 1] : where[c.index - 1] + halo],
                        x[:, c.local_slice],
                    ],
                    dim=1,
                )
                for c in chunks
            ],
            dim=1,
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layout, comm, halo = ctx.layout, ctx.comm, ctx.halo
        chunks = layout.local_chunks()
        batch, _, _, channels = grad.shape
        grad_x = grad[:, :, halo:].reshape(batch, layout.local_len, channels).clone()
        where = _tail_offsets(layout.kind, layout.sp_size, halo)
        grad_gathered = grad.new_zeros(batch, comm.size * len(chunks) * halo, channels)
        for i, c in enumerate(chunks):
            if c.index > 0:
                grad_gathered[:, where[c.index - 1] : where[c.index - 1] + halo] += grad[:, i, :halo]
        grad_tails = comm.reduce_scatter(grad_gathered, dim=1) if comm.size > 1 else grad_gathered
        for i, c in enumerate(chunks):
            grad_x[:, c.local_slice][:, -halo:] += grad_tails[:, i * halo : (i + 1) * halo]
        return grad_x, None, None, None


@functools.cache
def _tail_offsets(kind: str, sp_size: int, halo: int) -> dict[int, int]:
    """Offset of each global chunk's tail in the gathered tails (rank-major, chunks in local order)."""
    layout = SequenceLayout(kind, 2 * sp_size * max(halo, 1), sp_size, 0)
    offsets = {}
    for rank in range(sp_size):
        for i, index in enumerate(layout.chunk_indices_of(rank)):
            offsets[index] = (rank * len(layout.chunk_indices_of(rank)) + i) * halo
    return offsets


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
