"""Gradient reduction over the ranks that hold different tokens of the global batch.

distseq's loss convention (see ``distseq.models.hybrid``) makes every rank's loss its *share* of the global
loss, so gradients are summed, not averaged: replicated weights over ``dp x sp`` (every rank with the same
tensor-parallel coordinate), expert weights sharded by expert parallelism over ``edp`` (the ranks holding the
same experts). Tensor-parallel shards need no reduction: the TP layers' collectives already give each shard
its full gradient, and weights replicated over ``tp`` receive identical gradients on every tp rank.
"""

from __future__ import annotations

import torch
from torch import nn

from distseq.parallel.comm import Communicator

__all__ = ["EXPERT_PARAM_ATTR", "reduce_gradients"]

#: set to True on parameters sharded by expert parallelism (by ``apply_expert_parallel``)
EXPERT_PARAM_ATTR = "distseq_expert_parallel"


def reduce_gradients(model: nn.Module, token_comm: Communicator, expert_data_comm: Communicator | None = None) -> None:
    """Sum every parameter's gradient over ``token_comm`` (``dp_sp``), or ``expert_data_comm`` (``edp``) for
    expert-parallel parameters, in place; one flat all-reduce per group and dtype."""
    groups: dict[tuple[Communicator, torch.dtype], list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        comm = expert_data_comm if getattr(p, EXPERT_PARAM_ATTR, False) and expert_data_comm else token_comm
        groups.setdefault((comm, p.grad.dtype), []).append(p.grad)
    for (comm, _), grads in groups.items():
        if comm.size == 1:
            continue
        flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), inplace=True)
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))
