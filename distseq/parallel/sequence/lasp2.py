"""LASP-2: linear-attention sequence parallelism with one all-gather of chunk states each way.

Every rank computes the state ``M_c`` and log-decay ``A_c`` of each chunk it holds, all-gathers them (one
collective whose size does not depend on the sequence length), builds the incoming state of each of its
chunks from all chunks before it with a short scan, and attends within its chunks from those states. On
the zigzag layout a rank's two chunks are far apart in the sequence; each still gets its exact prefix, so
a hybrid model never permutes tokens.

Backward: one all-gather of ``dS`` (the gradients of the incoming states); each rank then differentiates the
scan locally for its own chunks' ``dM`` and ``dA``. The local parts (chunk states, intra-chunk attention)
differentiate through the kernels.

Communication per rank (batch ``B``, ``h`` heads, key/value dims ``dk``, ``dv``, ``nc`` chunks per rank (1
contiguous, 2 zigzag), ``a`` bytes per accumulation element (4; 8 for fp64)): forward
``(P-1) nc B h (dk dv + 1) a`` (states plus one log-decay scalar per chunk and head), backward
``(P-1) nc B h dk dv a``; independent of the sequence length.
"""

from __future__ import annotations

import torch

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._linear import LinearStateStrategy, scan_states

__all__ = ["LASP2"]


def _global_order(layout: SequenceLayout) -> torch.Tensor:
    """Permutation taking the gathered chunks (rank by rank, local order) to global chunk order."""
    gathered = [c for r in range(layout.sp_size) for c in layout.chunk_indices_of(r)]
    return torch.argsort(torch.tensor(gathered))


def lasp2_forward(comm: Communicator, layout: SequenceLayout, states: torch.Tensor, carries: torch.Tensor):
    """All-gather ``(M, A)`` and scan: the incoming state of every chunk, global order, plus the gathered inputs."""
    nc, batch, heads, key_dim, value_dim = states.shape
    packed = torch.cat([states.flatten(3), carries[..., None]], dim=-1)  # [nc, B, H, dk*dv + 1]
    gathered = comm.all_gather(packed, dim=0)[_global_order(layout)]  # [K, B, H, dk*dv + 1]
    all_states = gathered[..., :-1].reshape(-1, batch, heads, key_dim, value_dim)
    all_carries = gathered[..., -1]
    return scan_states(all_states, all_carries), all_states, all_carries


class _LASP2StateExchange(torch.autograd.Function):
    """``(M, A)`` of the local chunks -> incoming states of the local chunks, through one all-gather."""

    @staticmethod
    def forward(ctx, states, carries, comm: Communicator, layout: SequenceLayout):
        incoming, all_states, all_carries = lasp2_forward(comm, layout, states, carries)
        ctx.save_for_backward(all_states, all_carries)
        ctx.comm, ctx.layout = comm, layout
        return incoming[layout.chunks()]

    @staticmethod
    def backward(ctx, d_incoming):
        all_states, all_carries = ctx.saved_tensors
        comm, layout = ctx.comm, ctx.layout
        local = layout.chunks()
        # Every chunk's dS, in global order: the scan's gradient for our chunks needs the later chunks' dS.
        gathered = comm.all_gather(d_incoming.contiguous(), dim=0)
        d_all = gathered[_global_order(layout)]
        with torch.enable_grad():
            states = all_states.detach().requires_grad_()
            carries = all_carries.detach().requires_grad_()
            incoming = scan_states(states, carries)
            if not incoming.requires_grad:  # a single chunk: its incoming state is the constant zero
                return torch.zeros_like(states[local]), torch.zeros_like(carries[local]), None, None
            d_states, d_carries = torch.autograd.grad(incoming, (states, carries), d_all, materialize_grads=True)
        return d_states[local], d_carries[local], None, None


class LASP2(LinearStateStrategy):
    """LASP-2 linear-attention sequence parallelism on any layout, with decay, gates and documents."""

    name = "lasp2"

    def _exchange(self, states: torch.Tensor, carries: torch.Tensor) -> torch.Tensor:
        return _LASP2StateExchange.apply(states, carries, self.comm, self.layout)
