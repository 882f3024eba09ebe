"""The one place where distseq bridges torch releases (2.11 through 2.14).

Every call into an API that is newer than the oldest supported torch goes through a function here, which
uses the new API when it exists and its older equivalent otherwise. Nothing else in the package checks
torch versions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_into", "reduce_scatter_into"]


def all_gather_into(out: torch.Tensor, x: torch.Tensor, *, group, async_op: bool) -> dist.Work | None:
    """Gather every rank's ``x`` into ``out`` (``[P * n, ...]``), concatenated along dim 0 in rank order.

    ``all_gather_single`` arrived in torch 2.13 (which deprecates ``all_gather_into_tensor``); both take the
    concatenated output shape.
    """
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, x, group=group, async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, *, op, group, async_op: bool) -> dist.Work | None:
    """Reduce ``x`` (``[P * n, ...]``) over ranks and write this rank's ``n`` rows into ``out``.

    ``reduce_scatter_single`` arrived in torch 2.13 (which deprecates ``reduce_scatter_tensor``).
    """
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(out, x, op=op, group=group, async_op=async_op)
