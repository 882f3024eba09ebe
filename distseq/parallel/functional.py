"""Autograd-aware collectives built on :class:`~distseq.parallel.comm.Communicator`.

Each forward collective has the collective whose transpose it is as backward:

* ``all_to_all``: backward is the inverse all-to-all (scatter and gather dims swapped);
* ``all_gather``: backward is a reduce-scatter (sum) of the gradient, because every rank's copy of the
  gathered tensor contributes to the loss;
* ``reduce_scatter``: backward is an all-gather.
"""

from __future__ import annotations

import torch

from distseq.parallel.comm import Communicator

__all__ = ["all_gather", "all_to_all", "all_to_all_v", "reduce_scatter"]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.comm, ctx.scatter_dim, ctx.gather_dim = comm, scatter_dim, gather_dim
        return comm.all_to_all(x, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_to_all(grad, ctx.gather_dim, ctx.scatter_dim), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.reduce_scatter(grad, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return comm.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_gather(grad, ctx.dim), None, None


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, send_splits: list[int], recv_splits: list[int]):
        ctx.comm, ctx.send_splits, ctx.recv_splits = comm, send_splits, recv_splits
        return comm.all_to_all_v(x, send_splits, recv_splits)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_to_all_v(grad, ctx.recv_splits, ctx.send_splits)[0], None, None, None


def all_to_all_v(x: torch.Tensor, comm: Communicator, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
    """Differentiable :meth:`Communicator.all_to_all_v` (splits known on both sides); the gradient goes back
    by the reverse uneven all-to-all."""
    return _AllToAllV.apply(x, comm, list(send_splits), list(recv_splits))


def all_to_all(x: torch.Tensor, comm: Communicator, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable :meth:`Communicator.all_to_all`."""
    return _AllToAll.apply(x, comm, scatter_dim, gather_dim)


def all_gather(x: torch.Tensor, comm: Communicator, dim: int = 0) -> torch.Tensor:
    """Differentiable :meth:`Communicator.all_gather`; the gradient is reduce-scattered back."""
    return _AllGather.apply(x, comm, dim)


def reduce_scatter(x: torch.Tensor, comm: Communicator, dim: int = 0) -> torch.Tensor:
    """Differentiable :meth:`Communicator.reduce_scatter` (sum); the gradient is all-gathered."""
    return _ReduceScatter.apply(x, comm, dim)
