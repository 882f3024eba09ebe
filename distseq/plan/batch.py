"""The predicted time of one softmax-attention layer on one batch of packed documents, per strategy
(``parallel.softmax_strategy_per_batch``): the trainer runs each micro-batch's softmax layers with the strategy
this predicts fastest for its document lengths.

For a strategy on ``P`` sequence-parallel ranks, one layer, forward and backward:

* compute: the kernel calls the strategy's own block plans make on each rank at each step for this batch's
  documents (:mod:`distseq.plan.calls`: documents empty whole blocks, so a batch of short documents leaves the
  ring's later steps without work), timed as the planner times them (FLOPs at the profile's attention rate, a
  causal call's diagonal band, merges), ``B`` rows of the micro-batch, ``H`` query heads of this tensor-parallel
  rank; ranks sharing a device as :func:`~distseq.plan.calls.shared_device_seconds` says;
* communication: ``c = bytes / (GB/s x link efficiency) + messages x latency``, the bytes the strategy's busiest
  rank sends or receives (``softmax_layer_bytes`` of the dry-run plan, document-aware for token_ring) at the link's
  bandwidth for the strategy's primitive (``send_recv`` for the rings, ``all_to_all`` for Ulysses,
  ``all_gather`` for all-gather KV, where a measured profile has them);
* ``ring`` and ``token_ring``: each ring step costs its slowest rank or its hop (``c / (P - 1)``), whichever is
  longer (:func:`~distseq.plan.calls.attention_layer_seconds`); an unbalanced step shows as its slowest rank;
* ``usp`` (Ulysses degree ``u``, ``R = P / u``): its all-to-alls ``c_a2a`` in full, then the ring steps over the
  ``R`` groups of ``u`` consecutive ranks, on ``H / u`` heads;
* ``ulysses`` and ``allgather_kv``: ``c`` plus the slowest rank's calls (not overlapped).

Messages: ring ``2 (P-1)`` (a hop per step forward and backward), token_ring ``4 (P-1)`` (queries and partials
each way), ulysses ``4 (P-1)`` (four all-to-alls), allgather_kv ``3 (P-1)``, usp ``4 (u-1) + 2 (R-1)``. Every
strategy is exact, so the choice changes only speed; the model is the planner's (``docs/planning.md``), and
every rank of the sequence-parallel group computes the same choice from the same integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distseq.parallel.layout import SequenceLayout
from distseq.plan.calls import AttentionRates, attention_layer_seconds, attention_work
from distseq.plan.cost import link_seconds
from distseq.plan.profiles import ClusterProfile, Link
from distseq.train.plan import softmax_layer_bytes

__all__ = ["SoftmaxBatchChooser", "SoftmaxShape", "softmax_batch_seconds"]

_OVERLAPPED_STEPS = {"ring": 2, "token_ring": 4}  # messages per ring step (forward and backward)


@dataclass(frozen=True)
class SoftmaxShape:
    """One softmax layer on one tensor-parallel rank: its heads, KV heads, head size, micro-batch rows and the
    bytes of an element it communicates."""

    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 1
    elem_bytes: int = 2


#: the collective each strategy's bytes travel by (usp: its all-to-alls, then its ring's send_recv)
_PRIMITIVE = {"ring": "send_recv", "token_ring": "send_recv", "ulysses": "all_to_all", "allgather_kv": "all_gather"}


def _busiest_bytes(name: str, layout: SequenceLayout, shape: SoftmaxShape, ulysses_degree: int | None) -> int:
    """The most bytes any rank sends or receives in one layer's forward and backward."""
    most = 0
    for rank in range(layout.sp_size):
        # Only TokenRing's bytes depend on the documents (it skips partial results between unrelated ranks).
        on = (
            layout.for_rank(rank)
            if name == "token_ring"
            else SequenceLayout(layout.kind, layout.seq_len, layout.sp_size, rank)
        )
        b = softmax_layer_bytes(
            name,
            on,
            batch=shape.batch,
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            elem_bytes=shape.elem_bytes,
            ulysses_degree=ulysses_degree,
        )
        most = max(most, b.fwd_sent + b.bwd_sent, b.fwd_received + b.bwd_received)
    return most


