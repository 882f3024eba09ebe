"""The Mamba2 (SSD) layer, the ``M`` of ``layer_pattern``, written without parallelism.

Mamba2's recurrence has one scalar decay per head and token, which makes it gated linear attention. Per head,
with ``A = -exp(A_log)``, the step ``dt_t = softplus(dt_proj(x)_t + dt_bias)`` and a state ``S`` of
``[N, P]`` (``N`` the state size, ``P`` the head width):

    S_t = exp(A dt_t) S_{t-1} + B_t (dt_t x_t)^T,    y_t = S_t^T C_t + D x_t

This is the linear-attention contract ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t`` (q unscaled)
with ``q = C``, ``k = B``, ``v = dt x`` and ``g = A dt``, so every linear strategy runs it unchanged (LASP-2
exchanges ``N x P`` chunk states). B and C come in ``mamba_groups`` groups of heads, as Mamba2's ``n_groups``.

Around the recurrence: a causal depthwise convolution (with bias, then SiLU) on x, B and C, through the
sequence-parallel halo exchange (:class:`ShortConv`, with C, B, x in its q, k, v places); the skip ``D x``; the
gated norm ``y = RMSNorm(y silu(z))``. Mamba2 normalises over each group of ``d_inner / n_groups`` channels,
Megatron over each tensor-parallel rank's part; here the statistics are per head (over its ``P`` channels), with
one weight per channel, so splitting the heads over tp leaves the norm local and exact under any tp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distseq.config.model import ModelConfig
from distseq.models.layers import ShortConv
from distseq.parallel.sequence.context import SequenceParallel

__all__ = ["Mamba2", "init_decay_rates", "init_dt_bias"]


def init_decay_rates(heads: int, low: float = 1.0, high: float = 16.0) -> torch.Tensor:
    """``A_log`` ``[H]``: the log of decay rates ``A`` drawn uniformly from ``[low, high]`` (Mamba2's init)."""
    return torch.empty(heads).uniform_(low, high).log()


def init_dt_bias(heads: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """``dt_bias`` ``[H]``: the inverse softplus of steps drawn log-uniformly from ``[dt_min, dt_max]``
    (at least ``floor``), so that ``softplus(dt_bias)`` starts there (Mamba2's init)."""
    log_dt = torch.rand(heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = log_dt.exp().clamp_min(floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = log(exp(dt) - 1), stable for small dt


class Mamba2(nn.Module):
    """Mamba2 with ``num_heads`` heads of ``head_dim`` channels, state size ``mamba_state_size``, B / C in
    ``mamba_groups`` groups and a convolution of width ``mamba_conv_size``.

    The input projection is one linear per part (z, x, B, C, dt), so a tensor-parallel plan splits each by heads
    (B and C by groups, or keeps them whole when there is one group); the per-head ``A_log``, ``dt_bias``, ``D``
    and the norm weight follow their heads.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        heads, head_dim = cfg.num_heads, cfg.head_dim
        inner, state = heads * head_dim, cfg.mamba_groups * cfg.mamba_state_size
        self.head_dim, self.state_size, self.eps = head_dim, cfg.mamba_state_size, cfg.norm_eps
        self.z_proj = nn.Linear(cfg.hidden_size, inner, bias=False)  # the output gate
        self.x_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.b_proj = nn.Linear(cfg.hidden_size, state, bias=False)
        self.c_proj = nn.Linear(cfg.hidden_size, state, bias=False)
        self.dt_proj = nn.Linear(cfg.hidden_size, heads, bias=False)
        self.conv = ShortConv((state, state, inner), cfg.mamba_conv_size)  # C, B, x in the q, k, v places
        self.A_log = nn.Parameter(init_decay_rates(heads))  # [H]; A = -exp(A_log)
        self.dt_bias = nn.Parameter(init_dt_bias(heads))  # [H]
        self.D = nn.Parameter(torch.ones(heads))  # [H], the skip
        self.norm_weight = nn.Parameter(torch.ones(inner))  # one per channel, statistics per head
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, seq: SequenceParallel) -> torch.Tensor:
        batch, tokens, _ = x.shape
        c, b, xs = self.conv(self.c_proj(x), self.b_proj(x), self.x_proj(x), seq)
        xs = xs.view(batch, tokens, -1, self.head_dim)  # [B, n, H, P]
        heads_per_group = xs.shape[2] * self.state_size // b.shape[-1]
        # Each head reads its group's B and C: [B, n, G, N] -> [B, n, H, N].
        b, c = (t.view(batch, tokens, -1, self.state_size).repeat_interleave(heads_per_group, 2) for t in (b, c))
        dt_logits = self.dt_proj(x)
        acc = torch.promote_types(dt_logits.dtype, torch.float32)  # gates, skip and norm in fp32 under autocast
        dt = F.softplus(dt_logits.to(acc) + self.dt_bias.to(acc))  # [B, n, H]
        gate = -torch.exp(self.A_log.to(acc)) * dt  # log decay A dt <= 0
        v = (xs.to(acc) * dt[..., None]).to(c.dtype)
        y = seq.linear.linear_attention(c, b, v, gate=gate, cu_seqlens=seq.cu_seqlens)  # [B, n, H, P]
        y = y.to(acc) + self.D.to(acc)[:, None] * xs.to(acc)
        y = y * F.silu(self.z_proj(x).to(acc)).view_as(y)
        y = F.rms_norm(y, (self.head_dim,), eps=self.eps) * self.norm_weight.to(acc).view(-1, self.head_dim)
        return self.o_proj(y.reshape(batch, tokens, -1).to(x.dtype))
