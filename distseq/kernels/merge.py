"""Numerically stable merge of partial attention results ``(out, lse)``.

Two partial results over disjoint key sets combine as::

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

A side with ``lse = -inf`` (no allowed key) has weight 0; both sides ``-inf`` give ``lse = -inf`` and
``out = 0``. The weights are formed relative to ``max(lse_a, lse_b)``, so nothing overflows, and every
exp/log is guarded with ``torch.where`` so neither the forward nor the autograd backward produces NaN.
"""

from __future__ import annotations

import torch

__all__ = ["merge_attention", "merge_attention_"]


def _check_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    if out_a.dim() != 4 or out_a.shape != out_b.shape:
        raise ValueError(
            f"outputs must both be [B, T, H, D] of one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}"
        )
    batch, seq_len, heads, _ = out_a.shape
    if lse_a.shape != (batch, heads, seq_len) or lse_b.shape != (batch, heads, seq_len):
        raise ValueError(
            f"lse must be [B, H, T]={(batch, heads, seq_len)} to match out, got {tuple(lse_a.shape)} and "
            f"{tuple(lse_b.shape)}"
        )


def _merge_weights(lse_a: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merged lse ``[B, H, T]`` and the weights ``[B, T, H, 1]`` of each side's output."""
    lse_max = torch.maximum(lse_a, lse_b)
    alive = torch.isfinite(lse_max)  # at least one side has an allowed key
    lse_max = torch.where(alive, lse_max, 0.0)
    weight_a = torch.exp(lse_a - lse_max)  # in [0, 1], exactly 0 where lse_a = -inf
    weight_b = torch.exp(lse_b - lse_max)
    total = torch.where(alive, weight_a + weight_b, 1.0)  # in [1, 2] where alive
    lse = torch.where(alive, lse_max + torch.log(total), float("-inf"))
    weight_a = (weight_a / total).transpose(1, 2).unsqueeze(-1)
    weight_b = (weight_b / total).transpose(1, 2).unsqueeze(-1)
    return lse, weight_a, weight_b


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets; differentiable with autograd.

    Args:
        out_a, out_b: ``[B, T, H, D]`` partial outputs (fp32 recommended, as returned by block attention).
        lse_a, lse_b: ``[B, H, T]`` their log-sum-exps; ``-inf`` marks a row with no allowed key.

    Returns:
        ``out`` ``[B, T, H, D]`` (dtype promoted with the lse dtype, so fp32 for fp32 lse) and ``lse``
        ``[B, H, T]``. Rows empty on both sides get ``out = 0``, ``lse = -inf``.
    """
    _check_partials(out_a, lse_a, out_b, lse_b)
    lse, weight_a, weight_b = _merge_weights(lse_a, lse_b)
    return out_a * weight_a + out_b * weight_b, lse


@torch.no_grad()
def merge_attention_(
    acc_out: torch.Tensor | None, acc_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the partial result ``(out, lse)`` into ``(acc_out, acc_lse)`` in place.

    For the forward loop of a ring strategy. Not differentiable (runs under ``no_grad``); use it inside a
    ``torch.autograd.Function`` whose backward is :func:`block_attention_backward`-style.

    Args:
        acc_out: ``[B, T, H, D]`` floating accumulator (fp32 recommended), updated in place; None means
            "nothing accumulated yet".
        acc_lse: ``[B, H, T]`` accumulator updated in place; None together with ``acc_out``.
        out, lse: the partial result to add, as returned by block attention.

    Returns:
        The accumulators ``(acc_out, acc_lse)``: the same tensors when given, otherwise fresh copies of
        ``out`` (promoted to at least fp32) and ``lse``.
    """
    if (acc_out is None) != (acc_lse is None):
        raise ValueError(
            f"acc_out and acc_lse must both be None or both be tensors, got acc_out="
            f"{'None' if acc_out is None else 'tensor'} acc_lse={'None' if acc_lse is None else 'tensor'}"
        )
    if acc_out is None:
        return out.to(torch.promote_types(out.dtype, torch.float32), copy=True), lse.clone()
    _check_partials(acc_out, acc_lse, out, lse)
    merged_lse, weight_acc, weight_new = _merge_weights(acc_lse, lse)
    acc_out.mul_(weight_acc).add_(out * weight_new)
    acc_lse.copy_(merged_lse)
    return acc_out, acc_lse
