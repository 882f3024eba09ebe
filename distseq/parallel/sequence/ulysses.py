"""Ulysses (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards, full-sequence attention on
``heads / P`` heads, all-to-all back.

When the KV heads do not divide by ``P`` (GQA with few KV heads) each KV head is replicated by the smallest
factor that makes them divide, and autograd sums the copies' gradients. Query heads must divide by ``P``.

Communication per rank (``n`` local tokens, ``d = heads * head_dim``, ``dkv`` the KV width after
replication, ``s`` bytes per element): forward ``(P-1)/P n (2d + 2dkv) s`` (q, k, v there, out back);
backward the same (dout there; dq, dk, dv back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distseq.kernels.attention import attention_delta
from distseq.kernels.linear_attention import check_linear_attention_inputs
from distseq.kernels.linear_attention.backends import linear_attention_backend
from distseq.parallel import functional as F
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._blocks import (
    AttentionSpec,
    attend,
    attend_backward,
    block_plan,
    new_accumulators,
    rank_spans,
)
from distseq.parallel.sequence.base import SequenceStrategy, check_qkv_length, replicate_kv_heads

__all__ = ["UlyssesAttention", "check_head_sharding", "heads_to_seq", "seq_to_heads"]


def seq_to_heads(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """``[B, n, H, D]`` sequence shard -> ``[B, n * P, H / P, D]`` head shard (ranks' tokens in rank order)."""
    return comm.all_to_all(x, scatter_dim=2, gather_dim=1)


def heads_to_seq(comm: Communicator, x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`."""
    return comm.all_to_all(x, scatter_dim=1, gather_dim=2)


def check_head_sharding(name: str, heads: int, degree: int, axis: str) -> None:
    if heads % degree:
        raise ValueError(
            f"{name} needs heads divisible by {axis}: heads={heads}, {axis}={degree}; "
            f"use strategy='ring' or 'usp' (with a ulysses_degree dividing {heads})"
        )


def ulysses_forward(spec, comm, q, k, v, plan):
    """Head-sharded full-sequence attention: returns (fp32 out, lse, q, k, v) in head-shard layout."""
    qh, kh, vh = seq_to_heads(comm, q), seq_to_heads(comm, k), seq_to_heads(comm, v)
    out, lse = new_accumulators(qh)
    attend(spec, qh, kh, vh, plan, out, lse)
    return out, lse, qh, kh, vh


def ulysses_backward(spec, comm, dout_h, qh, kh, vh, out, lse, plan):
    """fp32 (dq, dk, dv) in head-shard layout."""
    delta = attention_delta(dout_h, out)
    dq = torch.zeros_like(out)
    dk = torch.zeros(kh.shape, dtype=out.dtype, device=kh.device)
    dv = torch.zeros_like(dk)
    attend_backward(spec, dout_h, qh, kh, vh, lse, delta, plan, dq, dk, dv)
    return dq, dk, dv


class _UlyssesAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: AttentionSpec, comm: Communicator, plan: list):
        out, lse, qh, kh, vh = ulysses_forward(spec, comm, q, k, v, plan)
        ctx.save_for_backward(qh, kh, vh, out, lse)
        ctx.spec, ctx.comm, ctx.plan = spec, comm, plan
        return heads_to_seq(comm, out.to(q.dtype))

    @staticmethod
    def backward(ctx, dout):
        qh, kh, vh, out, lse = ctx.saved_tensors
        comm = ctx.comm
        dq, dk, dv = ulysses_backward(ctx.spec, comm, seq_to_heads(comm, dout), qh, kh, vh, out, lse, ctx.plan)
        return (
            heads_to_seq(comm, dq.to(qh.dtype)),
            heads_to_seq(comm, dk.to(kh.dtype)),
            heads_to_seq(comm, dv.to(vh.dtype)),
            None,
            None,
            None,
        )


class UlyssesAttention(SequenceStrategy):
    """Ulysses all-to-all attention; heads must divide by the SP size."""

    name = "ulysses"

    def __init__(self, comm: Communicator, layout: SequenceLayout, *, chunk_size: int = 64, backend: str = "torch"):
        super().__init__(comm, layout)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size  # for linear attention
        self.kernel = linear_attention_backend(backend)  # for linear attention

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        check_head_sharding("ulysses", q.shape[2], self.comm.size, "sp")
        k, v = replicate_kv_heads(k, v, q.shape[2], self.comm.size)
        spans = rank_spans(spec, range(self.comm.size), q.device)
        plan = block_plan(spec, spans, spans)
        return _UlyssesAttention.apply(q, k, v, spec, self.comm, plan)

    def linear_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        decay: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Linear attention by head all-to-all: each rank runs the whole sequence, in natural order, on
        ``heads / P`` heads (the baseline LASP-2 is compared against). Differentiable through autograd.

        Bytes per rank each way: ``(P-1)/P B n (2 h dk + 2 h dv [+ h for a gate]) s``.
        """
        check_linear_attention_inputs(q, k, v, decay, gate, None, None)
        check_qkv_length(q, self.layout)
        check_head_sharding("ulysses", q.shape[2], self.comm.size, "sp")
        cu = self.layout.with_documents(cu_seqlens).cu_seqlens
        comm, p, r = self.comm, self.comm.size, self.comm.rank
        order = self.layout.global_order(q.device)  # global position of each gathered token
        natural = torch.argsort(order)

        def to_heads(x: torch.Tensor) -> torch.Tensor:
            return F.all_to_all(x, comm, scatter_dim=2, gather_dim=1)[:, natural]

        local_heads = q.shape[2] // p
        out = self.kernel(
            to_heads(q),
            to_heads(k),
            to_heads(v),
            decay=None if decay is None else decay[r * local_heads : (r + 1) * local_heads],
            gate=None if gate is None else to_heads(gate[..., None])[..., 0],
            cu_seqlens=cu,
            chunk_size=self.chunk_size,
        )[0]
        return F.all_to_all(out[:, order], comm, scatter_dim=1, gather_dim=2)
