"""All-gather KV (the softmax path of LASP-2H): one all-gather of K and V, local queries against the
whole gathered sequence with the layout's mask; backward re-gathers K/V and reduce-scatters dK/dV.

K and V travel in one collective (stacked), and so do their gradients. Communication per rank (``n``
local tokens, ``dkv = kv_heads * head_dim``, ``s`` bytes per element): forward ``(P-1) 2 n dkv s``;
backward ``(P-1) 2 n dkv s`` (re-gather) ``+ (P-1) 2 n dkv 4`` (fp32 reduce-scatter of dK/dV).
"""

from __future__ import annotations

import torch

from distseq.kernels.attention import attention_delta
from distseq.parallel.comm import Communicator
from distseq.parallel.sequence._blocks import AttentionSpec, Plan, attend, attend_backward, block_plan, new_accumulators
from distseq.parallel.sequence.base import SequenceStrategy, autocast_off

__all__ = ["AllGatherKVAttention"]


def _gather_kv(comm: Communicator, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kv = comm.all_gather(torch.stack([k, v]), dim=2)  # [2, B, P*n, Hkv, D], ranks' tokens in rank order
    return kv[0], kv[1]


def allgather_kv_forward(spec, comm, q, k, v, plan):
    k_all, v_all = _gather_kv(comm, k, v)
    out, lse = new_accumulators(q)
    attend(spec, q, k_all, v_all, plan, out, lse)
    return out, lse


def allgather_kv_backward(spec, comm, dout, q, k, v, out, lse, plan):
    k_all, v_all = _gather_kv(comm, k, v)
    delta = attention_delta(dout, out)
    dq = torch.zeros_like(out)
    dkv = torch.zeros((2, *k_all.shape), dtype=out.dtype, device=k.device)
    attend_backward(spec, dout, q, k_all, v_all, out, lse, delta, plan, dq, dkv[0], dkv[1])
    dkv = comm.reduce_scatter(dkv, dim=2)  # every rank's contribution to our K/V, summed
    return dq, dkv[0], dkv[1]


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
