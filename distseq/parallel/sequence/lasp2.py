"""LASP-2: linear-attention sequence parallelism with one all-gather of chunk states each way.

Every rank computes the state ``M_c`` and log-decay ``A_c`` of each chunk it holds, all-gathers them (one
collective whose size does not depend on the sequence length), builds the incoming state of each of its
chunks from all chunks before it with a short scan, and adds the inter-chunk term ``exp(G_t) q_t^T S_c`` to
the intra-chunk term. On the zigzag layout a rank's two chunks are far apart in the sequence; each still gets
its exact prefix, so a hybrid model never permutes tokens.

Schedule, forward: chunk states (once; see ``LocalChunks``) -> all-gather of ``(M, A)`` started -> the
intra-chunk term (each chunk's causal attention from a zero state) while it is in flight -> wait, scan ->
the inter-chunk term.

Backward: ``dS`` of the local chunks (from the inter term alone) -> all-gather of ``dS`` started -> the
intra-chunk backward while it is in flight -> wait, the scan's gradient for the local chunks' ``dM`` and
``dA`` -> the backward of the chunk states and of the inter term.

Communication per rank (batch ``B``, ``h`` heads, key/value dims ``dk``, ``dv``, ``nc`` chunks per rank (1
contiguous, 2 zigzag), ``a`` bytes per accumulation element (4; 8 for fp64)): forward
``(P-1) nc B h (dk dv + 1) a`` (states plus one log-decay scalar per chunk and head), backward
``(P-1) nc B h dk dv a``; independent of the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._linear import (
    LinearStateStrategy,
    LocalChunks,
    global_order,
    scan_states,
    scan_states_backward,
)

__all__ = ["LASP2"]


@dataclass
class _Stages:
    """One call's local graph, cut where the exchange enters: the backward takes its parts in turn."""

    states: torch.Tensor  # M [nc, B, H, K, V], from the leaves
    carries: torch.Tensor  # A [nc, B, H]
    prefix: torch.Tensor | None  # what the intra term reuses from the state pass
    prefix_leaf: torch.Tensor | None  # the intra term's copy of it
    intra: torch.Tensor  # [B, n, H, V]
    incoming_leaf: torch.Tensor  # S_c of the local chunks [nc, B, H, K, V]
    inter: torch.Tensor  # [B, n, H, V]
    all_incoming: torch.Tensor  # S_c of every chunk, global order [K, B, H, K, V]
    all_carries: torch.Tensor  # A_c of every chunk, global order [K, B, H]


def _leaf(x: torch.Tensor | None, requires_grad: bool) -> torch.Tensor | None:
    return None if x is None else x.detach().requires_grad_(requires_grad)


def _grad(outputs, inputs, grad_outputs) -> tuple[torch.Tensor, ...]:
    """Gradients of ``inputs`` from the ``outputs`` that depend on them (zeros where none does)."""
    pairs = [(o, d) for o, d in zip(outputs, grad_outputs, strict=True) if o is not None and o.requires_grad]
    if not pairs:
        return tuple(torch.zeros_like(x) for x in inputs)
    outs, douts = zip(*pairs, strict=True)
    return torch.autograd.grad(outs, inputs, douts, retain_graph=True, allow_unused=True, materialize_grads=True)


def lasp2_forward(comm: Communicator, layout: SequenceLayout, local: LocalChunks, track: bool):
    """The output ``[B, n, H, V]``, overlapping the all-gather of ``(M, A)`` with the intra-chunk term."""
    states, carries, prefix = local.states()
    packed = torch.cat([states.detach().flatten(3), carries.detach()[..., None]], dim=-1)  # [nc, B, H, dk*dv + 1]
    handle = comm.all_gather(packed, dim=0, async_op=True)
    prefix_leaf = _leaf(prefix, prefix is not None and prefix.requires_grad)
    intra = local.intra(prefix_leaf)
    gathered = global_order(layout, handle.wait())  # [K, B, H, dk*dv + 1]
    all_carries = gathered[..., -1]
    all_incoming = scan_states(gathered[..., :-1].unflatten(-1, states.shape[-2:]), all_carries)
    incoming_leaf = _leaf(torch.stack([all_incoming[c] for c in layout.chunks()]), track)
    inter = local.inter(incoming_leaf)
    stages = _Stages(states, carries, prefix, prefix_leaf, intra, incoming_leaf, inter, all_incoming, all_carries)
    return intra + inter, stages


def lasp2_backward(comm: Communicator, layout: SequenceLayout, stages: _Stages, leaves, d_out: torch.Tensor):
    """Gradients of ``leaves``, overlapping the all-gather of ``dS`` with the intra-chunk backward."""
    (d_incoming,) = torch.autograd.grad(stages.inter, stages.incoming_leaf, d_out, retain_graph=True)
    handle = comm.all_gather(d_incoming, dim=0, async_op=True)
    prefix = [stages.prefix_leaf] if stages.prefix_leaf is not None and stages.prefix_leaf.requires_grad else []
    d_intra = _grad([stages.intra], [*leaves, *prefix], [d_out])
    d_states, d_carries = scan_states_backward(
        stages.all_incoming, stages.all_carries, global_order(layout, handle.wait())
    )
    local = layout.chunks()
    d_rest = _grad(
        [stages.inter, stages.states, stages.carries, stages.prefix],
        leaves,
        [
            d_out,
            torch.stack([d_states[c] for c in local]),
            torch.stack([d_carries[c] for c in local]),
            d_intra[-1] if prefix else None,
        ],
    )
    return [a + b for a, b in zip(d_intra[: len(leaves)], d_rest, strict=True)]


class _LASP2(torch.autograd.Function):
    """``q, k, v, log_gate`` -> ``o``: the local pieces and the state exchange, both ways overlapped."""

    @staticmethod
    def forward(ctx, q, k, v, log_gate, comm: Communicator, layout: SequenceLayout, local, grad_enabled: bool):
        # Inside forward grad mode is off and needs_input_grad ignores it: the caller's mode comes as an argument.
        track = grad_enabled and any(ctx.needs_input_grad[:4])
        with torch.set_grad_enabled(track):
            leaves = [
                None if x is None else x.detach().requires_grad_(track and needs)
                for x, needs in zip((q, k, v, log_gate), ctx.needs_input_grad[:4], strict=True)
            ]
            out, stages = lasp2_forward(comm, layout, local(*leaves), track)
        if track:
            ctx.comm, ctx.layout, ctx.stages, ctx.leaves = comm, layout, stages, leaves
        return out.detach()

    @staticmethod
    def backward(ctx, d_out):
        if ctx.stages is None:
            raise RuntimeError("LASP-2 frees its local graph in backward: run backward through it once")
        stages, ctx.stages = ctx.stages, None
        wanted = [x is not None and x.requires_grad for x in ctx.leaves]
        with torch.autocast(d_out.device.type, enabled=False):
            leaves = [x for x, want in zip(ctx.leaves, wanted, strict=True) if want]
            grads = iter(lasp2_backward(ctx.comm, ctx.layout, stages, leaves, d_out))
        return *(next(grads) if want else None for want in wanted), None, None, None, None


class LASP2(LinearStateStrategy):
    """LASP-2 linear-attention sequence parallelism on any layout, with decay, gates and documents."""

    name = "lasp2"
    delta_exchange = "allgather"  # the delta rule's chunk summaries: one all-gather (``delta.py``)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor | None) -> torch.Tensor:
        return _LASP2.apply(q, k, v, log_gate, self.comm, self.layout, self._local, torch.is_grad_enabled())
