"""Run functions on several gloo ranks in spawned processes, for tests and CPU benchmarks.

A :class:`DistributedWorld` spawns ``world_size`` processes once, initialises a process group in each
(TCP rendezvous on a free local port) and then runs any number of jobs on all ranks, so the start-up cost
is paid once per world rather than once per case::

    with DistributedWorld(4) as world:
        results = world.run(check_all_gather, n=16)     # list of 4 return values, rank order

A job is a picklable module-level function; it runs on every rank with the process group initialised
and returns a picklable value. A job that raises on any rank fails the call with the rank and the remote
traceback; a job that does not finish within ``timeout`` seconds (a hang, e.g. a mismatched collective)
fails with a ``TimeoutError`` naming the ranks that did not answer. After either, the world is torn down
and the next ``run`` starts a fresh one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["DistributedWorld", "RemoteError", "free_port", "run_distributed"]


class RemoteError(RuntimeError):
    """A job raised on one of the ranks."""


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    collective_timeout_s: float,
    threads: int,
    jobs: mp.Queue,
    results: mp.Queue,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if backend == "nccl":  # one GPU per rank, before the group exists (NCCL binds the current device)
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
    except BaseException:
        results.put((rank, -1, "error", traceback.format_exc()))
        return
    results.put((rank, -1, "ok", None))
    while True:
        job = jobs.get()
        if job is None:
            break
        job_id, fn, args, kwargs = job
        try:
            results.put((rank, job_id, "ok", fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, job_id, "error", traceback.format_exc()))
        _release_job_groups()
    dist.destroy_process_group()


def _release_job_groups() -> None:
    """Destroy the process groups a job created (meshes, per-axis groups) and forget every cached reference to
    them, so the next job starts from the world group alone, whatever ran before it.

    Destroying matters for speed: a long-lived world would otherwise collect hundreds of groups, each with its
    own gloo threads. Forgetting matters for correctness: DTensor caches its sharding decisions by operator
    schema, and a ``DeviceMesh`` compares equal to any other mesh over the same ranks with the same axis names,
    whatever its process group. A later job's mesh (FSDP2's ``dp_sp`` mesh of a new group, say) would then hit
    entries made with an earlier job's mesh and get output specs whose group is destroyed: "Could not resolve
    the process group registered under the name ...".
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    try:
        dist.barrier()  # every rank is done with the job's groups before any is torn down
    except Exception:  # a rank that failed or hung; the world is reported and recovered by the caller
        return
    for group in list(c10d._world.pg_map):
        if group is not dist.GroupMember.WORLD:
            dist.destroy_process_group(group)
    _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    """Clear DTensor's sharding-propagation caches (the Python one and, where torch has it, the C++ fast path)."""
    if "torch.distributed.tensor" not in sys.modules:  # no job in this process has used DTensor
        return
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:  # a torch without this private helper: clear the Python cache directly
        from torch.distributed.tensor import DTensor

        DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
        return
    _clear_sharding_prop_cache()


class DistributedWorld:
    """``world_size`` spawned ranks with an initialised process group, reused across jobs.

    Args:
        world_size: number of ranks.
        backend: torch.distributed backend, ``"gloo"`` on CPU.
        timeout: default seconds a job may take on all ranks before the call fails.
        collective_timeout: seconds torch.distributed waits in one collective before raising.
    """

    def __init__(
        self,
        world_size: int,
        *,
        backend: str = "gloo",
        timeout: float = 120.0,
        collective_timeout: float = 60.0,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self.collective_timeout = collective_timeout
        self._procs: list[mp.Process] = []
        self._jobs: list[mp.Queue] = []
        self._results: mp.Queue | None = None
        self._next_job = 0

    def __enter__(self) -> DistributedWorld:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        if self.alive:
            return
        self.close()
        ctx = mp.get_context("spawn")
        port = free_port()
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    self.world_size,
                    port,
                    self.backend,
                    self.collective_timeout,
                    threads,
                    self._jobs[r],
                    self._results,
                ),
                daemon=True,
                name=f"distseq-rank{r}",
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect(-1, self.timeout, "process group initialisation")

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order."""
        self.start()
        job_id = self._next_job
        self._next_job += 1
        for q in self._jobs:
            q.put((job_id, fn, args, kwargs))
        name = getattr(fn, "__qualname__", repr(fn))
        return self._collect(job_id, self.timeout if timeout is None else timeout, name)

    def _collect(self, job_id: int, timeout: float, name: str) -> list[Any]:
        assert self._results is not None
        deadline = time.monotonic() + timeout
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(results) + len(errors) < self.world_size:
            now = time.monotonic()
            if now > deadline:
                if errors:
                    break
                missing = sorted(set(range(self.world_size)) - set(results))
                self.close()
                raise TimeoutError(
                    f"{name} did not finish within {timeout:.0f}s on rank(s) {missing} of "
                    f"{self.world_size} (a hang, e.g. mismatched collectives?)"
                )
            try:
                rank, got_id, status, value = self._results.get(timeout=min(deadline - now, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in results]
                if dead and not errors:
                    codes = {r: self._procs[r].exitcode for r in dead}
                    self.close()
                    raise RemoteError(f"{name}: rank(s) {dead} died with exit codes {codes}") from None
                continue
            if got_id != job_id:
                continue  # a late answer from an earlier job
            if status == "ok":
                results[rank] = value
            else:
                errors[rank] = value
                # The other ranks may be stuck in a collective with this one: give them a short grace.
                deadline = min(deadline, time.monotonic() + 5.0)
        if errors:
            if len(results) + len(errors) < self.world_size:
                self.close()
            first = min(errors)
            raise RemoteError(f"{name} failed on rank(s) {sorted(errors)}; rank {first} traceback:\n{errors[first]}")
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks (politely, then by force)."""
        for q in self._jobs:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self._procs:
            p.join(timeout=5)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs, self._jobs, self._results = [], [], None


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Spawn ``world_size`` ranks, run ``fn(*args, **kwargs)`` on each, tear down; per-rank results."""
    with DistributedWorld(world_size, backend=backend, timeout=timeout) as world:
        return world.run(fn, *args, **kwargs)
