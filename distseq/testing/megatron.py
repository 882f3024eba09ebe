"""Run Megatron-Core models on CPU, for tests: patches of the few places Megatron-Core assumes CUDA.

GPUs need none of this. On a CPU-only torch Megatron-Core 0.16 calls CUDA in a handful of places: the
current device (RoPE frequencies, DDP buffers), the CUDA RNG state its tracker forks (dropout regions), the
pinned-memory index of the RoPE CP slice, ``device="cuda"`` factories (the local attention's causal mask, the
optimizer, gradient clipping, the pipeline schedules) and ``MambaStack``'s final norm (Transformer Engine's
``TENorm``). :func:`megatron_on_cpu` patches all of them for the duration of a ``with`` block::

    with megatron_on_cpu():
        parallel_state.initialize_model_parallel(context_parallel_size=2)
        model_parallel_cuda_manual_seed(0)
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["megatron_on_cpu"]


def _cpu(device: object) -> object:
    """``device`` with CUDA replaced by the CPU (other values unchanged)."""
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return "cpu"
    return device


class _CudaAsCpu(TorchFunctionMode):
    """Factories and moves that name a CUDA device create or stay on the CPU; ``pin_memory`` is dropped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    """Patch Megatron-Core's CUDA assumptions for a CPU-only torch (tests only)."""
    from megatron.core.extensions import transformer_engine
    from megatron.core.ssm import mamba_block
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cpu_state = lambda *args, **kwargs: torch.get_rng_state()  # noqa: E731
    set_cpu_state = lambda state, *args, **kwargs: torch.set_rng_state(state)  # noqa: E731
    with contextlib.ExitStack() as stack:
        patch = lambda target, name, value: stack.enter_context(mock.patch.object(target, name, value))  # noqa: E731
        patch(torch.cuda, "current_device", lambda: "cpu")
        patch(torch.cuda, "get_rng_state", cpu_state)
        patch(torch.cuda, "set_rng_state", set_cpu_state)
        patch(torch.cuda, "manual_seed", lambda seed: None)
        patch(megatron_random, "_get_cuda_rng_state", cpu_state)
        patch(megatron_random, "_set_cuda_rng_state", set_cpu_state)
        if not getattr(transformer_engine, "HAVE_TE", False):
            patch(mamba_block, "TENorm", WrappedTorchNorm)
        stack.enter_context(_CudaAsCpu())
        yield
