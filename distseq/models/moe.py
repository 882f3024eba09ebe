"""Mixture of experts: top-k softmax router, SwiGLU experts, optional shared expert, load-balancing loss.

Built without parallelism. Two attributes connect it to a parallel layout; a parallel plan sets them:

* ``token_comm``: the ranks holding other tokens of the same sequences (the sequence-parallel group). The
  load-balancing statistics are per sequence, summed over it, and ``forward`` returns this rank's *share*
  of the sequences' aux loss, so the shares summed over ranks equal the single-process aux loss, value and
  gradients, whatever the data-parallel split or micro-batching.
* ``dispatch``: how routed assignments reach their experts. The local default computes every expert here;
  expert parallelism (``distseq.parallel.expert``) replaces it with an all-to-all exchange.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from distseq.kernels.moe import expert_swiglu
from distseq.models.layers import SwiGLU

if TYPE_CHECKING:
    from distseq.parallel.comm import Communicator

__all__ = ["MoE"]


class MoE(nn.Module):
    """Top-k routed SwiGLU experts with an optional dense shared expert.

    Args:
        hidden_size: model width.
        intermediate_size: width of each routed expert.
        num_experts: number of routed experts ``E``.
        top_k: experts per token.
        shared_intermediate_size: width of a dense SwiGLU added to every token's output; None for none.
        capacity_factor: None for dropless dispatch (every assignment computed). Otherwise each expert keeps
            at most ``ceil(capacity_factor * tokens * top_k / E)`` of its assignments, first come first served
            in token order; a dropped assignment contributes 0 (the shared expert still applies). ``tokens``
            is the number of tokens in this rank's call, so capacity is *per rank*: only dropless dispatch
            gives the same result for every data/sequence-parallel layout.
        aux_loss_coef: weight of the Switch/GShard load-balancing loss ``coef * E * sum_e f_e * P_e``.
        normalize_top_k: renormalise the k routing weights of a token to sum to 1.

    Parameters: ``router`` (``nn.Linear(hidden, E)``), stacked expert weights ``w_gate_up``
    ``[E, hidden, 2 * intermediate]`` (gate then up) and ``w_down`` ``[E, intermediate, hidden]`` (dim 0 is
    what expert parallelism shards), and ``shared`` (a :class:`SwiGLU`) when requested.
    """

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
        if shared_intermediate_size is not None:
            sizes["shared_intermediate_size"] = shared_intermediate_size
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ValueError(f"MoE sizes must be positive, got {bad} (all: {sizes})")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts: top_k={top_k}, num_experts={num_experts}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.aux_loss_coef, self.normalize_top_k = capacity_factor, aux_loss_coef, normalize_top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(num_experts, hidden_size, 2 * intermediate_size) * hidden_size**-0.5)
        self.w_down = nn.Parameter(torch.randn(num_experts, intermediate_size, hidden_size) * intermediate_size**-0.5)
        self.shared = SwiGLU(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        #: the ranks holding other tokens of the same sequences (sequence parallel); set by a parallel plan
        self.token_comm: Communicator | None = None
        #: (tokens [N, hidden], expert ids [A], token ids [A], weights [A]) -> combined output [N, hidden],
        #: for the A kept assignments in token order; replaced by expert parallelism
        self.dispatch: Callable[..., torch.Tensor] = self._local_dispatch
        #: first global expert id of ``w_gate_up`` / ``w_down`` (expert parallelism keeps a slice)
        self.expert_offset = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, T, hidden]`` -> ``(y [B, T, hidden], aux)``: aux is the sum over the B sequences of
        their balance losses (this rank's share of it when ``token_comm`` holds other tokens of the same
        sequences); divide by the number of sequences for the mean. A 2-D ``x`` ``[T, hidden]`` is one sequence."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [N, hidden]
        logits = self.router(tokens)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [N, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.normalize_top_k:
            weights = weights / weights.sum(-1, keepdim=True)
        # Assignments in token order: token t's k choices are rows t*k .. t*k+k-1.
        expert_ids = experts.reshape(-1)
        token_ids = torch.arange(tokens.shape[0], device=tokens.device).repeat_interleave(self.top_k)
        flat_weights = weights.reshape(-1)
        if self.capacity_factor is not None:
            keep = self._within_capacity(expert_ids, tokens.shape[0])
            expert_ids, token_ids, flat_weights = expert_ids[keep], token_ids[keep], flat_weights[keep]
        out = self.dispatch(tokens, expert_ids, token_ids, flat_weights.to(tokens.dtype))
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.reshape(shape), self._aux_loss(probs, experts, shape[0] if len(shape) == 3 else 1)

    def run_experts(self, rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Rows grouped by the experts held here (``counts[e]`` rows for local expert ``e``, in order) ->
        each row's expert output, same order. One matmul pair per expert.

        Every expert runs, even on zero rows, so each expert weight always receives a gradient (zeros when
        unused): gradient reductions then see the same parameters on every rank.
        """
        chunks = rows.split(list(counts))
        assert len(chunks) == self.w_gate_up.shape[0], (len(chunks), tuple(self.w_gate_up.shape))
        outputs = [expert_swiglu(chunk, self.w_gate_up[e], self.w_down[e]) for e, chunk in enumerate(chunks)]
        return torch.cat(outputs)

    def _within_capacity(self, expert_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Mask keeping each expert's first ``capacity`` assignments in token order (capacity is per rank)."""
        capacity = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids, minlength=self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.empty_like(order)
        rank_in_expert[order] = torch.arange(order.numel(), device=order.device) - starts[expert_ids[order]]
        return rank_in_expert < capacity

    def _local_dispatch(
        self, tokens: torch.Tensor, expert_ids: torch.Tensor, token_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Every expert computed here: assignments sorted by expert, one matmul pair per expert."""
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids - self.expert_offset, minlength=self.w_gate_up.shape[0]).tolist()
        rows = self.run_experts(tokens[token_ids[order]], counts) * weights[order, None]
        return torch.zeros_like(tokens).index_add(0, token_ids[order], rows)

    def _aux_loss(self, probs: torch.Tensor, experts: torch.Tensor, rows: int) -> torch.Tensor:
        """The sequence-wise balance loss ``coef * E * sum_e f_e * P_e`` of each of the ``rows`` sequences,
        summed over them (as DeepSeek-V3's sequence-wise auxiliary loss; Switch Transformer's formula per
        sequence).

        ``f_e`` (routed assignments before any capacity dropping) and the token count are a sequence's, summed
        over ``token_comm`` (the ranks holding other tokens of the *same* sequences); ``P_e`` is summed over
        this rank's tokens only, divided by the sequence's count, so the ranks' returns add up to the loss.
        Statistics per sequence make the loss independent of how sequences are grouped into micro-batches
        and data-parallel ranks, so every layout trains the same model.
        """
        probs = probs.view(rows, -1, self.num_experts)  # [B, T, E]
        assigned = experts.view(rows, -1)  # [B, T*k]
        counts = torch.zeros(rows, self.num_experts, dtype=torch.int64, device=probs.device)
        counts.scatter_add_(1, assigned, torch.ones_like(assigned))  # int64: exact for any length
        stats = torch.cat([counts, counts.new_full((rows, 1), probs.shape[1])], dim=1)  # [B, E + 1]
        if self.token_comm is not None:
            stats = self.token_comm.all_reduce(stats)
        stats = stats.to(probs.dtype)
        counts, num_tokens = stats[:, :-1], stats[:, -1:]
        fraction = counts / (num_tokens * self.top_k)  # f_e per sequence, no gradient
        prob_share = probs.sum(1) / num_tokens  # this rank's part of P_e per sequence
        return self.aux_loss_coef * self.num_experts * (fraction * prob_share).sum()
