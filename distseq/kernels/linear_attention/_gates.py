"""Input checks and log-gate resolution shared by the linear-attention kernels.

Every kernel sees one per-token, per-head log-gate ``g <= 0`` (``a_t = exp(g_t)``) built from an optional
fixed per-head ``decay`` and an optional data-dependent ``gate``. A ``-inf`` gate is a hard state reset
(a document start). It is split here into a finite gate (0 at resets) and a boolean reset mask, so no
kernel ever evaluates ``exp(-inf - -inf)`` or ``0 * inf``, in the forward or the backward.

Shape and dtype checks are free. Value checks (``decay``, ``gate`` <= 0, no NaN decay) read device values
back to the host, a synchronisation on a GPU: the public kernel functions make them, the sequence-parallel
strategies only inside :func:`value_checks` (a debug mode), so their hot path makes none.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from distseq.kernels._dtypes import accumulation_dtype

__all__ = ["accumulation_dtype", "check_inputs", "checking_values", "resolve_gates", "split_log_gate", "value_checks"]

_VALUE_CHECKS = contextvars.ContextVar("distseq_linear_attention_value_checks", default=False)


@contextlib.contextmanager
def value_checks(enabled: bool = True) -> Iterator[None]:
    """Debug mode: the sequence-parallel strategies also check input values (one host read each)."""
    token = _VALUE_CHECKS.set(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def checking_values() -> bool:
    """Whether :func:`value_checks` is on."""
    return _VALUE_CHECKS.get()


def _check_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [0, ..., T], got shape={tuple(cu.shape)}")
    cu = cu.to(torch.int64).cpu()
    if cu[0].item() != 0 or cu[-1].item() != seq_len:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={seq_len}, got {cu.tolist()}")
    if (cu[1:] <= cu[:-1]).any():
        raise ValueError(f"cu_seqlens must be strictly increasing, got {cu.tolist()}")
    return cu


def check_inputs(q, k, v, decay, gate, initial_state, cu_seqlens, *, values: bool = True) -> torch.Tensor | None:
    """Validate shapes (and values unless ``values=False``); returns cu_seqlens as an int64 CPU tensor (or None)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k must be [B, T, H, K] and v [B, T, H, V], got q={tuple(q.shape)} k={tuple(k.shape)} "
            f"v={tuple(v.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got q={tuple(q.shape)} k={tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must match q in [B, T, H], got q={tuple(q.shape)} v={tuple(v.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got q={q.dtype} k={k.dtype} v={v.dtype}")
    batch, seq_len, heads, key_dim = q.shape
    if decay is not None and decay.shape != (heads,):
        raise ValueError(f"decay must be [H]=({heads},), got {tuple(decay.shape)}")
    if gate is not None and gate.shape != (batch, seq_len, heads):
        raise ValueError(f"gate must be [B, T, H]={(batch, seq_len, heads)}, got {tuple(gate.shape)}")
    if initial_state is not None and initial_state.shape != (batch, heads, key_dim, v.shape[3]):
        raise ValueError(
            f"initial_state must be [B, H, K, V]={(batch, heads, key_dim, v.shape[3])}, got "
            f"{tuple(initial_state.shape)}"
        )
    if values:
        _check_values(decay, gate)
    return None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, seq_len)


def _check_values(decay: torch.Tensor | None, gate: torch.Tensor | None) -> None:
    if decay is not None:
        if torch.isnan(decay).any():
            raise ValueError("decay contains NaN")
        if (decay > 0).any():
            raise ValueError(f"decay is a log decay and must be <= 0, got max {decay.max().item():.4g}")
    if gate is not None:
        # A NaN gate is not an input error but a diverged activation: it is let through (NaN outputs), because
        # a rank raising on its own data would leave the other ranks of a distributed step waiting in a
        # collective; the trainer's loss check then stops every rank at once.
        if (gate > 0).any():
            raise ValueError(f"gate is a log gate and must be <= 0, got max {gate.max().item():.4g}")


def resolve_gates(
    q: torch.Tensor,
    decay: torch.Tensor | None,
    gate: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite log-gates ``[B, T, H]`` (0 at resets) and the reset mask ``[B, T, H]`` (True: state resets)."""
    batch, seq_len, heads, _ = q.shape
    g = torch.zeros(batch, seq_len, heads, dtype=dtype, device=q.device)
    if decay is not None:
        g = g + decay.to(dtype)
    if gate is not None:
        g = g + gate.to(dtype)
    reset = torch.isneginf(g)
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        starts = torch.zeros(seq_len, dtype=torch.bool, device=q.device)
        starts[cu_seqlens[1:-1].to(q.device)] = True
        reset = reset | starts[None, :, None]
    return torch.where(reset, torch.zeros((), dtype=dtype, device=q.device), g), reset


def split_log_gate(log_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A log-gate with ``-inf`` resets -> the finite log-gate (0 at resets) and the reset mask, same shape."""
    reset = torch.isneginf(log_gate)
    return torch.where(reset, torch.zeros((), dtype=log_gate.dtype, device=log_gate.device), log_gate), reset
