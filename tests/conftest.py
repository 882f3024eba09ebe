"""Shared fixtures: spawned gloo worlds reused across tests so each world size starts once per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from distseq.testing import DistributedWorld


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
