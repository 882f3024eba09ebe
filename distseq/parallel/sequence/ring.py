"""Ring Attention: K/V blocks rotate around the SP group; partial results merge with the stable LSE merge.

Forward: ``P`` steps; at step ``s`` this rank holds the K/V of ring rank ``r - s``, posts the next hop
before computing, attends its queries to the block (skipping empty span pairs), merges in fp32.
Backward: K/V rotate again; dQ stays local; the fp32 dK/dV accumulator of each block travels with it and
arrives back at its owner after ``P`` hops. The accumulator hop of step ``s`` overlaps step ``s+1``'s compute.

Communication per rank (``n`` local tokens, ``dkv = kv_heads * head_dim``, ``s`` bytes per element, P > 1):
forward ``(P-1) 2 n dkv s``; backward ``(P-1) 2 n dkv s`` (K/V) ``+ P 2 n dkv 4`` (fp32 dK/dV).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from distseq.kernels.attention import attention_delta
from distseq.parallel.comm import Communicator
from distseq.parallel.sequence._blocks import AttentionSpec, Plan, attend, attend_backward, block_plan, new_accumulators
from distseq.parallel.sequence.base import SequenceStrategy, autocast_off

__all__ = ["RingAttention", "ring_attention_backward", "ring_attention_forward"]

_KV_TAG, _GRAD_TAG = 0, 1


def ring_plans(spec: AttentionSpec, comm: Communicator, sp_ranks_of: Callable[[int], list[int]]) -> list[Plan]:
    """The block plan of every ring step: step ``s`` pairs our queries with ring rank ``r - s``'s keys, where
    ``sp_ranks_of(ring_rank)`` lists the SP ranks whose tokens a ring rank holds."""
    mine = sp_ranks_of(comm.rank)
    return [block_plan(spec, mine, sp_ranks_of((comm.rank - s) % comm.size)) for s in range(comm.size)]


def ring_attention_forward(
    spec: AttentionSpec, comm: Communicator, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plans: list[Plan]
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(out [B, T, H, D], lse [B, H, T])`` of ``q`` against the K/V of every rank of ``comm``."""
    out, lse = new_accumulators(q)
    kv = [k, v]
    for step in range(comm.size):
        last = step == comm.size - 1
        if not last:
            next_kv = comm.send_recv(kv, 1, tag=_KV_TAG).commit()
        attend(spec, q, kv[0], kv[1], plans[step], out, lse, fresh=step == 0)
        if not last:
            kv = next_kv.wait()
    return out, lse


def ring_attention_backward(
    spec: AttentionSpec,
    comm: Communicator,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    plans: list[Plan],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``(dq, dk, dv)`` for this rank's q, k, v."""
    delta = attention_delta(dout, out) if spec.backend.uses_delta else None  # once for all steps
    dq = torch.zeros_like(out)
    kv = [k, v]
    in_flight = None  # the dK/dV accumulator exchange of the previous step
    for step in range(comm.size):
        last = step == comm.size - 1
        if not last:
            next_kv = comm.send_recv(kv, 1, tag=_KV_TAG).commit()
        dk = torch.zeros(k.shape, dtype=out.dtype, device=k.device)
        dv = torch.zeros_like(dk)
        attend_backward(spec, dout, q, kv[0], kv[1], out, lse, delta, plans[step], dq, dk, dv)
        if in_flight is not None:
            # The block's accumulator from the ranks it visited before arrives while we computed.
            arrived_dk, arrived_dv = in_flight.wait()
            dk += arrived_dk
            dv += arrived_dv
        in_flight = comm.send_recv([dk, dv], 1, tag=_GRAD_TAG).commit()
        if not last:
            kv = next_kv.wait()
    dk, dv = in_flight.wait()  # our own block, home after P hops
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, spec: AttentionSpec, comm: Communicator, plans: list[Plan]):
        out, lse = ring_attention_forward(spec, comm, q, k, v, plans)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.comm, ctx.plans = spec, comm, plans
        return out.to(q.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(ctx.spec, ctx.comm, dout, q, k, v, out, lse, ctx.plans)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class RingAttention(SequenceStrategy):
    """Ring Attention over the SP group; works on every layout, GQA and packed documents."""

    name = "ring"

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        plans = ring_plans(spec, self.comm, lambda ring_rank: [ring_rank])
        return _RingAttention.apply(q, k, v, spec, self.comm, plans)
