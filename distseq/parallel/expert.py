"""Expert parallelism: a MoE layer's experts sharded over the ``ep`` group, tokens exchanged by all-to-all.

``apply_expert_parallel`` is a plan applied to a model built without parallelism: ep rank ``r`` keeps experts
``[r * E/ep, (r+1) * E/ep)`` (slices of the full stacked weights) and the layer's dispatch becomes

    route locally -> sort assignments by expert (hence by owner rank) -> all_to_all of the per-expert counts
    -> all_to_all_v of the assigned token rows -> local experts -> reverse all_to_all_v -> weighted combine
    at the token's home rank.

The count exchange tells every owner how many rows of each of its experts arrive from each rank, so expert
ids never travel; the routing weights stay home and are applied after the return trip, so their gradient
is local. Per forward: one ``all_to_all`` (``E`` int64 counts) and two ``all_to_all_v``; backward: two
``all_to_all_v``, the transposes.

Gradients after backward: an expert weight lives on its owner and holds the gradient from every token of
the ep group routed to it; it must still be summed over ``edp`` (the ranks holding the same experts), and the
router / shared-expert weights over every token-holding rank (``dp x sp``).
``distseq.parallel.data.reduce_gradients`` does both, recognising expert weights by ``EXPERT_PARAM_ATTR``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from distseq.parallel import functional as F
from distseq.parallel.comm import Communicator
from distseq.parallel.data import EXPERT_PARAM_ATTR

__all__ = ["apply_expert_parallel"]


def apply_expert_parallel(moe: nn.Module, ep_comm: Communicator) -> nn.Module:
    """Shard the experts of ``moe`` over ``ep_comm`` in place and switch it to all-to-all dispatch; returns it.

    ``moe`` is a ``distseq.models.moe.MoE`` built without parallelism (full stacked ``w_gate_up`` /
    ``w_down``); this module must not import the models layer, so it is used through that interface only
    (``num_experts``, the stacked weights, ``expert_offset``, ``dispatch``, ``run_experts``).

    After backward, the expert weights' gradients must be summed over the expert-data-parallel group
    (``edp``: the ranks holding the same experts) and the router / shared-expert gradients over all
    token-holding ranks (``dp x sp``); the caller does this, e.g. with
    ``reduce_gradients(model, dp_sp_comm, edp_comm)``.
    """
    num_experts, ep = moe.num_experts, ep_comm.size
    if num_experts % ep:
        raise ValueError(f"ep must divide num_experts: num_experts={num_experts}, ep={ep}")
    held = moe.w_gate_up.shape[0]
    if held != num_experts:
        raise ValueError(
            f"apply_expert_parallel needs the full experts of a model built without parallelism: "
            f"the layer holds {held} of num_experts={num_experts} (already expert-parallel?)"
        )
    local = num_experts // ep
    first = ep_comm.rank * local
    for name in ("w_gate_up", "w_down"):
        full = getattr(moe, name)
        shard = nn.Parameter(full.detach()[first : first + local].clone(), requires_grad=full.requires_grad)
        setattr(shard, EXPERT_PARAM_ATTR, True)
        setattr(moe, name, shard)
    moe.expert_offset = first
    moe.dispatch = partial(_exchange_dispatch, moe, ep_comm)
    return moe


def _exchange_dispatch(
    moe: nn.Module,
    comm: Communicator,
    tokens: torch.Tensor,
    expert_ids: torch.Tensor,
    token_ids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The ``MoE.dispatch`` of an expert-parallel layer: ``tokens [N, hidden]`` and the kept assignments
    (expert id, token id, weight) -> combined expert output ``[N, hidden]`` at the tokens' home."""
    ep, local = comm.size, moe.num_experts // comm.size
    order = torch.argsort(expert_ids, stable=True)  # by expert, so by owner rank, token order within each
    send_counts = torch.bincount(expert_ids, minlength=moe.num_experts).view(ep, local)  # [owner, its expert]
    recv_counts = comm.all_to_all(send_counts, scatter_dim=0, gather_dim=0)  # [source rank, my expert]
    sent, received = torch.stack([send_counts, recv_counts]).tolist()  # the one host sync
    send_splits, recv_splits = [sum(row) for row in sent], [sum(row) for row in received]
    arrived = F.all_to_all_v(tokens[token_ids[order]], comm, send_splits, recv_splits)  # (source, expert) order
    # Regroup (source, expert) -> (expert, source) so each local expert is one contiguous matmul.
    local_expert = torch.arange(local, device=tokens.device).repeat(ep).repeat_interleave(recv_counts.reshape(-1))
    regroup = torch.argsort(local_expert, stable=True)
    outputs = moe.run_experts(arrived[regroup], [sum(col) for col in zip(*received, strict=True)])
    results = outputs[torch.argsort(regroup)]  # back to (source, expert) order
    returned = F.all_to_all_v(results, comm, recv_splits, send_splits)  # home again, in `order`
    return torch.zeros_like(tokens).index_add(0, token_ids[order], returned * weights[order, None])
