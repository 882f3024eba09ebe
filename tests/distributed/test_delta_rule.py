"""The gated delta rule across shards (LASP-2's ``delta_rule`` and the Ulysses baseline), both layouts, with and
without a gate, with documents crossing ranks: output and the gradients of q, k, v, beta and gate equal the
single-process token-by-token recurrence over the whole sequence; exact summary bytes, the same at 8K and 64K.

Tolerances: max abs error <= 1e-9 in fp64; <= 1e-5 of the tensor's largest entry in fp32. Keys are L2-normalised
(as Gated DeltaNet's are): with unnormalised keys the recurrence itself is unstable.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from distseq.kernels.delta_rule import naive_recurrent_gated_delta_rule
from distseq.kernels.linear_attention import value_checks
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy

HEADS = 4


def _inputs(seq_len, gated, dtype, key_dim=4, value_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq_len, HEADS, key_dim, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(2, seq_len, HEADS, key_dim, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(2, seq_len, HEADS, value_dim, generator=g, dtype=torch.float64)
    beta = torch.rand(2, seq_len, HEADS, generator=g, dtype=torch.float64)
    gate = None
    if gated:
        gate = torch.nn.functional.logsigmoid(torch.randn(2, seq_len, HEADS, generator=g, dtype=torch.float64) + 2)
    dout = torch.randn(2, seq_len, HEADS, value_dim, generator=g, dtype=torch.float64)
    return [None if t is None else t.to(dtype) for t in (q, k, v, beta, gate, dout)]


def _close(label, got, want, dtype, failures):
    if dtype == torch.float64:
        err, tol = (got.double() - want).abs().max().item(), 1e-9
    else:
        err, tol = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item(), 1e-5
    if not err <= tol:
        failures.append(f"{label}: {err:.3g} > {tol}")


def job_parity(name, dtype_name, cases):
    dtype = getattr(torch, dtype_name)
    comm = Communicator()
    p, r = comm.size, comm.rank
    failures = []
    for kind, gated, docs, chunk_size in cases:
        seq_len = 8 * p * 5  # 40 tokens per rank: chunk sizes 8 and 7 do not divide the zigzag chunks
        cu = torch.tensor([0, 3, 17, 18, seq_len - 9, seq_len]) if docs else None
        q, k, v, beta, gate, dout = _inputs(seq_len, gated, dtype)
        leaves = [None if t is None else t.detach().double().requires_grad_() for t in (q, k, v, beta, gate)]
        want, _ = naive_recurrent_gated_delta_rule(*leaves[:4], gate=leaves[4], cu_seqlens=cu)
        want.backward(dout.double())

        layout = SequenceLayout(kind, seq_len, p, r, cu)
        strategy = make_strategy(name, comm, layout, chunk_size=chunk_size)
        local = [None if t is None else layout.shard(t.detach(), 1).requires_grad_() for t in (q, k, v, beta, gate)]
        out = strategy.delta_rule(*local[:4], gate=local[4])
        assert out.dtype == dtype and out.shape == layout.shard(want, 1).shape
        out.backward(layout.shard(dout, 1))
        case = f"{name} {kind} gated={gated} docs={docs} chunk={chunk_size}"
        _close(f"{case} out", out, layout.shard(want.detach(), 1), dtype, failures)
        for label, got, ref in zip(["dq", "dk", "dv", "dbeta", "dgate"], local, leaves, strict=True):
            if got is not None:
                _close(f"{case} {label}", got.grad, layout.shard(ref.grad, 1), dtype, failures)
    assert not failures, "\n".join(failures)


CASES = list(itertools.product(["contiguous", "zigzag"], [False, True], [False, True], [8]))
CASES += [("zigzag", True, True, 7), ("contiguous", True, False, 64)]  # chunks not dividing / longer than a block


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("name", ["lasp2", "ulysses"])
def test_delta_rule_parity_fp64(worlds, world_size, name):
    worlds(world_size).run(job_parity, name, "float64", CASES, timeout=240)


@pytest.mark.parametrize("name", ["lasp2", "ulysses"])
def test_delta_rule_parity_fp32(worlds, name):
    worlds(4).run(job_parity, name, "float32", [("zigzag", True, True, 8), ("contiguous", False, False, 8)])


def job_bytes(seq_len, kind, key_dim, value_dim):
    comm = Communicator()
    layout = SequenceLayout(kind, seq_len, comm.size, comm.rank)
    strategy = make_strategy("lasp2", comm, layout, chunk_size=64)
    q, k, v, beta, gate, _ = _inputs(seq_len, True, torch.float32, key_dim, value_dim)
    local = [layout.shard(t, 1).requires_grad_() for t in (q, k, v, beta, gate)]
    strategy.reset_stats()
    out = strategy.delta_rule(*local[:4], gate=local[4])
    forward = comm.stats.as_dict()
    comm.stats.reset()
    out.sum().backward()
    return forward, comm.stats.as_dict()


def test_delta_rule_bytes_independent_of_length(worlds):
    """sp = 4: forward one all-gather of (P-1) nc B H K (K + V) fp32 per rank, backward one reduce-scatter of the
    same, at N = 8K and 64K alike."""
    world = worlds(4)
    key_dim, value_dim, p, batch = 4, 3, 4, 2
    for kind, chunks in (("zigzag", 2), ("contiguous", 1)):
        expected = (p - 1) * chunks * batch * HEADS * key_dim * (key_dim + value_dim) * 4
        seen = []
        for seq_len in (8192, 65536):
            for forward, backward in world.run(job_bytes, seq_len, kind, key_dim, value_dim, timeout=240):
                once = {"calls": 1, "bytes_sent": expected, "bytes_received": expected}
                assert forward == {"all_gather": once} and backward == {"reduce_scatter": once}, (forward, backward)
                seen.append((forward, backward))
        assert all(s == seen[0] for s in seen)


def test_errors_before_any_collective():
    layout = SequenceLayout("zigzag", 16, 1, 0)
    strategy = make_strategy("lasp2", Communicator.solo(), layout)
    q = torch.randn(1, 16, 2, 4)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, H\]=\(1, 16, 2\), got \(1, 16\)"):
        strategy.delta_rule(q, q, q, torch.rand(1, 16))
    with value_checks(), pytest.raises(ValueError, match="gate is a log gate and must be <= 0"):
        strategy.delta_rule(q, q, q, torch.rand(1, 16, 2), gate=torch.ones(1, 16, 2))
    with pytest.raises(TypeError, match="lasp1"):
        make_strategy("lasp1", Communicator.solo(), layout).delta_rule(q, q, q, torch.rand(1, 16, 2))
