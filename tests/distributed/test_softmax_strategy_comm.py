"""Softmax strategies: exact bytes per rank against the closed forms of docs/communication.md, errors before
any collective, and the overlap order (next transfer posted before the block is computed)."""

from __future__ import annotations

import math

import pytest
import torch

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence import ring, token_ring
from distseq.parallel.sequence.registry import SOFTMAX_STRATEGIES, make_strategy


def _positions_docs(layout, rank, cu):
    pos = layout.for_rank(rank).positions()
    if cu is None:
        return pos, torch.zeros_like(pos)
    cu = torch.tensor(cu)
    return pos, torch.searchsorted(cu, pos, right=True) - 1


def _pair_nonempty(layout, q_rank, k_rank, causal, cu) -> bool:
    """Brute force over every token pair: does any query of q_rank see any key of k_rank?"""
    qp, qd = _positions_docs(layout, q_rank, cu)
    kp, kd = _positions_docs(layout, k_rank, cu)
    allowed = qd[:, None] == kd[None, :]
    if causal:
        allowed &= kp[None, :] <= qp[:, None]
    return bool(allowed.any())


def expected_bytes(name, layout, batch, heads, kv_heads, dim, elem, causal, cu, ulysses_degree=None):
    """(forward, backward) bytes sent per rank, and (forward, backward) received, from the closed forms."""
    p, r, n = layout.sp_size, layout.sp_rank, layout.local_len
    acc = 8 if elem == 8 else 4
    kv = 2 * batch * n * kv_heads * dim  # K and V elements
    if name == "ring":
        fwd = (p - 1) * kv * elem
        bwd = fwd + (p * kv * acc if p > 1 else 0)
        return (fwd, bwd), (fwd, bwd)
    if name == "allgather_kv":
        fwd = (p - 1) * kv * elem
        return (fwd, fwd + (p - 1) * kv * acc), (fwd, fwd + (p - 1) * kv * acc)
    if name in ("ulysses", "usp"):
        u = p if name == "ulysses" else ulysses_degree
        ring_size = p // u
        kv_rep = kv_heads * (u // math.gcd(kv_heads, u))
        a2a = (u - 1) * batch * n * (2 * heads + 2 * kv_rep) * dim * elem // u
        ring_kv = (ring_size - 1) * 2 * batch * n * kv_rep * dim * elem
        ring_grad = ring_size * 2 * batch * n * kv_rep * dim * acc if ring_size > 1 else 0
        return (a2a + ring_kv, a2a + ring_kv + ring_grad), (a2a + ring_kv, a2a + ring_kv + ring_grad)
    assert name == "token_ring"
    # m: other ranks whose queries see our keys (we send them partials); m': the converse.
    m = sum(_pair_nonempty(layout, j, r, causal, cu) for j in range(p) if j != r)
    m_in = sum(_pair_nonempty(layout, r, j, causal, cu) for j in range(p) if j != r)
    q_bytes = (p - 1) * batch * n * heads * dim * elem
    bundle = (p - 1) * batch * n * (2 * heads * dim * elem + 2 * heads * acc)
    part = batch * n * (heads * dim + heads) * acc
    dq_part = batch * n * heads * dim * acc
    return (q_bytes + m * part, bundle + m * dq_part), (q_bytes + m_in * part, bundle + m_in * dq_part)


CASES = [
    # (kind, heads, kv_heads, causal, documents)
    ("zigzag", 4, 2, True, None),
    ("contiguous", 4, 4, True, None),
    ("contiguous", 4, 1, False, None),
    ("contiguous", 4, 2, True, [0, 3, 9, 24, 32]),  # docs make some remote blocks empty
    ("zigzag", 8, 1, True, [0, 31, 32]),
]


def job_stats(name, dtype_name):
    dtype = getattr(torch, dtype_name)
    comm = Communicator()
    p, r = comm.size, comm.rank
    elem = torch.empty((), dtype=dtype).element_size()
    for kind, heads, kv_heads, causal, cu in CASES:
        seq_len, batch, dim = 32, 2, 4
        layout = SequenceLayout(kind, seq_len, p, r, cu)
        options = {"ulysses_degree": 2 if p >= 2 else 1} if name == "usp" else {}
        strategy = make_strategy(name, comm, layout, **options)
        g = torch.Generator().manual_seed(1)
        q = torch.randn(batch, layout.local_len, heads, dim, generator=g).to(dtype).requires_grad_()
        k = torch.randn(batch, layout.local_len, kv_heads, dim, generator=g).to(dtype).requires_grad_()
        v = torch.randn(batch, layout.local_len, kv_heads, dim, generator=g).to(dtype).requires_grad_()
        strategy.reset_stats()
        out = strategy.attention(q, k, v, causal=causal)
        fwd_sent, fwd_recv = strategy.bytes_sent(), strategy.bytes_received()
        strategy.reset_stats()
        out.backward(torch.ones_like(out))
        bwd_sent, bwd_recv = strategy.bytes_sent(), strategy.bytes_received()
        sent, received = expected_bytes(
            name, layout, batch, heads, kv_heads, dim, elem, causal, cu, options.get("ulysses_degree")
        )
        case = f"{name} {kind} h={heads}/{kv_heads} causal={causal} docs={cu} rank={r}"
        assert (fwd_sent, bwd_sent) == sent, (case, (fwd_sent, bwd_sent), sent)
        assert (fwd_recv, bwd_recv) == received, (case, (fwd_recv, bwd_recv), received)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("name", SOFTMAX_STRATEGIES)
def test_bytes_match_closed_form(worlds, world_size, name):
    worlds(world_size).run(job_stats, name, "float32")


@pytest.mark.parametrize("name", SOFTMAX_STRATEGIES)
def test_bytes_match_closed_form_bf16(worlds, name):
    worlds(4).run(job_stats, name, "bfloat16")


def job_errors(name):
    comm = Communicator()
    p, r = comm.size, comm.rank
    options = {"ulysses_degree": 2} if name == "usp" else {}
    layout = SequenceLayout("zigzag", 16 * p, p, r)
    strategy = make_strategy(name, comm, layout, **options)
    n = layout.local_len

    def t(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype)

    cases = [
        ((t(2, n, 4, 8), t(2, n, 3, 8), t(2, n, 3, 8)), r"heads must be divisible by kv heads: heads=4, kv_heads=3"),
        ((t(2, n, 4, 8), t(1, n, 2, 8), t(1, n, 2, 8)), r"batch mismatch: q batch=2, k/v batch=1"),
        ((t(2, n, 4, 8), t(2, n, 2, 4), t(2, n, 2, 4)), r"head_dim mismatch: q head_dim=8, k/v head_dim=4"),
        ((t(2, n, 4, 8), t(2, n, 2, 8), t(2, n, 1, 8)), r"k and v must have the same shape"),
        ((t(2, n, 4, 8), t(2, n - 2, 2, 8), t(2, n - 2, 2, 8)), rf"local token mismatch: q has {n} tokens"),
        (
            (t(2, n, 4, 8), t(2, n, 2, 8, dtype=torch.float64), t(2, n, 2, 8, dtype=torch.float64)),
            r"one floating dtype, got q=torch.float32 k=torch.float64",
        ),
        ((t(2, n + 2, 4, 8), t(2, n + 2, 2, 8), t(2, n + 2, 2, 8)), rf"q has {n + 2} local tokens but the zigzag"),
        ((t(n, 4, 8), t(n, 2, 8), t(n, 2, 8)), r"must be \[batch, local_tokens, heads, head_dim\]"),
    ]
    if name == "ulysses" and p > 1:
        cases.append(
            (
                (t(2, n, 3 * p + 1, 8),) + (t(2, n, 1, 8),) * 2,
                rf"heads divisible by sp: heads={3 * p + 1}, sp={p}; use strategy='ring' or 'usp'",
            )
        )
    if name == "usp":
        cases.append(
            ((t(2, n, 3, 8),) + (t(2, n, 1, 8),) * 2, r"heads divisible by ulysses_degree: heads=3, ulysses_degree=2")
        )
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            strategy.attention(*args)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and end at seq_len"):
        strategy.attention(t(2, n, 4, 8), t(2, n, 2, 8), t(2, n, 2, 8), cu_seqlens=[0, 5])
    assert strategy.bytes_sent() == 0, "an error was raised after a collective"
    comm.barrier()  # all ranks still in step


@pytest.mark.parametrize("name", SOFTMAX_STRATEGIES)
def test_bad_input_raises_before_any_collective(worlds, name):
    worlds(4).run(job_errors, name)


def job_bad_construction():
    comm = Communicator()
    with pytest.raises(ValueError, match=r"zigzag layout needs seq_len divisible by 8 \(2\*sp\): seq_len=20, sp=4"):
        SequenceLayout("zigzag", 20, comm.size, comm.rank)
    with pytest.raises(ValueError, match=r"unknown sequence-parallel strategy 'rign'"):
        make_strategy("rign", comm, SequenceLayout("zigzag", 16, 4, comm.rank))
    with pytest.raises(ValueError, match=r"ulysses_degree dividing sp: ulysses_degree=3, sp=4"):
        make_strategy("usp", comm, SequenceLayout("zigzag", 16, 4, comm.rank), ulysses_degree=3)
    with pytest.raises(ValueError, match=r"does not match the layout \(sp_rank \d of sp 2\)"):
        make_strategy("ring", comm, SequenceLayout("zigzag", 16, 2, comm.rank % 2))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['degree'\] for strategy 'ring'"):
        make_strategy("ring", comm, SequenceLayout("zigzag", 16, 4, comm.rank), degree=2)
    comm.barrier()


def test_bad_construction(worlds):
    worlds(4).run(job_bad_construction)


class _Recorder:
    """Wraps a Communicator's send_recv so commits and waits are logged next to compute calls."""

    def __init__(self, comm, log):
        self.comm, self.log = comm, log
        self._send_recv = comm.send_recv

    def send_recv(self, *args, **kwargs):
        exchange = self._send_recv(*args, **kwargs)
        commit, wait = exchange.commit, exchange.wait
        tag = kwargs.get("tag", 0)

        def logged_commit():
            self.log.append(("commit", tag))
            commit()
            return exchange

        def logged_wait():
            self.log.append(("wait", tag))
            return wait()

        exchange.commit, exchange.wait = logged_commit, logged_wait
        return exchange


def job_overlap(name):
    comm = Communicator()
    p, r = comm.size, comm.rank
    layout = SequenceLayout("zigzag", 8 * p, p, r)
    strategy = make_strategy(name, comm, layout)
    log = []
    comm.send_recv = _Recorder(comm, log).send_recv
    module = ring if name == "ring" else token_ring
    real_attend = module.attend
    module.attend = lambda *a, **kw: (log.append(("compute", None)), real_attend(*a, **kw))[1]
    try:
        q = torch.randn(1, layout.local_len, 2, 4, requires_grad=True)
        strategy.attention(q, torch.randn(1, layout.local_len, 2, 4), torch.randn(1, layout.local_len, 2, 4))
    finally:
        module.attend = real_attend
    computes = [i for i, e in enumerate(log) if e[0] == "compute"]
    assert len(computes) == p
    # Every compute but the last runs while the next hop of the travelling tensor (tag 0) is in flight.
    for step, i in enumerate(computes[:-1]):
        commits = [j for j, e in enumerate(log) if e == ("commit", 0)]
        waits = [j for j, e in enumerate(log) if e == ("wait", 0)]
        assert commits[step] < i < waits[step], (step, log)


@pytest.mark.parametrize("name", ["ring", "token_ring"])
def test_transfers_overlap_compute(worlds, name):
    worlds(4).run(job_overlap, name)
