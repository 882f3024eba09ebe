"""USP (Ulysses x Ring, 2D): Ulysses all-to-all inside groups of ``ulysses_degree`` consecutive SP ranks,
Ring Attention across the groups.

After the all-to-all a rank holds the tokens of its whole Ulysses group on ``heads / ulysses_degree`` heads;
the ring then rotates those group-sized K/V blocks among the ranks that hold the same heads in the other
groups. ``ulysses_degree == sp`` is Ulysses, ``ulysses_degree == 1`` is Ring.

Communication per rank (``u`` = ulysses degree, ``R = P / u`` ring size, ``n`` local tokens, ``d``, ``dkv``
after KV replication to a multiple of ``u``, ``s`` bytes per element), summed over both communicators:
forward ``(u-1)/u n (2d + 2dkv) s + (R-1) 2 n dkv s``; backward ``(u-1)/u n (2d + 2dkv) s +
(R-1) 2 n dkv s + R 2 n dkv 4`` (for ``R > 1``; the ring part is 0 when ``R == 1``).
"""

from __future__ import annotations

import torch

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._blocks import AttentionSpec
from distseq.parallel.sequence.base import SequenceStrategy, autocast_off, replicate_kv_heads
from distseq.parallel.sequence.ring import ring_attention_backward, ring_attention_forward, ring_plans
from distseq.parallel.sequence.ulysses import HeadsToSeq, SeqToHeads, check_head_sharding

__all__ = ["USPAttention"]


class _RingOnHeads(torch.autograd.Function):
    """The ring part of USP on this rank's head shards (the Ulysses exchanges around it are Functions of their
    own, so autograd frees this one's saved tensors before the gradients' exchange)."""

    @staticmethod
    @autocast_off
    def forward(ctx, qh, kh, vh, spec: AttentionSpec, outer: Communicator, plans: list):
        out, lse = ring_attention_forward(spec, outer, qh, kh, vh, plans)
        ctx.save_for_backward(qh, kh, vh, out, lse)
        ctx.spec, ctx.outer, ctx.plans = spec, outer, plans
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, dout_h):
        qh, kh, vh, out, lse = ctx.saved_tensors
        grads = ring_attention_backward(ctx.spec, ctx.outer, dout_h, qh, kh, vh, out, lse, ctx.plans)
        return *grads, None, None, None


class USPAttention(SequenceStrategy):
    """Ulysses inside groups of ``ulysses_degree`` consecutive SP ranks x Ring across the groups."""

    name = "usp"

    def __init__(
        self, comm: Communicator, layout: SequenceLayout, *, ulysses_degree: int, attention_backend: str = "auto"
    ):
        super().__init__(comm, layout, attention_backend=attention_backend)
        if ulysses_degree < 1 or comm.size % ulysses_degree:
            raise ValueError(f"usp needs ulysses_degree dividing sp: ulysses_degree={ulysses_degree}, sp={comm.size}")
        self.ulysses_degree = ulysses_degree
        # Collective: every SP rank builds the same strategy, so every rank creates the sub-groups.
        self.inner, self.outer = comm.split_grid(ulysses_degree)

    def communicators(self) -> list[Communicator]:
        return [self.inner, self.outer]

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        u = self.ulysses_degree
        check_head_sharding("usp", q.shape[2], u, "ulysses_degree")
        k, v = replicate_kv_heads(k, v, q.shape[2], u)

        plans = ring_plans(spec, self.outer, lambda ring_rank: [ring_rank * u + i for i in range(u)])
        qh, kh, vh = SeqToHeads.apply(self.inner, q, k, v)
        out = _RingOnHeads.apply(qh, kh, vh, spec, self.outer, plans)
        return HeadsToSeq.apply(out, self.inner, q.dtype)
