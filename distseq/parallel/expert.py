"""Expert parallelism: a MoE layer's experts sharded over the ``ep`` group, tokens exchanged by all-to-all.

``apply_expert_parallel`` is a plan applied to a model built without parallelism: each ep rank keeps its
``num_experts / ep`` experts (slices of the full stacked weights) and the layer's dispatch becomes

    route locally -> sort assignments by owner rank -> all_to_all_v (tokens, expert ids) -> local experts
    -> reverse all_to_all_v -> weighted combine at the token's home rank.

Expert weights are then marked so :func:`distseq.parallel.data.reduce_gradients` sums their gradients over
``edp`` (the ranks holding the same experts) instead of ``dp x sp``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from distseq.kernels.moe import expert_swiglu
from distseq.parallel import functional as F
from distseq.parallel.comm import Communicator
from distseq.parallel.data import EXPERT_PARAM_ATTR

__all__ = ["apply_expert_parallel"]


def apply_expert_parallel(moe: nn.Module, ep_comm: Communicator) -> nn.Module:
    """Shard the experts of ``moe`` (a ``distseq.models.moe.MoE``) over ``ep_comm`` in place; returns it."""
    num_experts, ep = moe.num_experts, ep_comm.size
    if num_experts % ep:
        raise ValueError(f"ep must divide num_experts: num_experts={num_experts}, ep={ep}")
    local = num_experts // ep
    first = ep_comm.rank * local
    moe.w_gate_up = nn.Parameter(moe.w_gate_up.detach()[first : first + local].clone())
    moe.w_down = nn.Parameter(moe.w_down.detach()[first : first + local].clone())
    for p in (moe.w_gate_up, moe.w_down):
        setattr(p, EXPERT_PARAM_ATTR, True)
    moe.expert_offset = first
    moe.dispatch = partial(_exchange_dispatch, moe, ep_comm, local)
    return moe


def _exchange_dispatch(
    moe: nn.Module,
    comm: Communicator,
    local: int,
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    token_ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    order = torch.argsort(expert_ids // local, stable=True)  # assignments grouped by owner rank
    send_splits = torch.bincount(expert_ids // local, minlength=comm.size).tolist()
    # The expert ids travel first (and fix the receive counts); then the tokens, differentiably.
    arrived_ids, recv_splits = comm.all_to_all_v(expert_ids[order], send_splits)
    arrived = F.all_to_all_v(tokens[token_ids[order]], comm, send_splits, recv_splits)  # [M, hidden]
    results = torch.zeros_like(arrived)
    for e in range(local):
        rows = torch.nonzero(arrived_ids == moe.expert_offset + e).flatten()
        if rows.numel():
            results = results.index_copy(0, rows, expert_swiglu(arrived[rows], moe.w_gate_up[e], moe.w_down[e]))
    returned = F.all_to_all_v(results, comm, recv_splits, send_splits)  # back at the tokens' home, sorted
    return torch.zeros_like(tokens).index_add(0, token_ids[order], returned * weights[order, None])
