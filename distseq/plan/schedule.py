"""Step-level model of sequence-parallel attention schedules: the kernels, merges and messages each rank of a ring
runs at each step, and the time one layer's forward and backward take on a :class:`ClusterProfile`.

A :class:`Schedule` is, per pass, a list of steps; a step holds one :class:`Work` per rank. The ring synchronises its
ranks step by step (a rank cannot start step ``s + 1`` before the block it needs has arrived), so a pass takes

    T = sum_s max_r t(r, s),    t = max(C, M) if the step's message overlaps its kernels, else C + M,

with ``C`` the rank's kernels plus its merge traffic over HBM and ``M`` its message. For a call of ``q`` queries
against ``k`` keys (``B`` batch, ``H`` query heads, ``D`` head dim; ``pairs = q k``, or ``q k / 2`` when causal, the
count FlashAttention's benchmarks use, so their published rates apply):

* ``softmax``: forward ``4 B H D pairs`` FLOPs, backward ``2.5x`` (five matmuls against two), at the profile's
  published attention-kernel TFLOP/s for the pass and mask, else ``peak x efficiency["attention"]``;
* ``linear_quadratic``: linear attention without the right-product trick, ``(Q K^T * M) V`` per block: the same
  forward FLOPs, backward ``2x`` (four matmuls against two), at ``efficiency["matmul"]``;
* ``linear_intra``: the causal pairs inside chunks of ``c`` tokens of a rank's ``n``, ``4 B H D sum_chunks c (c+1)/2``;
  ``linear_state``: the state readout and update, ``4 B H D^2 n``; both backward ``2x``, at ``efficiency["scan"]``;
* merges and accumulations: their bytes over ``memory_gbps x efficiency["memory"]``;
* a ring hop (``p2p``): ``bytes / (link GB/s x efficiency["link"]) + latency`` on the inter-node link when the ring
  spans nodes (its slowest hop sets the synchronised step), else intra-node; an ``all_gather`` of ``s`` bytes per rank
  over ``P = N g`` ranks (``N`` nodes of ``g`` GPUs, one NIC per GPU):
  ``max((P-1) s / intra, (N-1) s / inter) + (P-1) latency``: every rank receives ``(P-1) s`` over NVLink and every
  node ``(N-1) g s`` through its ``g`` NICs.

Strategies (:data:`SCHEDULES`): ``ring`` (softmax, per token layout: contiguous, zigzag, stripe), ``ring_linear``
(the same ring running linear attention without the right-product trick), ``lasp1`` (a chain of ``P`` state hand-offs,
each waiting for the previous rank's state update) and ``lasp2`` (one all-gather of the ``D x D`` states).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from distseq.plan.calls import AttentionRates
from distseq.plan.cost import link_seconds
from distseq.plan.profiles import ClusterProfile, Link

__all__ = [
    "SCHEDULES",
    "AttentionDims",
    "Collective",
    "Kernel",
    "KernelKind",
    "LayerTime",
    "MergePasses",
    "Message",
    "RingLayout",
    "Schedule",
    "Work",
    "build_schedule",
    "kernel_seconds",
    "layer_time",
    "message_seconds",
]

_FP32 = 4


class KernelKind(StrEnum):
    SOFTMAX = "softmax"
    LINEAR_QUADRATIC = "linear_quadratic"  # (Q K^T * M) V: no right-product trick
    LINEAR_INTRA = "linear_intra"  # chunked linear attention: the causal pairs inside each chunk
    LINEAR_STATE = "linear_state"  # chunked linear attention: the state readout and update


class Collective(StrEnum):
    P2P = "p2p"  # to the next ring rank
    ALL_GATHER = "all_gather"


class RingLayout(StrEnum):
    """Which tokens rank ``r`` of ``P`` holds: chunk ``r`` of ``P``; chunks ``r`` and ``2P-1-r`` of ``2P``; or every
    token ``i`` with ``i mod P = r``."""

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"
    STRIPE = "stripe"


@dataclass(frozen=True)
class AttentionDims:
    """One attention layer's sizes on one rank: ``tokens`` per rank, ``chunk`` the linear-attention chunk length."""

    tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 1
    dtype_bytes: int = 2
    chunk: int = 64

    def __post_init__(self) -> None:
        sizes = {k: getattr(self, k) for k in ("tokens", "heads", "kv_heads", "head_dim", "batch", "chunk")}
        if min(sizes.values()) < 1:
            raise ValueError(f"attention sizes must be >= 1, got {sizes}")

    def accumulator_bytes(self, rows: int, heads: int) -> int:
        """fp32 bytes of a ``[B, rows, heads, D]`` accumulator."""
        return self.batch * rows * heads * self.head_dim * _FP32

    @property
    def kv_bytes(self) -> int:
        """A rank's K and V in the activation dtype."""
        return 2 * self.batch * self.tokens * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def state_bytes(self) -> int:
        """A rank's fp32 linear-attention state ``[B, H, D, D]``."""
        return self.batch * self.heads * self.head_dim**2 * _FP32


