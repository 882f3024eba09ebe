"""The local attention kernel calls each softmax strategy makes on each rank, from the strategies' own block plans.

Every softmax strategy cuts its queries and keys into spans and runs one fused kernel per non-empty (query span,
key span) pair (``distseq.parallel.sequence._blocks``); the plan is a function of integers (layout, length, sp,
documents, causality). The planner reads the same plans, so what it charges a rank is what that rank runs: the
contiguous layout's unbalanced causal ring (rank ``r`` runs ``r + 1`` blocks), zigzag's halves, documents that
empty whole blocks, Ulysses' one call over the whole sequence with ``H / P`` heads.

A call's time (forward + backward) on a profile (:class:`AttentionRates`) is

    F / rate_fwd  +  b F / rate_bwd  +  [causal] row_s x h q_len  +  merge bytes / memory bandwidth

``F = 4 D h pairs`` its forward FLOPs, ``pairs`` the query-key pairs it computes (``q_len k_len``, or
``L (L + 1) / 2`` on the diagonal); the rates by pass and mask are a device's published attention-kernel figures
(``b = 2.5``, FlashAttention's count) or else its peak at the attention efficiency, measured or assumed (``b = 2``,
``model_flops_per_sequence``'s count); ``row_s`` the cost per query row of
a causal call's diagonal band (tiles the mask cuts in half still cost whole ones; a full call has none), which
makes a causal call slower than its FLOPs say, the more so the shorter it is; and every call after the first of
its query rows merges its ``(out, lse)`` into the fp32 accumulators (read both, write one: 4 passes over
``q_len h (D + 1)`` fp32 values) and, in backward, adds its ``dq`` and ``dk``, ``dv`` to theirs (2 passes each).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from distseq.kernels.attention import BlockKind
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._blocks import AttentionSpec, block_plan
from distseq.plan.profiles import ClusterProfile

__all__ = [
    "RING_STEPPED",
    "AttentionRates",
    "KernelCall",
    "RankWork",
    "attention_calls",
    "attention_layer_seconds",
    "attention_work",
    "call_seconds",
    "shared_device_seconds",
]


@dataclass(frozen=True)
class KernelCall:
    q_len: int
    k_len: int
    causal: bool  # the aligned diagonal (else every query sees every key)
    heads: int
    merged: bool  # its output merges into accumulators that already hold another block's

    @property
    def pairs(self) -> int:
        return self.q_len * (self.q_len + 1) // 2 if self.causal else self.q_len * self.k_len


def _spec(kind: str, seq_len: int, sp: int, docs: tuple[int, ...] | None) -> AttentionSpec:
    layout = SequenceLayout(kind, seq_len, sp, 0, docs)
    return AttentionSpec(layout, True, 1.0, None, docs)  # the plan does not depend on the scale or the backend


def _steps(plans, heads: int) -> tuple[tuple[KernelCall, ...], ...]:
    """The calls of ``plans`` (one rank's steps, in order), each marked merged when its query rows were written."""
    steps, written = [], set()
    for plan in plans:
        calls = []
        for qs, ks, kind in plan:
            rows = (qs.offset, qs.length)
            calls.append(KernelCall(qs.length, ks.length, kind is BlockKind.CAUSAL, heads, rows in written))
            written.add(rows)
        steps.append(tuple(calls))
    return tuple(steps)


#: strategies whose steps are synchronised by a ring: a rank starts step ``s + 1`` when its next block arrived
RING_STEPPED = frozenset({"ring", "token_ring", "usp"})


@functools.lru_cache(maxsize=1024)
def attention_calls(
    strategy: str,
    kind: str,
    seq_len: int,
    sp: int,
    heads: int,
    ulysses_degree: int | None = None,
    docs: tuple[int, ...] | None = None,
) -> tuple[tuple[tuple[KernelCall, ...], ...], ...]:
    """Per SP rank, per step, the forward kernel calls of one causal softmax layer of ``heads`` heads (this rank's,
    after tensor parallelism) under ``strategy`` on a ``kind`` layout; ``docs``: packed documents' global offsets.
    Ring-style strategies (:data:`RING_STEPPED`) have one step per ring hop; the others one step."""
    spec = _spec(kind, seq_len, sp, docs)
    ranks = range(sp)
    if strategy == "ring":
        per_rank = [[block_plan(spec, [r], [(r - s) % sp]) for s in ranks] for r in ranks]
    elif strategy == "token_ring":  # rank r runs every visiting rank's queries against its own keys
        per_rank = [[block_plan(spec, [(r - s) % sp], [r]) for s in ranks] for r in ranks]
    elif strategy == "allgather_kv":
        per_rank = [[block_plan(spec, [r], list(ranks))] for r in ranks]
    elif strategy == "ulysses":
        if docs is None:  # one call over the whole sequence in order (zigzag reorders first)
            whole = KernelCall(seq_len, seq_len, True, heads // sp, False)
            return tuple(((whole,),) for _ in ranks)
        everyone = list(ranks)
        return tuple(_steps([block_plan(spec, everyone, everyone)], heads // sp) for _ in ranks)
    elif strategy == "usp":
        u = ulysses_degree or 1
        groups = sp // u

        def group(g: int) -> list[int]:
            return [g * u + i for i in range(u)]

        plans = [[block_plan(spec, group(r // u), group((r // u - s) % groups)) for s in range(groups)] for r in ranks]
        return tuple(_steps(rank_plans, heads // u) for rank_plans in plans)
    else:
        raise ValueError(f"no kernel-call model for softmax strategy {strategy!r}")
    return tuple(_steps(plans, heads) for plans in per_rank)


@dataclass(frozen=True)
class AttentionRates:
    """What a softmax kernel call's time is made of on one profile: FLOP/s by pass and mask, the backward's FLOPs
    per forward FLOP in the count those rates use, the causal band's cost per query row and head, and the memory
    bandwidth merges run at (None: merges not modelled)."""

    forward_full: float
    forward_causal: float
    backward_full: float
    backward_causal: float
    backward_factor: float
    row_s: float = 0.0
    memory_bytes_per_s: float | None = None

    @classmethod
    def of(cls, profile: ClusterProfile, dtype: str = "bf16") -> AttentionRates:
        """A device's published attention-kernel rates where the profile has them (FlashAttention's count: the
        backward is 2.5 forwards), else its peak at ``efficiency["attention"]`` for every call (the planner's
        count: the backward is 2 forwards; a measured profile's rate is in that count)."""
        memory = profile.memory_gbps * 1e9 * profile.efficiency.get("memory", 1.0) if profile.memory_gbps else None
        row_s = profile.attention_row_ns * 1e-9
        published = profile.attention_kernel
        if published is not None:
            rates = [published.tflops(backward=b, causal=c) * 1e12 for b in (False, True) for c in (False, True)]
            return cls(*rates, backward_factor=2.5, row_s=row_s, memory_bytes_per_s=memory)
        rate = profile.peak_tflops[dtype] * 1e12 * profile.efficiency["attention"]
        return cls(rate, rate, rate, rate, backward_factor=2.0, row_s=row_s, memory_bytes_per_s=memory)

    def rate(self, *, backward: bool, causal: bool) -> float:
        """FLOP/s of a call of this pass and mask."""
        if backward:
            return self.backward_causal if causal else self.backward_full
        return self.forward_causal if causal else self.forward_full


@dataclass(frozen=True)
class RankWork:
    """One rank's calls reduced to what their time depends on (every term is linear in these sums)."""

    full_head_pairs: int  # sum over full calls of heads x pairs
    causal_head_pairs: int  # sum over causal calls of heads x pairs
    causal_head_rows: int  # sum over causal calls of heads x q_len
    merged_head_q_rows: int  # sum over merged calls of heads x q_len
    merged_head_k_rows: int  # sum over merged calls of heads x k_len

    @classmethod
    def of(cls, calls: tuple[KernelCall, ...]) -> RankWork:
        return cls(
            sum(c.heads * c.pairs for c in calls if not c.causal),
            sum(c.heads * c.pairs for c in calls if c.causal),
            sum(c.heads * c.q_len for c in calls if c.causal),
            sum(c.heads * c.q_len for c in calls if c.merged),
            sum(c.heads * c.k_len for c in calls if c.merged),
        )

    def seconds(self, head_dim: int, rates: AttentionRates) -> float:
        """Forward + backward seconds of these calls: the sum of :func:`call_seconds` over them."""
        full, causal = 4 * head_dim * self.full_head_pairs, 4 * head_dim * self.causal_head_pairs
        seconds = full / rates.forward_full + causal / rates.forward_causal
        seconds += rates.backward_factor * (full / rates.backward_full + causal / rates.backward_causal)
        seconds += rates.row_s * self.causal_head_rows
        if rates.memory_bytes_per_s:
            merge = 4 * self.merged_head_q_rows * (head_dim + 1) * 4
            grads = 2 * (self.merged_head_q_rows + 2 * self.merged_head_k_rows) * head_dim * 4
            seconds += (merge + grads) / rates.memory_bytes_per_s
        return seconds


@functools.lru_cache(maxsize=1024)
def attention_work(
    strategy: str,
    kind: str,
    seq_len: int,
    sp: int,
    heads: int,
    ulysses_degree: int | None = None,
    docs: tuple[int, ...] | None = None,
) -> tuple[tuple[RankWork, ...], ...]:
    """:func:`attention_calls` summed per rank and step (what the cost model charges; cached)."""
    calls = attention_calls(strategy, kind, seq_len, sp, heads, ulysses_degree, docs)
    return tuple(tuple(RankWork.of(step) for step in rank_steps) for rank_steps in calls)


def shared_device_seconds(times: list[float], ranks_per_device: float) -> float:
    """The time of work that takes ``times`` on each rank when ranks share devices: ``P`` ranks on ``P /
    ranks_per_device`` devices (a CPU running more ranks than cores), each rank's time measured with every rank
    busy. The devices are shared fairly among the ranks still working (processor sharing): while ``k`` ranks
    work, each gets ``min(1, devices / k)`` of one, so a rank that finished early lends its share to the others.
    With one device per rank (GPUs) this is the slowest rank's time; balanced work takes its own time either way."""
    p = len(times)
    devices = p / ranks_per_device
    if devices >= p:
        return max(times)
    remaining = sorted(t / ranks_per_device for t in times)  # in device-seconds: the work alone on one device
    clock, done = 0.0, 0.0
    for i, work in enumerate(remaining):
        share = min(1.0, devices / (p - i))  # of a device, per rank still working
        clock += (work - done) / share
        done = work
    return clock


def attention_layer_seconds(
    work: tuple[tuple[RankWork, ...], ...],
    strategy: str,
    head_dim: int,
    rates: AttentionRates,
    *,
    ranks_per_device: float = 1.0,
    hop_s: float = 0.0,
    batch: int = 1,
) -> float:
    """Forward + backward seconds of one softmax layer's kernels (``attention_work``'s per rank and step), with a
    ring strategy's hops: ring steps are synchronised, so each costs its slowest rank or its hop (``hop_s``, the
    time one step's K/V (or queries) take to travel, forward and backward together), whichever is longer; the
    other strategies' ranks run their calls back to back."""
    times = [[batch * w.seconds(head_dim, rates) for w in steps] for steps in work]
    if strategy not in RING_STEPPED:
        return shared_device_seconds([sum(t) for t in times], ranks_per_device)
    total = 0.0
    for s in range(len(times[0])):
        compute = shared_device_seconds([t[s] for t in times], ranks_per_device)
        total += max(compute, hop_s if s else 0.0)
    return total


def call_seconds(call: KernelCall, head_dim: int, rates: AttentionRates) -> float:
    """Forward + backward seconds of one call (see the module docstring)."""
    return RankWork.of((call,)).seconds(head_dim, rates)
