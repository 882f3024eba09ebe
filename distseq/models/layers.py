"""The layers of the hybrid model, written without parallelism: attention layers reach the rest of the
sequence only through the :class:`~distseq.parallel.sequence.context.SequenceParallel` they are given.

Head counts are read from the projections' output sizes at run time (``view(B, n, -1, head_dim)``), so a
tensor-parallel plan that splits the projections by heads needs no change here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distseq.config.model import ModelConfig
from distseq.parallel.comm import Communicator
from distseq.parallel.sequence.context import SequenceParallel
from distseq.parallel.tensor import shard_parameter, tp_slice

__all__ = ["LinearAttention", "ShortConv", "SoftmaxAttention", "SwiGLU", "apply_rope", "lightning_decay"]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[B, n, H, D]`` at global ``positions`` ``[n]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None]  # [n, D/2], fp64 keeps long positions exact
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = angles.cos()[None, :, None].to(dtype), angles.sin()[None, :, None].to(dtype)
    x1, x2 = x.to(dtype)[..., :half], x.to(dtype)[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def lightning_decay(num_heads: int) -> torch.Tensor:
    """Per-head log decays ``-2^(-8 (h+1) / H)`` (the ALiBi / lightning-attention slopes), ``[H]``."""
    return -torch.exp2(-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads).float()


class ShortConv(nn.Module):
    """Causal depthwise convolutions of width ``size`` (with bias) on the q, k and v projections, then SiLU, in one call
    (one halo exchange for the three). One filter per channel; a tensor-parallel plan keeps each rank's
    channels (:meth:`shard_channels`).

    Args:
        channels: the widths of q, k and v (their projections' output sizes).
        size: the filter width (the last tap multiplies the current token).
    """

    def __init__(self, channels: tuple[int, int, int], size: int):
        super().__init__()
        self.size = size
        bound = size**-0.5  # torch.nn.Conv1d's default for a depthwise filter (fan-in = size)
        self.q_weight, self.k_weight, self.v_weight = (
            nn.Parameter(torch.empty(c, size).uniform_(-bound, bound)) for c in channels
        )
        # With a bias, as Mamba's convolutions (and Conv1d's default): the recall task is learned in a fraction
        # of the steps it takes without one.
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.empty(c).uniform_(-bound, bound)) for c in channels)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: SequenceParallel
    ) -> tuple[torch.Tensor, ...]:
        """``q``, ``k``, ``v``: ``[B, n, C_i]`` projections of this rank's tokens."""
        weights = (self.q_weight, self.k_weight, self.v_weight)
        bias = torch.cat([self.q_bias, self.k_bias, self.v_bias])
        mixed = seq.short_conv(torch.cat([q, k, v], dim=-1), torch.cat(weights), bias)
        return F.silu(mixed).split([w.shape[0] for w in weights], dim=-1)

    def shard_channels(self, tp: Communicator, *, replicated: tuple[str, ...] = ()) -> None:
        """Keep the filters of this tensor-parallel rank's channels (its slice of each projection); the
        projections named in ``replicated`` (``"q"``, ``"k"``, ``"v"``) stay whole on every rank."""
        for name in ("q_weight", "k_weight", "v_weight", "q_bias", "k_bias", "v_bias"):
            if name.partition("_")[0] in replicated:
                continue
            param = getattr(self, name)
            setattr(self, name, shard_parameter(param, tp_slice(param.shape[0], tp, f"conv.{name} channels"), 0))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SoftmaxAttention(nn.Module):
    """GQA softmax attention with RoPE on the layout's global positions and optional qk-norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta if cfg.rope else None
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.conv = (
            ShortConv(
                (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features), cfg.short_conv_size
            )
            if cfg.short_conv_softmax
            else None
        )

    def forward(self, x: torch.Tensor, seq: SequenceParallel) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv is not None:
            q, k, v = self.conv(q, k, v, seq)
        q, k, v = (t.view(batch, tokens, -1, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_theta is not None:
            positions = seq.positions(x.device)
            q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta)
        out = seq.softmax.attention(q, k, v, causal=True, cu_seqlens=seq.cu_seqlens)
        return self.o_proj(out.reshape(batch, tokens, -1))


class LinearAttention(nn.Module):
    """Lightning-attention style linear attention: fixed per-head decay, optional data-dependent gate,
    per-head output RMSNorm and optional sigmoid output gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inner = cfg.num_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.num_heads, bias=True) if cfg.linear_gate else None
        self.out_gate_proj = nn.Linear(cfg.hidden_size, inner, bias=False) if cfg.linear_output_gate else None
        self.out_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.register_buffer("decay", lightning_decay(cfg.num_heads), persistent=False)  # [H], log space
        self.conv = ShortConv((inner, inner, inner), cfg.short_conv_size) if cfg.short_conv_size else None

    def forward(self, x: torch.Tensor, seq: SequenceParallel) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.conv is not None:
            q, k, v = self.conv(q, k, v, seq)
        q = q.view(batch, tokens, -1, self.head_dim) * self.head_dim**-0.5
        k, v = k.view(batch, tokens, -1, self.head_dim), v.view(batch, tokens, -1, self.head_dim)
        gate = None
        if self.gate_proj is not None:
            logits = self.gate_proj(x)
            gate = F.logsigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        out = seq.linear.linear_attention(q, k, v, decay=self.decay, gate=gate, cu_seqlens=seq.cu_seqlens)
        out = self.out_norm(out)
        if self.out_gate_proj is not None:
            out = out * torch.sigmoid(self.out_gate_proj(x)).view_as(out)
        return self.o_proj(out.reshape(batch, tokens, -1))