@dataclass(frozen=True)
class Kernel:
    """One kernel call: ``q_len`` queries against ``k_len`` keys, causal or full (see the module docstring)."""

    kind: KernelKind
    q_len: int
    k_len: int
    causal: bool

    def pairs(self) -> float:
        return self.q_len * self.k_len / (2 if self.causal else 1)

    def flops(self, dims: AttentionDims, *, backward: bool) -> float:
        bh, d = dims.batch * dims.heads, dims.head_dim
        kind = KernelKind(self.kind)
        if kind in (KernelKind.SOFTMAX, KernelKind.LINEAR_QUADRATIC):
            forward = 4 * bh * d * self.pairs()
        elif kind is KernelKind.LINEAR_INTRA:
            full, rest = divmod(self.q_len, dims.chunk)
            forward = 4 * bh * d * (full * dims.chunk * (dims.chunk + 1) / 2 + rest * (rest + 1) / 2)
        else:
            forward = 4 * bh * d * d * self.q_len
        return forward * ((2.5 if kind is KernelKind.SOFTMAX else 2.0) if backward else 1.0)


@dataclass(frozen=True)
class Message:
    """What a rank sends in a step: ``nbytes`` to the next ring rank (``p2p``) or to every rank (``all_gather``)."""

    nbytes: int
    collective: Collective = Collective.P2P
    overlapped: bool = True  # posted before the step's kernels and waited after them


@dataclass(frozen=True)
class Work:
    """One rank's share of one step: kernel calls, merge/accumulation traffic over HBM (bytes), a message."""

    kernels: tuple[Kernel, ...] = ()
    memory_bytes: float = 0.0
    message: Message | None = None


@dataclass(frozen=True)
class MergePasses:
    """Memory traffic of the output merges and gradient accumulations, in fp32-accumulator sizes of the rows
    involved. The defaults are ring-flash-attention's, whose ``update_out_and_lse`` runs as separate elementwise
    kernels: the first block's ``bf16 -> fp32`` cast (read 0.5, write 1); a merge = the cast + ``out - block``
    (read 2, write 1) + the sigmoid-weighted product (read 1, write 1) + the subtraction (read 2, write 1); a merge
    into a slice of ``out`` copies the slice back (read 1, write 1); a gradient ``acc += bf16 block`` (read 1.5,
    write 1); the final cast to bf16 (read 1, write 0.5)."""

    first: float = 1.5
    merge: float = 9.5
    slice_copy: float = 2.0
    accumulate: float = 2.5
    finish: float = 1.5


RING_FLASH_ATTN = MergePasses()
#: linear attention's partial outputs simply add (``out += block``): no LSE weighting
LINEAR_SUM = MergePasses(merge=2.5)


