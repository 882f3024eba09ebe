"""LASP-1: the serial baseline. The state is passed chunk to chunk in sequence order, so the ``K`` chunks
form a chain of dependent point-to-point steps (``P-1`` hops on the contiguous layout, ``2P-1`` on zigzag,
where the chain visits ranks ``0, 1, .., P-1, P-1, .., 0``). Same math and local parts as LASP-2; only the
state exchange differs.

Backward: the gradient of the incoming state travels the chain in reverse,
``g_c = dS_c + exp(A_c) g_{c+1}``, ``dM_c = g_{c+1}``, ``dA_c = exp(A_c) <S_c, g_{c+1}>``.

Communication: every hop between two different ranks carries one state ``B h dk dv a`` bytes in each
direction of the chain (forward then backward); a rank sends at most ``nc`` states per pass.
"""

from __future__ import annotations

import torch

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._linear import LinearStateStrategy, without_autocast

__all__ = ["LASP1"]


def lasp1_forward(comm, layout, states, carries) -> torch.Tensor:
    """Incoming state of each local chunk, passed along the chain of chunks."""
    owner, local = layout.chunk_owners(), layout.chunks()
    incoming = [None] * len(local)
    carried = torch.zeros_like(states[0])  # S_c while c's owner is this rank
    for c in range(layout.num_chunks):
        if owner[c] != comm.rank:
            continue
        if c > 0 and owner[c - 1] != comm.rank:
            (carried,) = comm.recv(states[0], owner[c - 1])
        i = local.index(c)
        incoming[i] = carried
        carried = torch.exp(carries[i])[..., None, None] * carried + states[i]
        if c + 1 < layout.num_chunks and owner[c + 1] != comm.rank:
            comm.send(carried, owner[c + 1])
    return torch.stack(incoming)


def lasp1_backward(comm, layout, d_incoming, incoming, carries):
    owner, local = layout.chunk_owners(), layout.chunks()
    d_states = torch.zeros_like(incoming)
    d_carries = torch.zeros_like(carries)
    grad = None  # g_{c+1}: the gradient of the state after chunk c, while this rank owns c
    for c in reversed(range(layout.num_chunks)):
        if owner[c] != comm.rank:
            continue
        i = local.index(c)
        if c + 1 < layout.num_chunks:
            if owner[c + 1] != comm.rank:
                (grad,) = comm.recv(incoming[i], owner[c + 1])
            d_states[i] = grad
            d_carries[i] = torch.exp(carries[i]) * (incoming[i] * grad).sum((-1, -2))
            grad = d_incoming[i] + torch.exp(carries[i])[..., None, None] * grad
        else:
            grad = d_incoming[i]
        if c > 0 and owner[c - 1] != comm.rank:
            comm.send(grad, owner[c - 1])
    return d_states, d_carries


class _LASP1StateChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, carries, comm: Communicator, layout: SequenceLayout):
        incoming = lasp1_forward(comm, layout, states, carries)
        ctx.save_for_backward(incoming, carries)
        ctx.comm, ctx.layout = comm, layout
        return incoming

    @staticmethod
    def backward(ctx, d_incoming):
        incoming, carries = ctx.saved_tensors
        d_states, d_carries = lasp1_backward(ctx.comm, ctx.layout, d_incoming, incoming, carries)
        return d_states, d_carries, None, None


class LASP1(LinearStateStrategy):
    """LASP-1: the serial ring state-passing baseline for linear attention."""

    name = "lasp1"

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor | None) -> torch.Tensor:
        return without_autocast(self._chain, q, k, v, log_gate)

    def _chain(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor | None) -> torch.Tensor:
        local = self._local(q, k, v, log_gate)
        states, carries, prefix = local.states()
        incoming = _LASP1StateChain.apply(states, carries, self.comm, self.layout)
        return local.intra(prefix) + local.inter(incoming)
