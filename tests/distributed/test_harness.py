"""The spawned-world harness: results in rank order, remote errors with rank, hangs fail fast, recovery."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from distseq.testing import DistributedWorld, RemoteError, run_distributed


def job_rank_info(offset: int, *, scale: int = 1) -> tuple[int, int, int]:
    return dist.get_rank(), dist.get_world_size(), (dist.get_rank() + offset) * scale


def job_fail_on_rank(bad_rank: int) -> None:
    if dist.get_rank() == bad_rank:
        raise KeyError(f"boom on {bad_rank}")
    dist.barrier()  # the healthy ranks block on the failed one


def job_mismatched_collective() -> None:
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: a hang


def job_exit() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    time.sleep(30)


def job_dtensor_on_a_new_group() -> tuple[float, int]:
    """A DTensor op on a mesh of a group this job creates (as FSDP2 over the dp_sp group does)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    group = dist.new_group(list(range(dist.get_world_size())))
    mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("tokens",))
    x = distribute_tensor(torch.arange(8.0).reshape(4, 2), mesh, [Shard(0)])
    return float((x * 2).sum().full_tensor()), len(dist.distributed_c10d._world.pg_map)


def test_results_in_rank_order_with_args(worlds):
    assert worlds(4).run(job_rank_info, 10, scale=2) == [(r, 4, (r + 10) * 2) for r in range(4)]


def test_remote_error_names_rank_and_world_recovers():
    with DistributedWorld(2, timeout=30) as world:
        with pytest.raises(
            RemoteError, match=r"job_fail_on_rank failed on rank\(s\) \[1\](.|\n)*KeyError: 'boom on 1'"
        ):
            world.run(job_fail_on_rank, 1)
        assert world.run(job_rank_info, 0) == [(0, 2, 0), (1, 2, 1)]


def test_hang_fails_fast_with_timeout_and_world_recovers():
    with DistributedWorld(2, timeout=30, collective_timeout=60) as world:
        start = time.monotonic()
        with pytest.raises(
            TimeoutError, match=r"job_mismatched_collective did not finish within 3s on rank\(s\) \[0\]"
        ):
            world.run(job_mismatched_collective, timeout=3)
        assert time.monotonic() - start < 20
        assert world.run(job_rank_info, 1) == [(0, 2, 1), (1, 2, 2)]


def test_dead_rank_is_reported():
    with pytest.raises(RemoteError, match=r"rank\(s\) \[1\] died with exit codes \{1: 3\}"):
        run_distributed(job_exit, 2, timeout=60)


def test_each_job_starts_from_the_world_group_alone(worlds):
    """A job's groups are destroyed after it, and DTensor's cached sharding decisions with them: a mesh over the
    same ranks and axis names compares equal to the last job's, and a stale cache entry would hand the second
    job the first job's destroyed group ("Could not resolve the process group registered under the name ...")."""
    first = worlds(2).run(job_dtensor_on_a_new_group)
    second = worlds(2).run(job_dtensor_on_a_new_group)
    assert first == second == [(56.0, 2)] * 2  # the world group and the job's own group, nothing left over