@dataclass(frozen=True)
class Schedule:
    """Per pass, the steps; per step, one :class:`Work` per ring rank."""

    strategy: str
    ring: int
    layout: RingLayout
    forward: tuple[tuple[Work, ...], ...]
    backward: tuple[tuple[Work, ...], ...]

    def pairs_per_rank(self, *, backward: bool = False) -> list[float]:
        """Query-key pairs each rank computes in a pass (causal calls count half)."""
        steps = self.backward if backward else self.forward
        return [sum(k.pairs() for step in steps for k in step[r].kernels) for r in range(self.ring)]


@dataclass(frozen=True)
class _Block:
    q_len: int
    k_len: int
    causal: bool
    sliced: bool = False  # the merge writes into a slice of the accumulator


def _ring_block(layout: RingLayout, rank: int, step: int, ring: int, n: int) -> _Block | None:
    """The attention block rank ``rank`` computes at ring step ``step`` (it holds ring rank ``rank - step``'s K/V),
    as ring-flash-attention's implementations call it; ``None`` when every pair is masked."""
    source = (rank - step) % ring
    if step == 0:
        return _Block(n, n, causal=True)
    if layout is RingLayout.CONTIGUOUS:
        return _Block(n, n, causal=False) if source < rank else None
    if layout is RingLayout.ZIGZAG:  # our two chunks against the source's first; our second against both of its
        return _Block(n, n // 2, causal=False) if source < rank else _Block(n // 2, n, causal=False, sliced=True)
    # stripe: a lower source's tokens precede ours position by position (diagonal included), a higher one's by one
    return _Block(n, n, causal=True) if source < rank else _Block(n - 1, n - 1, causal=True, sliced=True)


def ring_schedule(
    ring: int,
    dims: AttentionDims,
    layout: RingLayout | str = RingLayout.CONTIGUOUS,
    *,
    kind: KernelKind = KernelKind.SOFTMAX,
    passes: MergePasses = RING_FLASH_ATTN,
) -> Schedule:
    """Ring attention over ``ring`` ranks: K/V rotate one hop per step (``P - 1`` hops forward); backward they rotate
    again with the fp32 dK/dV accumulators (``P`` hops), every hop posted before the step's kernel."""
    layout = RingLayout(layout)
    n = dims.tokens
    if layout is RingLayout.ZIGZAG and n % 2:
        raise ValueError(f"the zigzag layout holds two equal chunks per rank: tokens per rank must be even, got {n}")
    dkv_bytes = 2 * dims.accumulator_bytes(n, dims.kv_heads)

    def q_acc(rows: int) -> int:
        return dims.accumulator_bytes(rows, dims.heads)

    def kv_acc(rows: int) -> int:
        return dims.accumulator_bytes(rows, dims.kv_heads)

    def forward(rank: int, step: int) -> Work:
        block = _ring_block(layout, rank, step, ring, n)
        memory = passes.finish * q_acc(n) if step == ring - 1 else 0.0
        kernels: tuple[Kernel, ...] = ()
        if block is not None:
            kernels = (Kernel(kind, block.q_len, block.k_len, block.causal),)
            per_row = passes.first if step == 0 else passes.merge + passes.slice_copy * block.sliced
            memory += per_row * q_acc(block.q_len)
        message = Message(dims.kv_bytes) if step < ring - 1 else None
        return Work(kernels, memory, message)

    def backward(rank: int, step: int) -> Work:
        block = _ring_block(layout, rank, step, ring, n)
        memory = passes.finish * (q_acc(n) + 2 * kv_acc(n)) if step == ring - 1 else 0.0
        kernels: tuple[Kernel, ...] = ()
        if block is not None:
            kernels = (Kernel(kind, block.q_len, block.k_len, block.causal),)
            per_row = passes.first if step == 0 else passes.accumulate
            memory += per_row * (q_acc(block.q_len) + 2 * kv_acc(block.k_len))
        sent = (dims.kv_bytes if step < ring - 1 else 0) + (dkv_bytes if ring > 1 else 0)
        return Work(kernels, memory, Message(sent) if sent else None)

    steps = range(ring)
    return Schedule(
        strategy="ring" if kind is KernelKind.SOFTMAX else "ring_linear",
        ring=ring,
        layout=layout,
        forward=tuple(tuple(forward(r, s) for r in steps) for s in steps),
        backward=tuple(tuple(backward(r, s) for r in steps) for s in steps),
    )


def _local_linear(n: int) -> tuple[Kernel, Kernel]:
    return Kernel(KernelKind.LINEAR_INTRA, n, n, causal=True), Kernel(KernelKind.LINEAR_STATE, n, n, causal=False)


def lasp2_schedule(ring: int, dims: AttentionDims, *, overlap: bool = True) -> Schedule:
    """LASP-2: each rank computes its chunk's state, one all-gather of the ``[B, H, D, D]`` states (forward; their
    gradients backward), a prefix sum over the gathered states, and the local pass. ``overlap``: the all-gather runs
    behind the intra-chunk kernel (the paper's design); LASP-2's released code calls it blocking, before."""
    state = dims.state_bytes
    gather = Message(state, Collective.ALL_GATHER, overlapped=overlap) if ring > 1 else None
    work = Work(_local_linear(dims.tokens), ring * state, gather)
    return Schedule("lasp2", ring, RingLayout.CONTIGUOUS, forward=((work,) * ring,), backward=((work,) * ring,))


def lasp1_schedule(ring: int, dims: AttentionDims, *, whole_pass_on_chain: bool = True) -> Schedule:
    """LASP-1: rank ``r`` waits for rank ``r - 1``'s state, runs its link, sends its state on (forward, ranks
    ``0 .. P-1``; backward the state gradients travel ``P-1 .. 0``): ``P`` serialized links and ``P - 1`` hand-offs,
    no overlap. ``whole_pass_on_chain``: the link is the rank's whole local pass, as in LASP's released code (the
    receive precedes every local kernel); otherwise, as in its paper's algorithm, the intra-chunk kernels run on
    every rank first and a link is the state readout and update alone."""
    intra, state_kernel = _local_linear(dims.tokens)
    link_kernels = (intra, state_kernel) if whole_pass_on_chain else (state_kernel,)
    idle = Work()

    def chain(order: list[int]) -> tuple[tuple[Work, ...], ...]:
        steps = [] if whole_pass_on_chain else [(Work((intra,)),) * ring]
        for position, rank in enumerate(order):
            message = Message(dims.state_bytes, overlapped=False) if position < ring - 1 else None
            link = Work(link_kernels, dims.state_bytes, message)  # the received state added to the local one
            steps.append(tuple(link if r == rank else idle for r in range(ring)))
        return tuple(steps)

    return Schedule(
        "lasp1", ring, RingLayout.CONTIGUOUS, forward=chain(list(range(ring))), backward=chain(list(range(ring))[::-1])
    )


def _linear_only(builder: Callable[..., Schedule]) -> Callable[..., Schedule]:
    def build(ring: int, dims: AttentionDims, layout: RingLayout | str = RingLayout.CONTIGUOUS) -> Schedule:
        if RingLayout(layout) is not RingLayout.CONTIGUOUS:
            raise ValueError(
                f"{builder.__name__.removesuffix('_schedule')} runs on the contiguous layout, got {layout}"
            )
        return builder(ring, dims)

    return build


def _ring_linear(ring: int, dims: AttentionDims, layout: RingLayout | str = RingLayout.CONTIGUOUS) -> Schedule:
    return ring_schedule(ring, dims, layout, kind=KernelKind.LINEAR_QUADRATIC, passes=LINEAR_SUM)


#: strategy name -> ``builder(ring, dims, layout) -> Schedule``: the one place a name becomes a schedule
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "ring": ring_schedule,
    "ring_linear": _ring_linear,
    "lasp1": _linear_only(lasp1_schedule),
    "lasp2": _linear_only(lasp2_schedule),
}


