"""NVTX ranges that cost nothing when no profiler is attached.

Ranges go to the ``nvtx`` package when it is installed, else to ``torch.cuda.nvtx`` when CUDA is
available, and always to torch's profiler (``record_function``) when it is recording. On a CPU
machine without the ``nvtx`` package every range is a no-op.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

__all__ = ["nvtx_range"]


@functools.cache
def _backend() -> tuple[Callable[[str], None], Callable[[], None]] | None:
    try:
        import nvtx  # type: ignore[import-not-found]

        return (lambda name: nvtx.push_range(name, domain="distseq")), (lambda: nvtx.pop_range(domain="distseq"))
    except ImportError:
        pass
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    return None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """Mark ``name`` for Nsight Systems (NVTX) and torch's profiler for the duration of the block."""
    backend = _backend()
    profiling = torch.autograd.profiler._is_profiler_enabled
    if backend is None and not profiling:
        yield
        return
    with contextlib.ExitStack() as stack:
        if profiling:
            stack.enter_context(torch.autograd.profiler.record_function(name))
        if backend is not None:
            backend[0](name)
            stack.callback(backend[1])
        yield
