"""LASP-2's fast paths: the state all-gathers overlap local work, bf16 autocast keeps fp32 accuracy, and the
hot path (LASP-2 and LASP-1, forward and backward) reads no device value back to the host.

Autocast tolerance: with inputs rounded to bf16, the relative error (max abs error over max abs of the fp64
value) of the output and of every gradient is at most 1.25x that of rounding the fp64 result to bf16.
"""

from __future__ import annotations

import pytest
import torch

from distseq.kernels.linear_attention import naive_recurrent_linear_attention, value_checks
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, make_strategy
from distseq.testing.sync import HostSyncRecorder, OpLog, no_host_sync

AUTOCAST_RATIO = 1.25
WITH_BASELINE = [*LINEAR_STRATEGIES, "ulysses"]  # the head all-to-all baseline runs linear attention too


def _inputs(seq_len, heads=2, key_dim=8, value_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, seq_len, heads, key_dim, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    v = torch.randn(2, seq_len, heads, value_dim, generator=g, dtype=torch.float64)
    gate = torch.nn.functional.logsigmoid(torch.randn(2, seq_len, heads, generator=g, dtype=torch.float64) + 2)
    dout = torch.randn(2, seq_len, heads, value_dim, generator=g, dtype=torch.float64)
    return q, k, v, gate, dout


def _run(strategy, layout, q, k, v, gate, dout, decay=None, cu_seqlens=None):
    leaves = [None if t is None else layout.shard(t, 1).detach().requires_grad_() for t in (q, k, v, gate)]
    out = strategy.linear_attention(*leaves[:3], decay=decay, gate=leaves[3], cu_seqlens=cu_seqlens)
    out.backward(layout.shard(dout, 1).to(out.dtype))
    return out, [None if t is None else t.grad for t in leaves]


def job_overlap(kind):
    comm = Communicator().view("lasp2")
    p, r = comm.size, comm.rank
    log = []
    all_gather = comm.all_gather

    def recording_all_gather(x, dim=0, *, async_op=False):
        assert async_op, "LASP-2 starts its all-gathers asynchronously"
        log.append("all_gather started")
        handle = all_gather(x, dim, async_op=True)
        wait = handle.wait
        handle.wait = lambda: (log.append("all_gather waited"), wait())[1]
        return handle

    comm.all_gather = recording_all_gather
    layout = SequenceLayout(kind, 32 * p, p, r)
    strategy = make_strategy("lasp2", comm, layout, chunk_size=4)
    q, k, v, gate, dout = _inputs(32 * p)
    with OpLog(log):
        _run(strategy, layout, q, k, v, gate, dout)
    starts = [i for i, op in enumerate(log) if op == "all_gather started"]
    waits = [i for i, op in enumerate(log) if op == "all_gather waited"]
    assert len(starts) == len(waits) == 2, (starts, waits)  # one each way
    for direction, start, wait in zip(["forward", "backward"], starts, waits, strict=True):
        in_flight = log[start + 1 : wait]
        # The intra-chunk term (forward) and its backward are batched matrix products.
        assert in_flight.count("aten.bmm") >= 2, f"{direction}: nothing ran during the all-gather: {in_flight}"


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_all_gathers_overlap_the_intra_chunk_work(worlds, kind):
    worlds(2).run(job_overlap, kind)


def job_autocast(name, kind):
    """Per tensor: (max abs error, max abs error of rounding the fp64 value to bf16, max abs fp64 value)."""
    comm = Communicator()
    p, r = comm.size, comm.rank
    seq_len = 64 * p
    q, k, v, gate, dout = (t.bfloat16() for t in _inputs(seq_len, heads=4, key_dim=16, value_dim=16))
    leaves = [t.double().requires_grad_() for t in (q, k, v, gate)]
    ref, _ = naive_recurrent_linear_attention(*leaves[:3], gate=leaves[3])
    ref.backward(dout.double())
    layout = SequenceLayout(kind, seq_len, p, r)
    strategy = make_strategy(name, comm, layout, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(strategy, layout, q, k, v, gate, dout)
    stats = {}
    for label, got, want in zip(["out", "dq", "dk", "dv", "dgate"], [out, *grads], [ref, *leaves], strict=True):
        want = layout.shard(want if label == "out" else want.grad, 1).detach()
        assert got.dtype == torch.bfloat16, (label, got.dtype)
        rounding = (want.bfloat16().double() - want).abs().max().item()
        stats[label] = ((got.double() - want).abs().max().item(), rounding, want.abs().max().item())
    return stats


@pytest.mark.parametrize("name", WITH_BASELINE)
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_bf16_autocast_is_as_accurate_as_rounding_the_fp64_result(worlds, name, kind):
    per_rank = worlds(4).run(job_autocast, name, kind, timeout=300)
    failures = []
    for label in per_rank[0]:
        error, rounding, scale = (max(stats[label][i] for stats in per_rank) for i in range(3))
        ratio = (error / scale) / (rounding / scale)
        if not ratio <= AUTOCAST_RATIO:
            failures.append(f"{name} {kind} {label}: error {error / scale:.3g} is {ratio:.3g}x bf16 rounding")
    assert not failures, "\n".join(failures)


def job_no_host_sync():
    comm = Communicator()
    p, r = comm.size, comm.rank
    seq_len = 16 * p
    documents = [0, 3, seq_len // 2 + 1, seq_len - 5, seq_len]  # the second one spans ranks
    q, k, v, gate, dout = _inputs(seq_len, heads=4)
    decay = torch.tensor([-0.1, -0.3, -0.05, -0.2], dtype=torch.float64)
    for name in WITH_BASELINE:
        for kind in ("contiguous", "zigzag"):
            layout = SequenceLayout(kind, seq_len, p, r)
            strategy = make_strategy(name, comm, layout, chunk_size=4)
            for mode_decay, mode_gate in [(None, None), (decay, None), (None, gate)]:
                with no_host_sync():
                    _run(strategy, layout, q, k, v, mode_gate, dout, decay=mode_decay, cu_seqlens=documents)
                with no_host_sync(), torch.no_grad():
                    local = [None if t is None else layout.shard(t, 1) for t in (q, k, v, mode_gate)]
                    strategy.linear_attention(*local[:3], decay=mode_decay, gate=local[3], cu_seqlens=documents)
    # The detector is live here: the debug-mode value checks are host reads, and it sees them.
    with HostSyncRecorder() as recorder, value_checks():
        _run(strategy, layout, q, k, v, gate, dout, decay=decay, cu_seqlens=documents)
    assert recorder.calls


@pytest.mark.parametrize("world_size", [2, 4])
def test_no_host_sync_forward_and_backward(worlds, world_size):
    worlds(world_size).run(job_no_host_sync, timeout=300)
