"""Mixture of experts: top-k softmax router, SwiGLU experts, optional shared expert, load-balancing loss.

Built without parallelism. Two attributes connect it to a parallel layout:

* ``token_comm``: the ranks holding different tokens of the global batch (data x sequence parallel). The
  load-balancing statistics are then global, and ``forward`` returns this rank's *share* of the global aux
  loss, so the shares summed over ranks equal the single-process aux loss, value and gradients.
* ``dispatch``: how routed tokens reach their experts; the local default computes every expert here, expert
  parallelism (``distseq.parallel.expert``) replaces it with an all-to-all exchange.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from distseq.kernels.moe import expert_swiglu
from distseq.models.layers import SwiGLU

__all__ = ["MoE"]


class MoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        shared_intermediate_size: int | None = None,
        capacity_factor: float | None = None,
        aux_loss_coef: float = 0.01,
        normalize_top_k: bool = True,
    ):
        super().__init__()
        sizes = {
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_experts": num_experts,
            "top_k": top_k,
        }
        if any(v < 1 for v in sizes.values()):
            raise ValueError(f"MoE sizes must be positive, got {sizes}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts: top_k={top_k}, num_experts={num_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.aux_loss_coef, self.normalize_top_k = capacity_factor, aux_loss_coef, normalize_top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        scale = hidden_size**-0.5
        self.w_gate_up = nn.Parameter(torch.randn(num_experts, hidden_size, 2 * intermediate_size) * scale)
        self.w_down = nn.Parameter(torch.randn(num_experts, intermediate_size, hidden_size) * intermediate_size**-0.5)
        self.shared = SwiGLU(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        self.token_comm = None  # set by a parallel plan: Communicator over the token-holding ranks
        #: (tokens [N, h], expert ids [N*k], token index [N*k], weights [N*k]) -> combined output [N, h]
        self.dispatch: Callable[..., torch.Tensor] = self._local_dispatch
        self.expert_offset = 0  # first global expert id held here (expert parallelism shards the experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, T, hidden]`` -> ``(y [B, T, hidden], aux)``: aux is this rank's share of the aux loss."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [N, E], >= fp32
        weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.normalize_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        expert_ids, token_ids = experts.reshape(-1), torch.arange(tokens.shape[0]).repeat_interleave(self.top_k)
        flat_weights = weights.reshape(-1)
        if self.capacity_factor is not None:
            keep = self._within_capacity(expert_ids, tokens.shape[0])
            expert_ids, token_ids, flat_weights = expert_ids[keep], token_ids[keep], flat_weights[keep]
        out = self.dispatch(tokens, expert_ids, token_ids, flat_weights.to(tokens.dtype))
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.reshape(shape), self._aux_loss(probs, experts)

    def _within_capacity(self, expert_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Keep each expert's first ``capacity`` assignments in token order (capacity is per rank)."""
        capacity = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        rank_in_expert = torch.empty_like(order)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert[order] = torch.arange(order.numel()) - starts[expert_ids[order]]
        return rank_in_expert < capacity

    def _local_dispatch(self, tokens, expert_ids, token_ids, weights) -> torch.Tensor:
        """Every expert computed here: tokens grouped by expert, one matmul pair per expert."""
        out = torch.zeros_like(tokens)
        for e in range(self.w_gate_up.shape[0]):
            chosen = expert_ids == e + self.expert_offset
            if chosen.any():
                idx = token_ids[chosen]
                y = expert_swiglu(tokens[idx], self.w_gate_up[e], self.w_down[e]) * weights[chosen, None]
                out = out.index_add(0, idx, y)
        return out

    def _aux_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """``coef * E * sum_e f_e * P_e`` (Switch Transformer), f and the token count global over token_comm."""
        counts = torch.bincount(experts.reshape(-1), minlength=self.num_experts).to(probs.dtype)  # no grad
        num_tokens = torch.tensor(float(probs.shape[0]), dtype=probs.dtype)
        if self.token_comm is not None and self.token_comm.size > 1:
            stats = self.token_comm.all_reduce(torch.cat([counts, num_tokens[None]]))
            counts, num_tokens = stats[:-1], stats[-1]
        fraction = counts / (num_tokens * self.top_k)  # f_e over the global batch
        prob_share = probs.sum(0) / num_tokens  # this rank's part of P_e
        return self.aux_loss_coef * self.num_experts * (fraction * prob_share).sum()
