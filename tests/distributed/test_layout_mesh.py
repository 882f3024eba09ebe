"""SequenceLayout.gather and ParallelDims communicators on real gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import MeshAxis, ParallelDims


def job_gather_round_trip(kind: str, dim: int) -> None:
    comm = Communicator()
    n = 4 * comm.size * 3
    shape = [2, 5, 3]
    shape[dim] = n
    full = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    layout = SequenceLayout(kind, n, comm.size, comm.rank, cu_seqlens=[0, 7, n - 1, n])
    local = layout.shard(full, dim)
    comm.stats.reset()
    torch.testing.assert_close(layout.gather(local, comm, dim), full, rtol=0, atol=0)
    assert comm.stats["all_gather"].bytes_sent == (comm.size - 1) * local.numel() * 8
    # Document ids are consistent across ranks: gathering them rebuilds the global document map.
    ids = layout.gather(layout.document_ids(), comm, 0)
    assert ids.tolist() == [0] * 7 + [1] * (n - 8) + [2]


def job_mesh(dp: int, sp: int, tp: int, ep: int) -> dict[str, list[int]]:
    dims = ParallelDims(dp=dp, sp=sp, tp=tp, ep=ep, world_size=dist.get_world_size())
    mesh = dims.build_mesh()
    comms = dims.communicators(mesh)
    rank = dist.get_rank()
    coords = dims.coords(rank)
    for axis, comm in comms.items():
        group = next(g for g in dims.axis_groups(axis) if rank in g)
        assert comm.ranks == group, (axis, comm.ranks, group)
        assert comm.rank == group.index(rank) and comm.size == dims.degree(axis)
        # A collective over the axis sees exactly the axis's members.
        got = comm.all_gather(torch.tensor([rank]))
        assert got.tolist() == group
    assert comms[MeshAxis.SP].rank == coords[MeshAxis.SP]
    assert mesh.mesh_dim_names == ("dp", "sp", "tp")
    return {axis.value: comm.ranks for axis, comm in comms.items()}


def job_mesh_world_mismatch() -> None:
    dims = ParallelDims(dp=1, sp=1, tp=1, world_size=1)
    if dist.get_world_size() != 1:
        with pytest.raises(
            ValueError,
            match=rf"world_size=1\) does not match the initialised world of {dist.get_world_size()}",
        ):
            dims.build_mesh()


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_round_trip(worlds, world_size, kind, dim):
    worlds(world_size).run(job_gather_round_trip, kind, dim)


@pytest.mark.parametrize(
    "dp,sp,tp,ep",
    [
        (1, 1, 1, 1),
        (1, 2, 1, 1),
        (1, 2, 1, 2),
        (1, 4, 1, 1),
        (1, 2, 2, 1),
        (2, 2, 1, 1),
        (2, 1, 2, 1),
        (2, 2, 1, 4),
    ],
)
def test_mesh_communicators_match_axis_groups(worlds, dp, sp, tp, ep):
    worlds(dp * sp * tp).run(job_mesh, dp, sp, tp, ep)


def test_mesh_rejects_world_mismatch(worlds):
    worlds(2).run(job_mesh_world_mismatch)
