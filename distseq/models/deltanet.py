"""The gated DeltaNet layer, the ``G`` of ``layer_pattern``, written without parallelism.

Per head, with ``beta_t = sigmoid(beta_proj(x)_t)`` and the log decay
``g_t = -exp(A_log) softplus(gate_proj(x)_t + dt_bias)`` (Mamba2's parametrisation of the step):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t

with q and k L2-normalised per head and q scaled by ``head_dim ** -0.5`` (the strategies' ``delta_rule`` does
not scale). q, k and v pass through the short causal convolutions (``short_conv_size``, SiLU) first; the output
goes through a per-head RMSNorm, a SiLU output gate and ``o_proj``. The recurrence is the linear strategy's
``delta_rule``; a strategy without one cannot run this layer, which :func:`require_delta_rule` says before
anything runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distseq.config.model import ModelConfig
from distseq.models.layers import ShortConv
from distseq.models.mamba import init_decay_rates, init_dt_bias
from distseq.parallel.sequence.base import SequenceStrategy
from distseq.parallel.sequence.context import SequenceParallel
from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, strategy_class

__all__ = ["GatedDeltaNet", "require_delta_rule"]

L2_EPS = 1e-6  # q / sqrt(|q|^2 + eps)


def _has_delta_rule(cls: type[SequenceStrategy]) -> bool:
    # LASP-2 and All-Scan name their summaries' exchange; Ulysses has its own; LASP-1 neither
    return cls.delta_rule is not SequenceStrategy.delta_rule and getattr(cls, "delta_exchange", "") is not None


def require_delta_rule(strategy: type[SequenceStrategy], name: str) -> None:
    """Raise ValueError unless the linear strategy class ``strategy`` (called ``name``) has the delta rule that
    gated DeltaNet layers need; no collective, so callers check before the first one."""
    if not _has_delta_rule(strategy):
        able = [n for n in [*LINEAR_STRATEGIES, "ulysses"] if _has_delta_rule(strategy_class(n))]
        raise ValueError(
            f"gated DeltaNet layers ('G' in layer_pattern) need a linear strategy with the delta rule; "
            f"linear_strategy={name!r} has none: use one of {able}"
        )


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    acc = x.to(torch.promote_types(x.dtype, torch.float32))
    return (acc * torch.rsqrt(acc.pow(2).sum(-1, keepdim=True) + L2_EPS)).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet with ``num_heads`` heads of ``head_dim`` for q, k and v; the per-head ``A_log`` and
    ``dt_bias`` follow their heads under tensor parallelism, the output norm's weight is shared by the heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        heads, inner = cfg.num_heads, cfg.num_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, heads, bias=False)  # the decay's step, before softplus
        self.beta_proj = nn.Linear(cfg.hidden_size, heads, bias=False)
        self.out_gate_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)
        self.conv = ShortConv((inner, inner, inner), cfg.short_conv_size) if cfg.short_conv_size else None
        self.A_log = nn.Parameter(init_decay_rates(heads))  # [H]
        self.dt_bias = nn.Parameter(init_dt_bias(heads))  # [H]
        self.out_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, seq: SequenceParallel) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv is not None:
            q, k, v = self.conv(q, k, v, seq)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k, v = (t.view(batch, tokens, -1, self.head_dim) for t in (q, k, v))  # [B, n, H, D]
        q, k = _l2_normalize(q) * self.head_dim**-0.5, _l2_normalize(k)
        beta_logits, step_logits = self.beta_proj(x), self.gate_proj(x)
        acc = torch.promote_types(step_logits.dtype, torch.float32)  # gates in fp32 under autocast
        beta = torch.sigmoid(beta_logits.to(acc)).to(q.dtype)  # [B, n, H], in q's dtype as delta_rule asks
        gate = -torch.exp(self.A_log.to(acc)) * F.softplus(step_logits.to(acc) + self.dt_bias.to(acc))
        out = seq.linear.delta_rule(q, k, v, beta, gate=gate, cu_seqlens=seq.cu_seqlens)  # [B, n, H, D]
        out = self.out_norm(out) * F.silu(self.out_gate_proj(x)).view_as(out)
        return self.o_proj(out.reshape(batch, tokens, -1))