def softmax_batch_seconds(
    name: str,
    layout: SequenceLayout,
    shape: SoftmaxShape,
    profile: ClusterProfile,
    link: Link,
    *,
    dtype: str = "bf16",
    ulysses_degree: int | None = None,
) -> float:
    """Predicted seconds of one softmax layer (forward and backward) under strategy ``name`` on ``layout``'s
    ranks and documents (the module docstring's model); ``link`` is the one the sequence-parallel group uses."""
    p = layout.sp_size
    if name == "usp" and (ulysses_degree is None or p % ulysses_degree):
        raise ValueError(f"usp needs a ulysses_degree dividing sp={p}, got {ulysses_degree}")
    work = attention_work(name, layout.kind.value, layout.seq_len, p, shape.heads, ulysses_degree, layout.doc_offsets)
    rates = AttentionRates.of(profile, dtype)

    def kernels(hop: float = 0.0) -> float:
        return attention_layer_seconds(
            work, name, shape.head_dim, rates, ranks_per_device=profile.ranks_per_device, hop_s=hop, batch=shape.batch
        )

    if p == 1:
        return kernels()

    def comm(strategy: str, messages: int) -> float:
        nbytes = _busiest_bytes(strategy, layout, shape, None)
        return link_seconds(nbytes, messages, link, profile.efficiency["link"], _PRIMITIVE[strategy])

    if name in _OVERLAPPED_STEPS:
        return kernels(comm(name, _OVERLAPPED_STEPS[name] * (p - 1)) / (p - 1))
    if name == "ulysses":
        return comm(name, 4 * (p - 1)) + kernels()
    if name == "allgather_kv":
        return comm(name, 3 * (p - 1)) + kernels()
    if name == "usp":
        u = ulysses_degree
        groups = p // u
        # The all-to-all part alone is Ulysses over u ranks of the same local length; the ring part the rest.
        a2a_bytes = _busiest_bytes("ulysses", SequenceLayout("contiguous", layout.local_len * u, u, 0), shape, None)
        ring_bytes = _busiest_bytes("usp", layout, shape, u) - a2a_bytes
        a2a = link_seconds(a2a_bytes, 4 * (u - 1), link, profile.efficiency["link"], "all_to_all")
        ring_s = link_seconds(ring_bytes, 2 * (groups - 1), link, profile.efficiency["link"], "send_recv")
        return a2a + kernels(ring_s / (groups - 1) if groups > 1 else 0.0)
    raise ValueError(f"softmax_batch_seconds: unknown softmax strategy {name!r}")


class SoftmaxBatchChooser:
    """The fastest of ``strategies`` for each batch's documents (ties: the earlier in ``strategies``).

    Args:
        strategies: softmax strategy names, all built by the trainer.
        kind, seq_len, sp: the model's token layout (its kind, the sequence length, the sequence-parallel size).
        shape: the softmax layers' heads and sizes on one tensor-parallel rank.
        profile, link: the cluster profile and the link the sequence-parallel group's traffic takes.
        dtype: ``bf16`` or ``fp32``, the profile peak the compute runs at.
        ulysses_degree: ``usp``'s degree, when ``usp`` is listed.
    """

    def __init__(
        self,
        strategies: Sequence[str],
        *,
        kind: str,
        seq_len: int,
        sp: int,
        shape: SoftmaxShape,
        profile: ClusterProfile,
        link: Link,
        dtype: str = "bf16",
        ulysses_degree: int | None = None,
    ):
        if not strategies:
            raise ValueError("SoftmaxBatchChooser needs at least one strategy")
        self.strategies = list(strategies)
        self.layout = SequenceLayout(kind, seq_len, sp, 0)
        self.shape, self.profile, self.link, self.dtype = shape, profile, link, dtype
        self.ulysses_degree = ulysses_degree

    def costs(self, cu_seqlens: torch.Tensor | Sequence[int] | None) -> dict[str, float]:
        """Predicted seconds per softmax layer of every strategy on a batch with these global document offsets
        (None: one document)."""
        layout = self.layout.with_documents(cu_seqlens)
        return {
            name: softmax_batch_seconds(
                name, layout, self.shape, self.profile, self.link, dtype=self.dtype, ulysses_degree=self.ulysses_degree
            )
            for name in self.strategies
        }

    def choose(self, cu_seqlens: torch.Tensor | Sequence[int] | None) -> str:
        """The strategy with the lowest predicted time for this batch."""
        costs = self.costs(cu_seqlens)
        return min(self.strategies, key=lambda name: costs[name])
