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
