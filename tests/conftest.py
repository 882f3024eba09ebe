"""Shared fixtures: spawned gloo worlds reused across tests so each world size starts once per session."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

from distseq.testing import DistributedWorld

# Triton decides at decoration time whether to interpret kernels: set this before anything imports them, so
# the Triton kernels run (slowly, in fp32/fp16) on CPU machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Give every test the environment it started with. A command run in-process may set variables for the rest of
    the process (``distseq train`` on one process sets torch.distributed's ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT``); left behind, they would make a later test's ``distseq check --nproc 2``
    believe it runs under torchrun with one rank."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def worlds() -> Iterator[Callable[[int], DistributedWorld]]:
    """``worlds(n)`` is a running gloo world of ``n`` spawned ranks, shared by the whole session."""
    started: dict[int, DistributedWorld] = {}

    def get(world_size: int) -> DistributedWorld:
        if world_size not in started:
            started[world_size] = DistributedWorld(world_size, timeout=120.0, collective_timeout=60.0)
        return started[world_size]

    yield get
    for world in started.values():
        world.close()
