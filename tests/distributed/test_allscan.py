"""All-Scan: the pipelined state chain. Linear attention (every decay mode) and the gated delta rule with block
sizes that do and do not divide the state, both layouts, documents crossing ranks: output and every gradient
equal the single-process recurrence; bytes per rank at most 1/(P-1) of LASP-2's plus its decay scalars, the same
at 8K and 64K; receives posted before the local work, and each piece forwarded before the next is awaited.

Tolerances: max abs error <= 1e-9 in fp64; <= 1e-5 of the largest entry in fp32. The (linear attention) parity
matrix at sp = 1, 2, 4 with whole states runs in test_linear_strategies.py (allscan is a linear strategy there).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from distseq.kernels.delta_rule import naive_recurrent_gated_delta_rule
from distseq.kernels.linear_attention import naive_recurrent_linear_attention
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy
from distseq.testing.sync import OpLog

HEADS, KEY_DIM, VALUE_DIM = 2, 4, 3


def _inputs(seq_len, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq_len, HEADS, KEY_DIM, generator=g, dtype=torch.float64) * 0.5
    k = torch.nn.functional.normalize(torch.randn(2, seq_len, HEADS, KEY_DIM, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(2, seq_len, HEADS, VALUE_DIM, generator=g, dtype=torch.float64)
    beta = torch.rand(2, seq_len, HEADS, generator=g, dtype=torch.float64)
    gate = torch.nn.functional.logsigmoid(torch.randn(2, seq_len, HEADS, generator=g, dtype=torch.float64) + 2)
    decay = -torch.rand(HEADS, generator=g, dtype=torch.float64) * 0.3
    dout = torch.randn(2, seq_len, HEADS, VALUE_DIM, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, beta, gate, decay, dout)]


def _err(got, want, dtype):
    if dtype == torch.float64:
        return (got.double() - want).abs().max().item(), 1e-9
    return ((got.double() - want).abs().max() / want.abs().max()).item(), 1e-5


def job_parity(op, dtype_name, cases):
    dtype = getattr(torch, dtype_name)
    comm = Communicator()
    p, r = comm.size, comm.rank
    failures = []
    for kind, mode, docs, block in cases:
        seq_len = 8 * p * 5
        cu = torch.tensor([0, 3, 17, 18, seq_len - 9, seq_len]) if docs else None
        q, k, v, beta, gate, decay, dout = _inputs(seq_len, dtype)
        gate = gate if mode in ("gate", "both") else None
        decay = decay if mode in ("decay", "both") and op == "linear" else None
        names = ["q", "k", "v", "beta", "gate", "decay"]
        full = {
            n: None if t is None else t.detach().double().requires_grad_()
            for n, t in zip(names, (q, k, v, beta, gate, decay), strict=True)
        }
        if op == "linear":
            want, _ = naive_recurrent_linear_attention(
                full["q"], full["k"], full["v"], decay=full["decay"], gate=full["gate"], cu_seqlens=cu
            )
        else:
            want, _ = naive_recurrent_gated_delta_rule(
                full["q"], full["k"], full["v"], full["beta"], gate=full["gate"], cu_seqlens=cu
            )
        want.backward(dout.double())

        layout = SequenceLayout(kind, seq_len, p, r, cu)
        strategy = make_strategy("allscan", comm, layout, chunk_size=8, block=block)
        local = {
            n: None if t is None else layout.shard(t.detach(), 1).requires_grad_()
            for n, t in zip(names[:5], (q, k, v, beta, gate), strict=True)
        }
        local["decay"] = None if decay is None else decay.detach().clone().requires_grad_()
        if op == "linear":
            out = strategy.linear_attention(
                local["q"], local["k"], local["v"], decay=local["decay"], gate=local["gate"]
            )
        else:
            out = strategy.delta_rule(local["q"], local["k"], local["v"], local["beta"], gate=local["gate"])
        out.backward(layout.shard(dout, 1))
        checks = [("out", out, layout.shard(want.detach(), 1))]
        for n in ("q", "k", "v", "gate") + (("beta",) if op == "delta" else ()):
            if local[n] is not None:
                checks.append((f"d{n}", local[n].grad, layout.shard(full[n].grad, 1)))
        if local["decay"] is not None:  # replicated: its gradient is the sum over ranks
            total = local["decay"].grad.clone()
            if p > 1:
                dist.all_reduce(total)
            checks.append(("ddecay", total, full["decay"].grad))
        for label, got, ref in checks:
            err, tol = _err(got, ref, dtype)
            if not err <= tol:
                failures.append(f"{op} {kind} {mode} docs={docs} block={block} {label}: {err:.3g} > {tol}")
    assert not failures, "\n".join(failures)


LINEAR_CASES = list(itertools.product(["contiguous", "zigzag"], ["none", "both"], [False, True], [1, 3]))
LINEAR_CASES += [("zigzag", "decay", True, 2), ("contiguous", "gate", True, None)]
DELTA_CASES = list(itertools.product(["contiguous", "zigzag"], ["gate"], [False, True], [2, None]))
DELTA_CASES += [("zigzag", "none", True, 1)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_linear_attention_in_pieces(worlds, world_size):
    worlds(world_size).run(job_parity, "linear", "float64", LINEAR_CASES, timeout=240)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_delta_rule_in_pieces(worlds, world_size):
    worlds(world_size).run(job_parity, "delta", "float64", DELTA_CASES, timeout=240)


def test_fp32(worlds):
    cases = [("zigzag", "both", True, 3)]
    worlds(4).run(job_parity, "linear", "float32", cases)
    worlds(4).run(job_parity, "delta", "float32", [("zigzag", "gate", True, 2)])


def job_bytes(name, seq_len, kind):
    comm = Communicator()
    layout = SequenceLayout(kind, seq_len, comm.size, comm.rank)
    options = {"block": 3} if name == "allscan" else {}
    strategy = make_strategy(name, comm, layout, chunk_size=256, **options)
    q, k, v, _, gate, decay, dout = _inputs(seq_len, torch.float32)
    local = [layout.shard(t, 1).requires_grad_() for t in (q, k, v, gate)]
    comm.stats.reset()
    out = strategy.linear_attention(*local[:3], decay=decay, gate=local[3])
    forward = comm.stats.bytes_received
    comm.stats.reset()
    out.backward(layout.shard(dout, 1))
    return forward, comm.stats.bytes_received


def test_bytes_received_are_a_fraction_of_lasp2s(worlds):
    """sp = 4: each rank receives at most one state per chunk it holds (2 on zigzag, 1 on contiguous), whatever
    the length; LASP-2 receives (P-1) of them per chunk plus a decay scalar each."""
    world, p = worlds(4), 4
    state, scalar = 2 * HEADS * KEY_DIM * VALUE_DIM * 4, 2 * HEADS * 4
    for kind, chunks in (("zigzag", 2), ("contiguous", 1)):
        seen = []
        for seq_len in (8192, 65536):
            lasp2 = world.run(job_bytes, "lasp2", seq_len, kind, timeout=240)
            allscan = world.run(job_bytes, "allscan", seq_len, kind, timeout=240)
            for (l_fwd, l_bwd), (a_fwd, a_bwd) in zip(lasp2, allscan, strict=True):
                assert l_fwd == (p - 1) * chunks * (state + scalar) and l_bwd == (p - 1) * chunks * state
                assert a_fwd <= chunks * state and a_bwd <= chunks * state
                assert a_fwd <= (l_fwd - (p - 1) * chunks * scalar) / (p - 1)
            seen.append(allscan)
        assert seen[0] == seen[1]  # independent of the length
        # every state that leaves a rank arrives at another: the chain's hops, counted per rank
        totals = [sum(f for f, _ in seen[0]), sum(b for _, b in seen[0])]
        hops = 2 * p - 1 if kind == "zigzag" else p - 1
        assert totals == [(hops - (1 if kind == "zigzag" else 0)) * state] * 2


def job_overlap(kind):
    """The order of events on each rank: receives posted, local work, then per piece: wait, combine, send."""
    comm = Communicator().view("allscan")
    p, r = comm.size, comm.rank
    log = []
    send_recv = comm.send_recv

    def recording(tensors, shift=1, **kwargs):
        exchange = send_recv(tensors, shift, **kwargs)
        what = "recv" if not kwargs.get("send", True) else "send"
        commit, wait = exchange.commit, exchange.wait
        exchange.commit = lambda: (log.append(f"{what} posted {kwargs['tag']}"), commit())[1]
        exchange.wait = lambda: (log.append(f"{what} waited {kwargs['tag']}"), wait())[1]
        return exchange

    comm.send_recv = recording
    layout = SequenceLayout(kind, 32 * p, p, r)
    strategy = make_strategy("allscan", comm, layout, chunk_size=4, block=1)
    q, k, v, _, gate, _, dout = _inputs(32 * p, torch.float64)
    local = [layout.shard(t, 1).requires_grad_() for t in (q, k, v, gate)]
    with OpLog(log), torch.no_grad():
        strategy.linear_attention(*local[:3], gate=local[3])
    return log


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_pieces_overlap(worlds, kind):
    pieces = KEY_DIM  # block=1: one row of the state per piece
    for rank, log in enumerate(worlds(4).run(job_overlap, kind)):
        at = {e: i for i, e in enumerate(log) if not e.startswith("aten.")}
        posted = [i for e, i in at.items() if e.startswith("recv posted")]
        waited = [i for e, i in at.items() if e.startswith("recv waited")]
        if not posted:
            assert rank == 0 and kind == "contiguous", log  # only the chain's first rank receives nothing
            continue
        # every receive is posted before any is awaited, and the local intra-chunk products run in between
        assert max(posted) < min(waited), at
        assert log[max(posted) : min(waited)].count("aten.bmm") >= 1, at
        # piece i of a chunk is sent on before piece i + 1 of that chunk is awaited
        for e in at:
            if not e.startswith("recv waited"):
                continue
            tag = int(e.split()[-1])
            send, next_wait = f"send posted {tag + pieces}", f"recv waited {tag + 1}"
            if tag % pieces < pieces - 1 and send in at:
                assert at[send] < at[next_wait], (e, at)
