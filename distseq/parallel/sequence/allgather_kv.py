"""All-gather KV (the softmax path of LASP-2H): one all-gather of K and V, local queries against the
whole gathered sequence with the layout's mask; backward re-gathers K/V and reduce-scatters dK/dV.

K and V travel in one collective (stacked), and so do their gradients. Communication per rank (``n``
local tokens, ``dkv = kv_heads * head_dim``, ``s`` bytes per element): forward ``(P-1) 2 n dkv s``;
backward ``(P-1) 2 n dkv s`` (re-gather) ``+ (P-1) 2 n dkv 4`` (fp32 reduce-scatter of dK/dV).
"""

from __future__ import annotations

import torch

from distseq.parallel.comm import Communicator
from distseq.parallel.sequence._blocks import AttentionSpec, Plan, attend, attend_backward, block_plan, new_accumulators
from distseq.parallel.sequence.base import SequenceStrategy, autocast_off

__all__ = ["AllGatherKVAttention"]


def _gather_kv(comm: Communicator, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Packed tokens-first ([n, 2, B, Hkv, D], one copy), so the gather needs no reordering copy; K and V of
    # every rank come back as views [B, P*n, Hkv, D], ranks' tokens in rank order.
    kv = comm.all_gather(torch.stack([k.transpose(0, 1), v.transpose(0, 1)], dim=1), dim=0)
    return kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)


def allgather_kv_forward(spec, comm, q, k, v, plan):
    k_all, v_all = _gather_kv(comm, k, v)
    out, lse = new_accumulators(q)
    attend(spec, q, k_all, v_all, plan, out, lse, fresh=True)
    return out, lse


def allgather_kv_backward(spec, comm, dout, q, k, v, out, lse, plan):
    k_all, v_all = _gather_kv(comm, k, v)
    dq = torch.zeros_like(out)
    batch, total, kv_heads, dim = k_all.shape
    dkv = torch.zeros(total, 2, batch, kv_heads, dim, dtype=out.dtype, device=k.device)  # tokens first, as gathered
    dk_all, dv_all = dkv[:, 0].transpose(0, 1), dkv[:, 1].transpose(0, 1)
    attend_backward(spec, dout, q, k_all, v_all, out, lse, None, plan, dq, dk_all, dv_all)
    dkv = comm.reduce_scatter(dkv, dim=0)  # every rank's contribution to our K/V, summed: [n, 2, B, Hkv, D]
    return dq, dkv[:, 0].transpose(0, 1), dkv[:, 1].transpose(0, 1)


class _AllGatherKVAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, spec: AttentionSpec, comm: Communicator, plan: Plan):
        out, lse = allgather_kv_forward(spec, comm, q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.comm, ctx.plan = spec, comm, plan
        return out.to(q.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = allgather_kv_backward(ctx.spec, ctx.comm, dout, q, k, v, out, lse, ctx.plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class AllGatherKVAttention(SequenceStrategy):
    """One all-gather of K/V per layer; memory grows with the full K/V, communication does not overlap."""

    name = "allgather_kv"

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        plan = block_plan(spec, [self.comm.rank], range(self.comm.size))
        return _AllGatherKVAttention.apply(q, k, v, spec, self.comm, plan)
