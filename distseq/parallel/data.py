"""Gradient reduction over the ranks that hold different tokens of the global batch.

distseq's loss convention (see ``distseq.models.hybrid``) makes every rank's loss its *share* of the global
loss, so gradients are summed, not averaged: replicated weights over ``dp x sp`` (every rank with the same
tensor-parallel coordinate), expert weights sharded by expert parallelism over ``edp`` (the ranks holding the
same experts). Tensor-parallel shards need no reduction: the TP layers' collectives already give each shard
its full gradient, and weights replicated over ``tp`` receive identical gradients on every tp rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distseq.parallel.comm import Communicator

__all__ = ["EXPERT_PARAM_ATTR", "TP_PARTIAL_ATTR", "data_parallel", "reduce_gradients", "sum_tp_partial_gradients"]

#: set to True on parameters sharded by expert parallelism (by ``apply_expert_parallel``)
EXPERT_PARAM_ATTR = "distseq_expert_parallel"
#: set to True on weights replicated over tp that act on tp-sharded activations (e.g. per-head norms): each tp
#: rank holds a partial gradient, summed over tp
TP_PARTIAL_ATTR = "distseq_tp_partial"


def reduce_gradients(
    model: nn.Module,
    token_comm: Communicator,
    expert_data_comm: Communicator | None = None,
    tp_comm: Communicator | None = None,
) -> None:
    """Sum every parameter's gradient over ``token_comm`` (``dp_sp``), or ``expert_data_comm`` (``edp``) for
    expert-parallel parameters, in place; first over ``tp_comm`` for tp-partial weights. One flat all-reduce
    per group and dtype."""
    if tp_comm is not None:
        sum_tp_partial_gradients(model, tp_comm)
    groups: dict[tuple[Communicator, torch.dtype], list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        comm = expert_data_comm if getattr(p, EXPERT_PARAM_ATTR, False) and expert_data_comm else token_comm
        groups.setdefault((comm, p.grad.dtype), []).append(p.grad)
    for (comm, _), grads in groups.items():
        _sum_flat(comm, grads)


def sum_tp_partial_gradients(model: nn.Module, tp_comm: Communicator) -> None:
    """Sum over tp the gradients of tp-replicated weights that act on tp-sharded activations (each tp rank holds
    a partial sum), in place; also when DDP or FSDP2 reduces the rest (FSDP2 shards: their local parts)."""
    if tp_comm.size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None and getattr(p, TP_PARTIAL_ATTR, False)]
    _sum_flat(tp_comm, [g.to_local() if hasattr(g, "to_local") else g for g in grads])


def _sum_flat(comm: Communicator, grads: list[torch.Tensor]) -> None:
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        if comm.size == 1 or not same:
            continue
        flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in same]), inplace=True)
        for g, part in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(part.view_as(g))


def _sum_allreduce_hook(group, bucket):
    # DDP's default hook averages; distseq's loss is each rank's share of the global loss, so gradients add.
    # (No annotations: DDP inspects them and rejects the strings that `from __future__ import annotations` makes.)
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def data_parallel(model: nn.Module, token_comm: Communicator, mode: str = "ddp") -> nn.Module:
    """Wrap ``model`` so backward reduces (sums) gradients over ``token_comm`` (``dp_sp``).

    ``mode``: ``"ddp"`` (DistributedDataParallel with a summing hook, overlapping the all-reduce with the
    backward) or ``"fsdp"`` (FSDP2 ``fully_shard`` over a 1-D mesh of the group's ranks, gradient divide
    factor 1, so parameters and optimizer state are sharded). Models without expert parallelism only: expert
    weights need their own group (use :func:`reduce_gradients`).
    """
    if any(getattr(p, EXPERT_PARAM_ATTR, False) for p in model.parameters()):
        raise ValueError("data_parallel does not handle expert-parallel weights; use reduce_gradients")
    if token_comm.group is None:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, process_group=token_comm.group, find_unused_parameters=True)
        wrapped.register_comm_hook(token_comm.group, _sum_allreduce_hook)
        return wrapped
    if mode == "fsdp":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = DeviceMesh.from_group(token_comm.group, device, mesh_dim_names=("dp_sp",))
        fully_shard(model, mesh=mesh)
        model.set_gradient_divide_factor(1.0)
        model.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
        return model
    raise ValueError(f"unknown data-parallel mode {mode!r}; choose 'ddp' or 'fsdp'")