def build_schedule(
    strategy: str, ring: int, dims: AttentionDims, layout: RingLayout | str = RingLayout.CONTIGUOUS
) -> Schedule:
    if strategy not in SCHEDULES:
        raise ValueError(f"unknown schedule {strategy!r}; choose one of {sorted(SCHEDULES)}")
    if ring < 1:
        raise ValueError(f"a ring needs at least one rank, got ring={ring}")
    return SCHEDULES[strategy](ring, dims, layout)


def kernel_seconds(kernel: Kernel, dims: AttentionDims, profile: ClusterProfile, *, backward: bool) -> float:
    """One call's time: its FLOPs at the rate of its kind (see the module docstring)."""
    peak = profile.peak_tflops["bf16"] * 1e12
    if kernel.kind == KernelKind.SOFTMAX:  # the planner's rates: published by pass and mask, else the efficiency
        rate = AttentionRates.of(profile).rate(backward=backward, causal=kernel.causal)
    elif kernel.kind == KernelKind.LINEAR_QUADRATIC:
        rate = peak * profile.efficiency["matmul"]
    else:
        rate = peak * profile.efficiency["scan"]
    return kernel.flops(dims, backward=backward) / rate


def _link_seconds(nbytes: float, link: Link, profile: ClusterProfile) -> float:
    """One message of ``nbytes`` over ``link``, as the planner prices it."""
    return link_seconds(nbytes, 1, link, profile.efficiency["link"])


