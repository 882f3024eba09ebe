"""Every Communicator primitive on gloo at world sizes 1, 2, 4: values, exact stats, async, autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from distseq.parallel import functional as F
from distseq.parallel.check import check_communicator
from distseq.parallel.comm import Communicator

WORLD_SIZES = [1, 2, 4]


def _data(rank: int, shape: tuple[int, ...], dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """The tensor rank ``rank`` contributes; every rank can rebuild every other rank's."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def job_collectives(dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name)
    comm = Communicator()
    p, r = comm.size, comm.rank
    assert comm.ranks == list(range(p))
    shape = (2, 4 * p, 3, 5)  # [B, T, H, D]-like, dim 1 divisible by P
    x = _data(r, shape, dtype)
    everyone = [_data(j, shape, dtype) for j in range(p)]

    for dim in (0, 1, 3, -1):
        comm.stats.reset()
        out = comm.all_gather(x, dim)
        torch.testing.assert_close(out, torch.cat(everyone, dim=dim), rtol=0, atol=0)
        s = comm.stats["all_gather"]
        assert (s.calls, s.bytes_sent, s.bytes_received) == (1, (p - 1) * _nbytes(x), (p - 1) * _nbytes(x))

    total = torch.stack([e.double() for e in everyone]).sum(0)
    # Reductions sum in a rank-dependent order (and in bf16 for bf16 inputs).
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 6e-2}[dtype]
    for dim in (1, 2 if 3 % p == 0 else 1):
        comm.stats.reset()
        out = comm.reduce_scatter(x, dim)
        torch.testing.assert_close(out.double(), total.chunk(p, dim)[r], rtol=tol, atol=tol)
        assert out.dtype == dtype
        s = comm.stats["reduce_scatter"]
        assert (s.calls, s.bytes_sent, s.bytes_received) == (
            1,
            (p - 1) * _nbytes(out),
            (p - 1) * _nbytes(out),
        )

    comm.stats.reset()
    out = comm.all_reduce(x)
    torch.testing.assert_close(out.double(), total, rtol=tol, atol=tol)
    torch.testing.assert_close(x, _data(r, shape, dtype), rtol=0, atol=0)  # not in place by default
    expected = 2 * (p - 1) * math.ceil(x.numel() / p) * x.element_size()
    assert comm.stats["all_reduce"].bytes_sent == expected and comm.stats.bytes_received == expected

    # Sequence -> heads resharding and back, the Ulysses pattern: [B, T/P, H, D] -> [B, T, H/P, D].
    heads = 4 * p
    seq_shards = [_data(j, (2, 3, heads, 5), dtype, seed=7) for j in range(p)]
    comm.stats.reset()
    head_shard = comm.all_to_all(seq_shards[r], scatter_dim=2, gather_dim=1)
    full = torch.cat(seq_shards, dim=1)
    torch.testing.assert_close(head_shard, full.chunk(p, dim=2)[r], rtol=0, atol=0)
    back = comm.all_to_all(head_shard, scatter_dim=1, gather_dim=2)
    torch.testing.assert_close(back, seq_shards[r], rtol=0, atol=0)
    s = comm.stats["all_to_all"]
    part = _nbytes(seq_shards[r]) // p
    assert (s.calls, s.bytes_sent, s.bytes_received) == (2, 2 * (p - 1) * part, 2 * (p - 1) * part)
    assert comm.stats.bytes_sent == comm.stats.bytes_received == 2 * (p - 1) * part


