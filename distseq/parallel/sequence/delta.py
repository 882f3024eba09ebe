"""The gated delta rule across sequence shards, LASP-2 style: one all-gather of chunk summaries.

Every rank summarises each chunk it holds as an affine map of the state entering it, ``S_out = M S_in + N``
(``M`` ``K x K``, ``N`` ``K x V``, fp32; ``distseq.kernels.delta_rule``), together with the outputs from a zero
state and the effective queries (``o = o^0 + q~ S_in``). One all-gather moves every chunk's ``(M, N)`` to every
rank; each rank composes the maps of the chunks before each of its own (a short scan in global chunk order, so
the zigzag layout needs no permutation) and adds ``q~ S_in``. Documents need nothing more: a chunk holding a
document start has ``M = 0`` for everything before it.

Gradients come from autograd through the local pieces and the collective, whose backward is one
reduce-scatter of the summaries' gradients. Communication per rank (``nc`` chunks per rank, 1 contiguous, 2
zigzag; ``a`` bytes per accumulation element, 4 or 8): forward all-gather ``(P-1) nc B H K (K + V) a``,
backward reduce-scatter the same; independent of the sequence length.
"""

from __future__ import annotations

import torch

from distseq.kernels.delta_rule import delta_rule_blocks, fla_delta_rule_blocks
from distseq.kernels.linear_attention._gates import split_log_gate
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._linear import global_order
from distseq.parallel.sequence.allscan import ScanRule, post_receives, scan_states

__all__ = ["delta_rule_exchange"]


def _scan(layout: SequenceLayout, gathered: torch.Tensor, key_dim: int) -> torch.Tensor:
    """The state entering each of this rank's chunks ``[nc, B, H, K, V]`` from every chunk's summary (rows of the
    all-gather, rank by rank): ``S_0 = 0``, ``S_{c+1} = M_c S_c + N_c`` in global chunk order."""
    ordered = global_order(layout, gathered)  # [all chunks, B, H, K, K + V]
    incoming = [ordered.new_zeros(*ordered.shape[1:-1], ordered.shape[-1] - key_dim)]
    for summary in ordered.unbind(0)[: max(layout.chunks())]:
        m, n = summary.split([key_dim, summary.shape[-1] - key_dim], dim=-1)
        incoming.append(m @ incoming[-1] + n)
    return torch.stack([incoming[c] for c in layout.chunks()])


class _IncomingStates(torch.autograd.Function):
    """This rank's chunk summaries -> the states entering its chunks: forward one all-gather, backward one
    reduce-scatter of the summaries' gradients. Every rank takes part in both, also one whose chunks need no
    earlier chunk (rank 0 on the contiguous layout), which plain autograd through the all-gather would skip."""

    @staticmethod
    def forward(ctx, summaries, comm: Communicator, layout: SequenceLayout, key_dim: int):
        gathered = comm.all_gather(summaries, dim=0)
        ctx.save_for_backward(gathered)
        ctx.comm, ctx.layout, ctx.key_dim = comm, layout, key_dim
        return _scan(layout, gathered, key_dim)

    @staticmethod
    def backward(ctx, d_incoming):
        (gathered,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gathered.detach().requires_grad_()
            incoming = _scan(ctx.layout, leaf, ctx.key_dim)
        if incoming.requires_grad:
            (d_gathered,) = torch.autograd.grad(incoming, leaf, d_incoming, materialize_grads=True)
        else:  # every local chunk starts the sequence
            d_gathered = torch.zeros_like(gathered)
        return ctx.comm.reduce_scatter(d_gathered, dim=0), None, None, None


def delta_rule_exchange(
    comm: Communicator,
    layout: SequenceLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_gate: torch.Tensor | None,
    *,
    chunk_size: int,
    backend: str = "torch",
    exchange: str = "allgather",
    block: int | None = None,
) -> torch.Tensor:
    """``o`` ``[B, n, H, V]`` of this rank's tokens (inputs in the accumulation dtype, validated; ``layout`` with
    the call's documents; ``log_gate`` ``[B, n, H]`` with ``-inf`` at resets, or None). ``backend``: the local
    step, ``torch`` (:func:`delta_rule_blocks`) or ``fla`` (:func:`fla_delta_rule_blocks`). ``exchange``: how the
    summaries travel, ``allgather`` (LASP-2) or ``scan`` (All-Scan's pipelined chain, ``block`` columns per piece)."""
    batch, tokens, heads, key_dim = q.shape
    num_chunks = len(layout.chunks())
    fold = lambda x: x.reshape(batch * num_chunks, tokens // num_chunks, *x.shape[2:])  # noqa: E731
    if log_gate is None:
        g, reset = q.new_zeros(q.shape[:3]), torch.zeros(q.shape[:3], dtype=torch.bool, device=q.device)
    else:
        g, reset = split_log_gate(log_gate)
    if backend == "fla":
        _check_resets_are_documents(layout, reset)
        maps, adds, outputs = fla_delta_rule_blocks(*(fold(x) for x in (q, k, v, beta, g)), _row_resets(layout, batch))
    else:
        out0, q_eff, maps, adds = delta_rule_blocks(
            *(fold(x) for x in (q, k, v, beta, g, reset)), chunk_size=chunk_size
        )
        outputs = lambda incoming: out0 + torch.einsum("bthk,bhkv->bthv", q_eff, incoming)  # noqa: E731

    by_chunk = lambda x: x.unflatten(0, (batch, num_chunks)).movedim(1, 0)  # noqa: E731  [nc, B, H, ...]
    if exchange == "scan":
        maps, adds = by_chunk(maps), by_chunk(adds)
        pending = post_receives(comm, layout, ScanRule("affine", maps, adds, block), backward=False)
        local_in = scan_states(comm, layout, "affine", maps, adds, block, pending)
    else:
        summaries = torch.cat([by_chunk(maps), by_chunk(adds)], dim=-1)  # [nc, B, H, K, K + V]
        local_in = _IncomingStates.apply(summaries, comm, layout, key_dim)  # [nc, B, H, K, V]
    out = outputs(local_in.movedim(0, 1).flatten(0, 1))  # rows b * nc + c
    return out.reshape(batch, tokens, heads, v.shape[3])


def _row_resets(layout: SequenceLayout, batch: int) -> list[tuple[int, ...]]:
    """Per folded row (``b * nc + c``): the offsets of the document starts inside local chunk ``c``."""
    starts = layout.doc_offsets[:-1] if layout.doc_offsets else ()
    per_chunk = [tuple(s - c.start for s in starts if c.start <= s < c.end) for c in layout.local_chunks()]
    return per_chunk * batch


def _check_resets_are_documents(layout: SequenceLayout, reset: torch.Tensor) -> None:
    """The fla step resets the state at document starts only; a ``-inf`` gate elsewhere is refused (one read
    back from the device, on this opt-in GPU path)."""
    starts = layout.document_starts(reset.device)
    expected = torch.zeros_like(reset) if starts is None else starts[None, :, None].expand_as(reset)
    if not torch.equal(reset, expected):
        raise ValueError(
            "the fla delta-rule step resets the state only at document starts (cu_seqlens); a -inf gate elsewhere "
            "needs backend='torch'"
        )
