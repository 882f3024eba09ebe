"""LASP-2 and LASP-1 on both layouts, all decay modes, with and without documents: output and every gradient
equal the single-process naive recurrence over the whole sequence; exact state-exchange bytes.

Tolerances: max abs error <= 1e-9 in fp64 and <= 1e-5 (relative to the tensor's largest entry) in fp32.
``decay`` is replicated on every rank, so its gradient is the sum over ranks (as a data-parallel-style
reduction over the SP group would make it).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from distseq.kernels.linear_attention import naive_recurrent_linear_attention, value_checks
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, make_strategy

MODES = ["none", "decay", "gate", "both"]


def _inputs(mode, seq_len, heads=4, key_dim=4, value_dim=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, seq_len, heads, key_dim, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(2, seq_len, heads, value_dim, generator=g, dtype=torch.float64)
    decay = -torch.rand(heads, generator=g, dtype=torch.float64) * 0.3 if mode in ("decay", "both") else None
    gate = None
    if mode in ("gate", "both"):
        gate = torch.nn.functional.logsigmoid(torch.randn(2, seq_len, heads, generator=g, dtype=torch.float64) + 2)
    dout = torch.randn(2, seq_len, heads, value_dim, generator=g, dtype=torch.float64)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [cast(t) for t in (q, k, v, decay, gate, dout)]


def _reference(q, k, v, decay, gate, dout, cu):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (q, k, v, decay, gate)]
    out, _ = naive_recurrent_linear_attention(*leaves[:3], decay=leaves[3], gate=leaves[4], cu_seqlens=cu)
    out.backward(dout.double())
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _close(label, got, want, dtype, failures):
    if dtype == torch.float64:
        err, tol = (got.double() - want).abs().max().item(), 1e-9
    else:
        err, tol = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item(), 1e-5
    if not err <= tol:
        failures.append(f"{label}: {err:.3g} > {tol}")


def job_parity(name, dtype_name, cases):
    dtype = getattr(torch, dtype_name)
    comm = Communicator()
    p, r = comm.size, comm.rank
    failures = []
    for kind, mode, docs, chunk_size in cases:
        seq_len = 8 * p * 5  # 40 tokens per rank: chunk sizes 8 and 7 do not divide the chunks
        cu = torch.tensor([0, 3, 17, 18, seq_len - 9, seq_len]) if docs else None
        q, k, v, decay, gate, dout = _inputs(mode, seq_len, dtype=dtype)
        ref_out, ref_grads = _reference(q, k, v, decay, gate, dout, cu)
        layout = SequenceLayout(kind, seq_len, p, r, cu)
        strategy = make_strategy(name, comm, layout, chunk_size=chunk_size)
        local = [None if t is None else t.detach().clone() for t in (q, k, v)]
        local = [layout.shard(t, 1).requires_grad_() for t in local]
        local_gate = None if gate is None else layout.shard(gate, 1).detach().requires_grad_()
        local_decay = None if decay is None else decay.detach().clone().requires_grad_()
        out = strategy.linear_attention(*local, decay=local_decay, gate=local_gate)
        out.backward(layout.shard(dout, 1))
        case = f"{name} {kind} {mode} docs={docs} chunk={chunk_size}"
        _close(f"{case} out", out, layout.shard(ref_out, 1), dtype, failures)
        for label, got, want in zip(["dq", "dk", "dv"], local, ref_grads[:3], strict=True):
            _close(f"{case} {label}", got.grad, layout.shard(want, 1), dtype, failures)
        if local_gate is not None:
            _close(f"{case} dgate", local_gate.grad, layout.shard(ref_grads[4], 1), dtype, failures)
        if local_decay is not None:
            total = local_decay.grad.clone()
            dist.all_reduce(total) if dist.is_initialized() and p > 1 else None
            _close(f"{case} ddecay", total, ref_grads[3], dtype, failures)
    assert not failures, "\n".join(failures)


CASES = [
    (kind, mode, docs, 8) for kind, mode, docs in itertools.product(["contiguous", "zigzag"], MODES, [False, True])
]
CASES += [("zigzag", "both", True, 7), ("contiguous", "gate", False, 64)]


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("name", [*LINEAR_STRATEGIES, "ulysses"])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_parity(worlds, world_size, name, dtype_name):
    worlds(world_size).run(job_parity, name, dtype_name, CASES, timeout=300)


def job_lasp2_bytes(kind, mode, docs):
    """One all-gather each way; bytes independent of N (8K vs 64K tokens)."""
    comm = Communicator()
    p, r = comm.size, comm.rank
    batch, heads, key_dim, value_dim = 2, 2, 8, 4  # batch 2: _inputs makes two rows
    per_n = []
    for seq_len in (8192, 65536):
        layout = SequenceLayout(kind, seq_len, p, r, [0, 100, seq_len - 5000, seq_len] if docs else None)
        strategy = make_strategy("lasp2", comm, layout, chunk_size=256)
        q, k, v, decay, gate, dout = _inputs(mode, seq_len, heads, key_dim, value_dim, torch.float32)
        local = [layout.shard(t, 1).requires_grad_() for t in (q, k, v)]
        local_gate = None if gate is None else layout.shard(gate, 1)
        comm.stats.reset()
        out = strategy.linear_attention(*local, decay=decay, gate=local_gate)
        fwd = comm.stats.as_dict()
        comm.stats.reset()
        out.backward(layout.shard(dout, 1))
        bwd = comm.stats.as_dict()
        per_n.append((fwd, bwd))
    chunks = len(layout.chunks())
    state = (p - 1) * chunks * batch * heads * key_dim * value_dim * 4
    scalars = (p - 1) * chunks * batch * heads * 4
    expected_fwd = {"all_gather": {"calls": 1, "bytes_sent": state + scalars, "bytes_received": state + scalars}}
    expected_bwd = {"all_gather": {"calls": 1, "bytes_sent": state, "bytes_received": state}}
    for fwd, bwd in per_n:
        assert fwd == expected_fwd, (fwd, expected_fwd)
        assert bwd == expected_bwd, (bwd, expected_bwd)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize(("kind", "mode", "docs"), [("zigzag", "both", True), ("contiguous", "none", False)])
def test_lasp2_one_all_gather_each_way_independent_of_length(worlds, world_size, kind, mode, docs):
    worlds(world_size).run(job_lasp2_bytes, kind, mode, docs)


def job_lasp1_bytes(kind):
    comm = Communicator()
    p, r = comm.size, comm.rank
    layout = SequenceLayout(kind, 64 * p, p, r)
    strategy = make_strategy("lasp1", comm, layout, chunk_size=16)
    q, k, v, decay, gate, dout = _inputs("decay", 64 * p, 2, 4, 3, torch.float32)
    local = [layout.shard(t, 1).requires_grad_() for t in (q, k, v)]
    comm.stats.reset()
    out = strategy.linear_attention(*local, decay=decay)
    out.backward(layout.shard(dout, 1))
    state = 2 * 2 * 4 * 3 * 4  # B h dk dv fp32
    # Hops of the chain leaving this rank, forward (to the next chunk) and backward (to the previous one).
    owner = {c: j for j in range(p) for c in layout.chunk_indices_of(j)}
    fwd_hops = sum(1 for c in layout.chunks() if c + 1 < layout.num_chunks and owner[c + 1] != r)
    bwd_hops = sum(1 for c in layout.chunks() if c > 0 and owner[c - 1] != r)
    assert comm.stats["send"].bytes_sent == (fwd_hops + bwd_hops) * state
    assert comm.stats.bytes_sent == comm.stats["send"].bytes_sent


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_lasp1_serial_chain_bytes(worlds, world_size, kind):
    worlds(world_size).run(job_lasp1_bytes, kind)


def job_errors():
    comm = Communicator()
    p, r = comm.size, comm.rank
    layout = SequenceLayout("zigzag", 16 * p, p, r)
    strategy = make_strategy("lasp2", comm, layout)
    n = layout.local_len
    q = torch.zeros(2, n, 2, 4)
    v = torch.zeros(2, n, 2, 3)
    with pytest.raises(ValueError, match=r"gate must be \[B, T, H\]"):
        strategy.linear_attention(q, q, v, gate=torch.zeros(2, n + 1, 2))
    with value_checks(), pytest.raises(ValueError, match=r"decay is a log decay and must be <= 0"):  # debug mode
        strategy.linear_attention(q, q, v, decay=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match=rf"q has {n + 2} local tokens but the zigzag layout gives this rank {n}"):
        strategy.linear_attention(torch.zeros(2, n + 2, 2, 4), torch.zeros(2, n + 2, 2, 4), torch.zeros(2, n + 2, 2, 3))
    with pytest.raises(ValueError, match=r"v must match q in \[B, T, H\]"):
        strategy.linear_attention(q, q, torch.zeros(1, n, 2, 3))
    with pytest.raises(TypeError, match="does not implement softmax attention"):
        strategy.attention(q, q, q)
    with pytest.raises(TypeError, match="does not implement linear attention; use 'lasp2'"):
        make_strategy("ring", comm, layout).linear_attention(q, q, v)
    assert comm.stats.bytes_sent == 0
    comm.barrier()


def test_errors_before_any_collective(worlds):
    worlds(4).run(job_errors)