def job_async_and_p2p() -> None:
    comm = Communicator()
    p, r = comm.size, comm.rank
    x = _data(r, (6, 4))
    y = _data(r, (3,), torch.float32, seed=1)

    # Several async collectives in flight at once, waited in reverse order.
    h1 = comm.all_gather(x, 0, async_op=True)
    h2 = comm.all_reduce(x, async_op=True)
    torch.testing.assert_close(h2.wait(), sum(_data(j, (6, 4)) for j in range(p)), rtol=1e-12, atol=1e-12)
    assert torch.equal(h1.wait(), torch.cat([_data(j, (6, 4)) for j in range(p)]))
    assert h1.wait() is h1.wait()  # idempotent

    # Both ring directions in flight at once, as TokenRing does; with P == 2 both go to the same peer.
    comm.stats.reset()
    forward = comm.send_recv([x, y], shift=1).commit()
    backward = comm.send_recv([y * 2, x * 3], shift=-1).commit()
    got_back = backward.wait()
    got_fwd = forward.wait()
    src, dst = (r - 1) % p, (r + 1) % p
    assert torch.equal(got_fwd[0], _data(src, (6, 4))) and torch.equal(got_fwd[1], _data(src, (3,), torch.float32, 1))
    assert torch.equal(got_back[0], _data(dst, (3,), torch.float32, 1) * 2)
    assert torch.equal(got_back[1], _data(dst, (6, 4)) * 3)
    s = comm.stats["send_recv"]
    moved = 0 if p == 1 else 2 * (_nbytes(x) + _nbytes(y))
    assert (s.calls, s.bytes_sent, s.bytes_received) == (2, moved, moved)

    # Ring rotation with reused receive buffers and a non-contiguous send: P hops return the block home.
    block = _data(r, (4, 6)).t()
    buffers = [torch.empty(6, 4, dtype=torch.float64)]
    for _ in range(p):
        block = comm.send_recv(block, shift=1, recv_buffers=buffers).commit().wait()[0].clone()
    assert torch.equal(block, _data(r, (4, 6)).t())

    for shift in (2, -3, p):
        got = comm.send_recv(x, shift=shift).commit().wait()[0]
        assert torch.equal(got, _data((r - shift) % p, (6, 4)))

    # One-sided exchanges: even ranks send to rank + 1, odd ranks only receive (both ends agree).
    if p > 1:
        comm.stats.reset()
        sends, recvs = r % 2 == 0 and r + 1 < p, r % 2 == 1
        got = comm.send_recv(x, shift=1, send=sends, recv=recvs).commit().wait()
        assert len(got) == int(recvs)
        if recvs:
            assert torch.equal(got[0], _data(r - 1, (6, 4)))
        s = comm.stats["send_recv"]
        assert (s.bytes_sent, s.bytes_received) == (_nbytes(x) * sends, _nbytes(x) * recvs)


def job_autograd() -> None:
    """The wrappers' backward equals the transpose collective: compare against a single-process reference."""
    comm = Communicator()
    p, r = comm.size, comm.rank
    weights = [_data(j, (2, 4 * p, 4 * p, 3), seed=3) for j in range(p)]  # per-rank loss weights

    # all_gather: loss = sum_j <W_j, gather(x)>, so dL/dx_r = sum_j W_j[rows of r].
    x = _data(r, (2, 4, 4 * p, 3)).requires_grad_()
    full = F.all_gather(x, comm, dim=1)
    assert full.shape == weights[r].shape
    (full * weights[r]).sum().backward()
    expected = sum(w[:, r * 4 : (r + 1) * 4] for w in weights)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-12)

    # reduce_scatter: y_r = (sum_j x_j)[part r]; dL/dx_r = gather of every rank's upstream grad.
    x = _data(r, (2, 4 * p, 4 * p, 3)).requires_grad_()
    y = F.reduce_scatter(x, comm, dim=2)
    w_parts = [w[:, :, j * 4 : (j + 1) * 4] for j, w in enumerate(weights)]
    (y * w_parts[r]).sum().backward()
    torch.testing.assert_close(x.grad, torch.cat(w_parts, dim=2), rtol=1e-12, atol=1e-12)

    # all_to_all: a permutation of elements, so the gradient is the inverse permutation of the upstream grad.
    x = _data(r, (2, 4, 4 * p, 3)).requires_grad_()
    y = F.all_to_all(x, comm, scatter_dim=2, gather_dim=1)
    assert y.shape == (2, 4 * p, 4, 3)
    (y * weights[r][:, :, :4]).sum().backward()
    upstream = [w[:, :, :4] for w in weights]  # rank j's grad w.r.t. its y
    expected = torch.cat([u.chunk(p, dim=1)[r] for u in upstream], dim=2)
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def job_split() -> list[list[int]]:
    comm = Communicator()
    p, r = comm.size, comm.rank
    evens_odds = comm.split(
        [[j for j in range(p) if j % 2 == 0], [j for j in range(p) if j % 2 == 1]] if p > 1 else [[0]]
    )
    out = evens_odds.all_gather(torch.tensor([float(r)]))
    assert out.tolist() == [float(j) for j in evens_odds.ranks]
    assert evens_odds.stats.calls == 1 and comm.stats.calls == 0  # stats are per communicator
    if p == 4:
        inner, outer = comm.split_grid(2)
        assert inner.ranks == [0, 1] if r < 2 else [2, 3]
        assert outer.ranks == ([0, 2] if r % 2 == 0 else [1, 3])
        assert inner.rank == r % 2 and outer.rank == r // 2
        got = outer.send_recv(torch.tensor([float(r)]), 1).commit().wait()[0]
        assert got.item() == float(outer.ranks[(outer.rank - 1) % 2])
    return [evens_odds.ranks]


