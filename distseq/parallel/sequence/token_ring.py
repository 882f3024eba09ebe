"""TokenRing: K/V stay put; queries travel one way round the ring while the partial results of finished
blocks travel the other way, straight back to their owner, so both directions of every link carry data.

Forward, step ``s = 1 .. P-1``: this rank holds the queries of rank ``j = r - s`` (forwarded one hop,
the next hop posted before computing), attends them to its own K/V and sends the fp32 partial
``(out, lse)`` to ``j`` (``shift = -s``) while receiving the partial of its own queries from ``r + s``;
arrived partials merge with the stable LSE merge. A pair of ranks whose block is fully masked (e.g. the
future half of a causal contiguous layout) skips the partial transfer; both ends know from the layout.

Backward (distseq's own; the published TokenRing is forward-only): the bundle ``(q, dout, lse, delta)`` of
each rank travels the same way the queries did; every rank accumulates dK/dV for its own K/V locally
(they never move) and sends the dQ partial of each visiting bundle straight back to its owner.

Communication per rank (batch ``B``, ``n`` local tokens, ``d = heads * head_dim``, ``h`` heads, ``s``
bytes per input element, ``a`` bytes per accumulation element (4, or 8 for fp64), ``m`` the number of
other ranks whose queries have a non-empty block against this rank's keys, ``m'`` the number of other
ranks whose keys have a non-empty block for this rank's queries):
forward sent ``(P-1) B n d s + m B n (d + h) a``, received ``(P-1) B n d s + m' B n (d + h) a``;
backward sent ``(P-1) B n (2 d s + 2 h a) + m B n d a``, received ``(P-1) B n (2 d s + 2 h a) + m' B n d a``.
With the zigzag layout or without causality ``m = m' = P-1``.
"""

from __future__ import annotations

import torch

from distseq.kernels.attention import attention_delta
from distseq.kernels.merge import merge_attention_
from distseq.parallel.comm import Communicator
from distseq.parallel.sequence._blocks import AttentionSpec, Plan, attend, attend_backward, block_plan, new_accumulators
from distseq.parallel.sequence.base import SequenceStrategy, autocast_off

__all__ = ["TokenRingAttention"]

_Q_TAG, _RESULT_TAG = 0, 1


def token_ring_plans(spec: AttentionSpec, comm: Communicator) -> tuple[list[Plan], list[bool]]:
    """``visiting[s]``: the blocks of rank ``r - s``'s queries against our keys (computed here at step s);
    ``returning[s]``: whether rank ``r + s`` has a non-empty block for our queries (a partial comes back)."""
    p, r = comm.size, comm.rank
    visiting = [block_plan(spec, [(r - s) % p], [r]) for s in range(p)]
    returning = [bool(block_plan(spec, [r], [(r + s) % p])) for s in range(p)]
    return visiting, returning


def token_ring_forward(spec, comm, q, k, v, visiting, returning):
    out, lse = new_accumulators(q)
    q_visit = q
    in_flight = None  # the previous step's partial-result exchange
    for step in range(comm.size):
        last = step == comm.size - 1
        if not last:
            next_q = comm.send_recv(q_visit, 1, tag=_Q_TAG).commit()
        if step == 0:
            attend(spec, q, k, v, visiting[0], out, lse, fresh=True)
        else:
            part_out, part_lse = new_accumulators(q_visit)
            attend(spec, q_visit, k, v, visiting[step], part_out, part_lse, fresh=True)
            exchange = None
            if visiting[step] or returning[step]:
                exchange = comm.send_recv(
                    [part_out, part_lse], -step, tag=_RESULT_TAG, send=bool(visiting[step]), recv=returning[step]
                ).commit()
            _merge_arrived(in_flight, out, lse)
            in_flight = exchange
        if not last:
            (q_visit,) = next_q.wait()
    _merge_arrived(in_flight, out, lse)
    return out, lse


def _merge_arrived(exchange, out, lse) -> None:
    """Finish a partial-result exchange; merge what it received (a send-only exchange receives nothing)."""
    arrived = exchange.wait() if exchange is not None else []
    if arrived:
        merge_attention_(out, lse, *arrived)


def _add_arrived(exchange, dq) -> None:
    arrived = exchange.wait() if exchange is not None else []
    if arrived:
        dq += arrived[0]


def token_ring_backward(spec, comm, dout, q, k, v, out, lse, visiting, returning):
    delta = attention_delta(dout, out)
    dq = torch.zeros_like(out)
    dk = torch.zeros(k.shape, dtype=out.dtype, device=k.device)
    dv = torch.zeros_like(dk)
    bundle = [q, dout.contiguous(), lse, delta]
    in_flight = None
    for step in range(comm.size):
        last = step == comm.size - 1
        if not last:
            next_bundle = comm.send_recv(bundle, 1, tag=_Q_TAG).commit()
        if step == 0:
            attend_backward(spec, dout, q, k, v, out, lse, delta, visiting[0], dq, dk, dv)
        else:
            q_j, dout_j, lse_j, delta_j = bundle
            dq_part = torch.zeros(q_j.shape, dtype=out.dtype, device=q.device)
            attend_backward(spec, dout_j, q_j, k, v, None, lse_j, delta_j, visiting[step], dq_part, dk, dv)
            exchange = None
            if visiting[step] or returning[step]:
                exchange = comm.send_recv(
                    dq_part, -step, tag=_RESULT_TAG, send=bool(visiting[step]), recv=returning[step]
                ).commit()
            _add_arrived(in_flight, dq)
            in_flight = exchange
        if not last:
            bundle = next_bundle.wait()
    _add_arrived(in_flight, dq)
    return dq, dk, dv


class _TokenRingAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, spec: AttentionSpec, comm: Communicator, visiting: list, returning: list):
        out, lse = token_ring_forward(spec, comm, q, k, v, visiting, returning)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.comm, ctx.visiting, ctx.returning = spec, comm, visiting, returning
        return out.to(q.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = token_ring_backward(ctx.spec, ctx.comm, dout, q, k, v, out, lse, ctx.visiting, ctx.returning)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class TokenRingAttention(SequenceStrategy):
    """TokenRing: queries and partial results circulate in opposite directions; K/V never move."""

    name = "token_ring"

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        visiting, returning = token_ring_plans(spec, self.comm)
        return _TokenRingAttention.apply(q, k, v, spec, self.comm, visiting, returning)
