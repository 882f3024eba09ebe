"""``DistseqLinearMixer``: a sequence-parallel linear-attention mixer for Megatron-Core's hybrid ``MambaModel``.

Megatron builds the ``mixer`` of each ``M`` layer with ``config, d_model=, layer_number=, pg_collection=,
pp_layer_offset=`` and calls it as ``mixer(hidden [s_local, b, d_model], inference_context=, packed_seq_params=)``
expecting ``(out, bias)``. This mixer runs lightning-style linear attention (per-head fixed decay, optionally a
data-dependent gate) through a distseq linear strategy over the context-parallel group, on the zigzag layout of
Megatron's CP split, so the hybrid model's linear layers are sequence parallel where Megatron's own Mamba layers
exchange heads.

Tensor parallelism shards heads: one column-parallel projection makes each head's q, k, v (and gate logit)
side by side, so a TP rank's columns are whole heads; a row-parallel projection sums the heads back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distseq.integrations.megatron._groups import cp_and_tp_groups
from distseq.models.layers import lightning_decay
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, make_strategy

__all__ = ["DistseqLinearMixer"]

DECAYS = ("lightning", "none")


class DistseqLinearMixer(nn.Module):
    """Linear attention ``o_t = q_t^T S_t``, ``S_t = exp(g_t) S_{t-1} + k_t v_t^T`` per head, sequence parallel.

    Args (from the spec's ``params``):
        strategy: a distseq linear strategy (``lasp2``, ``lasp1``, ``ulysses``).
        num_heads, head_dim: default ``config.num_attention_heads`` and ``config.kv_channels``.
        decay: ``lightning`` (fixed per-head log decay ``-2^(-8h/H)``) or ``none``.
        gate: add a data-dependent log gate ``logsigmoid(w_h . x)`` per head and token.
        chunk_size, backend: the strategy's chunk length and local kernel (``torch``, ``triton``, ``fla``).
    """

    def __init__(
        self,
        config: Any,
        d_model: int,
        layer_number: int = 1,
        pg_collection: Any = None,
        pp_layer_offset: int = 0,
        *,
        strategy: str = "lasp2",
        num_heads: int | None = None,
        head_dim: int | None = None,
        decay: str = "lightning",
        gate: bool = False,
        chunk_size: int = 64,
        backend: str = "torch",
    ):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        if strategy not in (*LINEAR_STRATEGIES, "ulysses"):
            raise ValueError(f"DistseqLinearMixer needs a linear strategy, one of {[*LINEAR_STRATEGIES, 'ulysses']}")
        if decay not in DECAYS:
            raise ValueError(f"DistseqLinearMixer decay must be one of {DECAYS}, got {decay!r}")
        cp_group, tp_group = cp_and_tp_groups(pg_collection)
        tp, tp_rank = tp_group.size(), tp_group.rank()
        heads = num_heads or config.num_attention_heads
        if heads % tp:
            raise ValueError(f"DistseqLinearMixer shards heads over tp: num_heads={heads} is not divisible by tp={tp}")
        self.layer_number = layer_number
        self.head_dim = head_dim or config.kv_channels or d_model // heads
        self.local_heads = heads // tp
        self.gate = gate
        width = 3 * self.head_dim + int(gate)  # per head: q, k, v (and the gate logit)
        self.in_proj = ColumnParallelLinear(
            d_model,
            heads * width,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            tp_group=tp_group,
        )
        self.out_norm = nn.RMSNorm(self.head_dim, eps=config.layernorm_epsilon)
        self.out_proj = RowParallelLinear(
            heads * self.head_dim,
            d_model,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            tp_group=tp_group,
        )
        local = slice(tp_rank * self.local_heads, (tp_rank + 1) * self.local_heads)
        decays = lightning_decay(heads)[local] if decay == "lightning" else None
        self.register_buffer("decay", decays, persistent=False)
        self.comm = Communicator(cp_group, name="cp")
        p = self.comm.size
        options = {"chunk_size": chunk_size, "backend": backend}
        layout = SequenceLayout("zigzag", 2 * p, p, self.comm.rank)  # rebound to each call's length
        self.strategy = make_strategy(strategy, self.comm, layout, **options)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy.name}, heads/tp={self.local_heads}, head_dim={self.head_dim}, gate={self.gate}"

    def forward(
        self, hidden_states: torch.Tensor, inference_context: Any = None, packed_seq_params: Any = None, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if inference_context is not None:
            raise NotImplementedError("DistseqLinearMixer has no inference (decoding) path")
        tokens, batch, _ = hidden_states.shape
        p = self.comm.size
        cu_seqlens = None
        if packed_seq_params is not None:
            if p > 1:
                raise ValueError(
                    "DistseqLinearMixer: packed (thd) batches cut every document into 2*cp chunks, which a linear "
                    f"strategy cannot scan; use bshd batches at cp={p} (documents inside one sequence are fine "
                    "through the softmax layers only)"
                )
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            cu_seqlens = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
        # At cp = 1 every layout holds the tokens in order; contiguous accepts documents of any length.
        kind = "zigzag" if p > 1 else "contiguous"
        strategy = self.strategy.with_layout(SequenceLayout(kind, tokens * p, p, self.comm.rank))

        mixed, _ = self.in_proj(hidden_states)  # [s, b, heads/tp * width]
        mixed = mixed.transpose(0, 1).reshape(batch, tokens, self.local_heads, -1)
        d = self.head_dim
        q, k, v = mixed[..., :d] * d**-0.5, mixed[..., d : 2 * d], mixed[..., 2 * d : 3 * d]
        gate = None
        if self.gate:
            logits = mixed[..., 3 * d]
            gate = F.logsigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        out = strategy.linear_attention(q, k, v, decay=self.decay, gate=gate, cu_seqlens=cu_seqlens)
        out = self.out_norm(out).reshape(batch, tokens, -1).transpose(0, 1)
        return self.out_proj(out)
