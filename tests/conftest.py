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