def job_errors_before_collective() -> None:
    comm = Communicator()
    p = comm.size
    if p > 1:
        with pytest.raises(ValueError, match=rf"shape=\(2, {p + 1}\), size={p}"):
            comm.all_to_all(torch.zeros(2, p + 1), scatter_dim=1, gather_dim=0)
        with pytest.raises(ValueError, match=rf"shape=\({p + 1}, 2\), size={p}"):
            comm.reduce_scatter(torch.zeros(p + 1, 2), dim=0)
        with pytest.raises(ValueError, match="partition of ranks"):
            comm.split([[0], [0]])
    with pytest.raises(ValueError, match="receive buffer"):
        comm.send_recv(torch.zeros(3), recv_buffers=[torch.zeros(4)])
    with pytest.raises(ValueError, match="inner_size dividing"):
        comm.split_grid(3 if p != 3 else 2)
    comm.barrier()  # every rank is still in step: nothing above reached a collective


def job_check(dtype_name: str) -> list[dict]:
    return [c.as_dict() for c in check_communicator(Communicator(), 4096, getattr(torch, dtype_name))]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
def test_collectives(worlds, world_size, dtype_name):
    worlds(world_size).run(job_collectives, dtype_name)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_async_and_p2p(worlds, world_size):
    worlds(world_size).run(job_async_and_p2p)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_autograd_wrappers(worlds, world_size):
    worlds(world_size).run(job_autograd)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_split(worlds, world_size):
    worlds(world_size).run(job_split)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_errors_are_raised_before_any_collective(worlds, world_size):
    worlds(world_size).run(job_errors_before_collective)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_self_check_passes(worlds, world_size, dtype_name):
    per_rank = worlds(world_size).run(job_check, dtype_name)
    bad = [c for checks in per_rank for c in checks if not c["ok"]]
    assert not bad, bad
    assert {c["primitive"] for c in per_rank[0]} >= {
        "all_gather",
        "reduce_scatter",
        "all_reduce",
        "all_to_all",
    }
    assert all(c["bus_gbps"] > 0 for c in per_rank[0]) or world_size == 1


def test_self_check_builds_every_tensor_on_the_given_device():
    """With the default device set to meta, a tensor made without the check's device would be a meta tensor and
    the comparison would fail: every one is made on the device asked for (CUDA under NCCL)."""
    with torch.device("meta"):
        checks = check_communicator(Communicator.solo(), 256, torch.float32, device="cpu")
    assert checks and all(c.ok for c in checks), checks


def test_solo_communicator_without_process_group():
    assert not dist.is_initialized()
    comm = Communicator()
    x = torch.randn(4, 3)
    assert (comm.rank, comm.size) == (0, 1)
    assert torch.equal(comm.all_gather(x, 1), x)
    assert torch.equal(comm.all_to_all(x, 0, 1), x)
    assert torch.equal(comm.send_recv(x, 1).commit().wait()[0], x)
    assert comm.stats.calls == 3 and comm.stats.bytes_sent == 0
    comm.stats.reset()
    assert comm.stats.as_dict() == {}
    with pytest.raises(ValueError, match="one-sided send_recv needs a peer other than self"):
        comm.send_recv(x, 1, recv=False)


def job_solo_inside_world() -> None:
    solo = Communicator.solo()
    assert (solo.rank, solo.size, solo.group) == (0, 1, None) and Communicator().size == dist.get_world_size()
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(solo.all_reduce(x), x) and solo.stats.bytes_sent == 0


def test_solo_communicator_inside_a_world(worlds):
    worlds(2).run(job_solo_inside_world)


def job_all_to_all_v() -> None:
    comm = Communicator()
    p, r = comm.size, comm.rank
    # Rank r sends (r + j) % 3 rows to rank j; row values identify sender, receiver and index.
    send_splits = [(r + j) % 3 for j in range(p)]
    rows = [torch.tensor([[100.0 * r + 10 * j + i, 1.0]]) for j in range(p) for i in range(send_splits[j])]
    x = torch.cat(rows) if rows else torch.zeros(0, 2)
    comm.stats.reset()
    out, recv_splits = comm.all_to_all_v(x, send_splits)
    assert recv_splits == [(j + r) % 3 for j in range(p)]
    expected = [[100.0 * j + 10 * r + i, 1.0] for j in range(p) for i in range(recv_splits[j])]
    assert out.tolist() == expected
    s = comm.stats["all_to_all_v"]
    assert (
        s.bytes_sent == (sum(send_splits) - send_splits[r]) * 8
        and s.bytes_received == (sum(recv_splits) - recv_splits[r]) * 8
    )
    # Autograd: the gradient returns to the sender's rows.
    xg = x.clone().requires_grad_()
    y = F.all_to_all_v(xg, comm, send_splits, recv_splits)
    (y * torch.arange(1.0, 3.0)).sum().backward()
    assert torch.equal(xg.grad, torch.tensor([[1.0, 2.0]]).expand_as(x))
    with pytest.raises(ValueError, match=rf"needs {p} non-negative send splits summing to"):
        comm.all_to_all_v(x, [1] * (p + 1))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_to_all_v(worlds, world_size):
    worlds(world_size).run(job_all_to_all_v)