def message_seconds(message: Message, ring: int, profile: ClusterProfile, gpus_per_node: int) -> float:
    """A message's time in a group of ``ring`` ranks, ``gpus_per_node`` to a node (formulas in the module docstring)."""
    nodes = -(-ring // gpus_per_node)
    if message.collective == Collective.P2P:
        return _link_seconds(message.nbytes, profile.inter if nodes > 1 else profile.intra, profile)
    if message.collective == Collective.ALL_GATHER:
        intra = _link_seconds((ring - 1) * message.nbytes, profile.intra, profile) - profile.intra.latency_us * 1e-6
        inter = _link_seconds((nodes - 1) * message.nbytes, profile.inter, profile) - profile.inter.latency_us * 1e-6
        latency = (profile.inter if nodes > 1 else profile.intra).latency_us * 1e-6
        return max(intra, inter) + (ring - 1) * latency
    raise ValueError(f"unknown collective {message.collective!r}")


def _work_seconds(
    work: Work, schedule: Schedule, dims: AttentionDims, profile: ClusterProfile, gpus_per_node: int, backward: bool
) -> float:
    compute = sum(kernel_seconds(k, dims, profile, backward=backward) for k in work.kernels)
    if work.memory_bytes:
        if profile.memory_gbps is None:
            raise ValueError(f"profile {profile.name!r} has no memory_gbps: merges cannot be timed")
        compute += work.memory_bytes / (profile.memory_gbps * 1e9 * profile.efficiency.get("memory", 1.0))
    if work.message is None:
        return compute
    message = message_seconds(work.message, schedule.ring, profile, gpus_per_node)
    return max(compute, message) if work.message.overlapped else compute + message


@dataclass(frozen=True)
class LayerTime:
    """One layer's predicted time; ``*_steps`` the synchronised steps (the slowest rank of each)."""

    forward_steps: tuple[float, ...]
    backward_steps: tuple[float, ...]

    @property
    def forward_s(self) -> float:
        return sum(self.forward_steps)

    @property
    def backward_s(self) -> float:
        return sum(self.backward_steps)

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s


def layer_time(schedule: Schedule, dims: AttentionDims, profile: ClusterProfile, *, gpus_per_node: int) -> LayerTime:
    """``T = sum_s max_r t(r, s)`` for each pass of ``schedule`` on ``profile``."""
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}")

    def steps(passes: tuple[tuple[Work, ...], ...], backward: bool) -> tuple[float, ...]:
        return tuple(
            max(_work_seconds(w, schedule, dims, profile, gpus_per_node, backward) for w in step) for step in passes
        )

    return LayerTime(steps(schedule.forward, False), steps(schedule.backward, True))
