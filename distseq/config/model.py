"""The model configuration: a typed, validated dataclass (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelConfig"]

#: ``layer_pattern`` letters: the token mixer of each layer
LAYER_KINDS = {"L": "linear attention", "A": "softmax attention", "M": "Mamba2 (SSD)", "G": "gated DeltaNet"}
#: ``mlp_pattern`` letters: the MLP of each layer (its ``M`` is not the layer pattern's Mamba2)
MLP_KINDS = {"D": "dense SwiGLU", "M": "mixture of experts"}


@dataclass(kw_only=True)
class ModelConfig:
    """A hybrid language model of linear-attention, softmax-attention, Mamba2 and gated DeltaNet layers with dense
    or MoE MLPs.

    Attributes:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width.
        num_heads: query heads of every attention layer.
        num_kv_heads: key/value heads of the softmax layers (GQA); must divide num_heads.
        head_dim: per-head width; defaults to hidden_size // num_heads.
        layer_pattern: one letter per layer for its token mixer: ``L`` linear attention, ``A`` softmax attention,
            ``M`` Mamba2 (SSD), ``G`` gated DeltaNet; e.g. ``"LLLA" * 4`` or ``"MGMA"``.
        mlp_pattern: one letter per layer for its MLP, ``D`` dense or ``M`` MoE (this ``M`` is not the layer
            pattern's Mamba2: the two patterns are separate fields); default: every ``moe_interval``-th layer is
            MoE (none when ``moe_interval`` is 0).
        moe_interval: with no mlp_pattern, layers ``i`` with ``(i + 1) % moe_interval == 0`` are MoE.
        intermediate_size: width of the dense SwiGLU MLPs.
        num_experts, top_k, moe_intermediate_size: the MoE layers' experts.
        shared_expert: add a dense shared expert (width moe_intermediate_size) to every MoE layer.
        capacity_factor: None for dropless dispatch, else the per-rank expert capacity factor.
        aux_loss_coef: weight of the load-balancing loss.
        rope_theta: RoPE base of the softmax layers.
        rope: rotary position embedding on the softmax layers' q and k; False = none, as in Jamba's attention
            layers (order then comes from the causal mask, the short convolutions and the linear layers' decay),
            which lets a content lookup learned on short sequences work at any distance.
        qk_norm: RMSNorm on the softmax layers' queries and keys (per head).
        linear_gate: data-dependent per-head gate in the linear layers (on top of the fixed decay).
        linear_output_gate: sigmoid output gate on the linear layers.
        short_conv_size: width of a causal depthwise convolution (then SiLU) on the q, k and v projections of the
            linear layers, as flash-linear-attention's layers have (they use 4); 0 = none. It mixes each token
            with the few before it, across shard boundaries (a halo exchange).
            The gated DeltaNet layers (``G``) use it on their q, k and v too.
        short_conv_softmax: the same convolution on the softmax layers' q, k and v too.
        mamba_state_size: the Mamba2 layers' state size per head (``d_state``, the width of B and C). A Mamba2
            layer has ``num_heads`` heads of ``head_dim`` channels (``d_inner = num_heads * head_dim``).
        mamba_conv_size: width of the Mamba2 layers' causal depthwise convolution (with bias, then SiLU) on x, B
            and C; >= 1.
        mamba_groups: B / C groups of the Mamba2 layers (``n_groups``); must divide num_heads. Under tensor
            parallelism 1 (B and C replicated over tp) or a multiple of tp (split with their heads).
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share the embedding and LM-head weights.
        loss_chunk_size: tokens whose logits exist at once when computing the loss.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    layer_pattern: str = "LLLA"
    mlp_pattern: str | None = None
    moe_interval: int = 0
    intermediate_size: int = 128
    num_experts: int = 4
    top_k: int = 2
    moe_intermediate_size: int = 64
    shared_expert: bool = False
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    rope_theta: float = 10000.0
    rope: bool = True
    qk_norm: bool = False
    linear_gate: bool = False
    linear_output_gate: bool = True
    short_conv_size: int = 0
    short_conv_softmax: bool = False
    mamba_state_size: int = 16
    mamba_conv_size: int = 4
    mamba_groups: int = 1
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    loss_chunk_size: int = 4096

    def __post_init__(self) -> None:
        positive = {
            name: getattr(self, name)
            for name in (
                "vocab_size",
                "hidden_size",
                "num_heads",
                "num_kv_heads",
                "intermediate_size",
                "num_experts",
                "top_k",
                "moe_intermediate_size",
                "loss_chunk_size",
                "mamba_state_size",
                "mamba_conv_size",
                "mamba_groups",
            )
        }
        bad = {k: v for k, v in positive.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"model sizes must be positive integers, got {bad}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size must divide by num_heads when head_dim is not given: "
                    f"hidden_size={self.hidden_size}, num_heads={self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads must divide by num_kv_heads: num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.layer_pattern or set(self.layer_pattern) - set(LAYER_KINDS):
            bad_letters = sorted(set(self.layer_pattern) - set(LAYER_KINDS))
            raise ValueError(
                f"layer_pattern must be letters from {sorted(LAYER_KINDS)}, got {self.layer_pattern!r} "
                f"(bad letters: {bad_letters})"
            )
        if self.mlp_pattern is not None and (
            len(self.mlp_pattern) != len(self.layer_pattern) or set(self.mlp_pattern) - set(MLP_KINDS)
        ):
            raise ValueError(
                f"mlp_pattern must have one letter from {sorted(MLP_KINDS)} per layer "
                f"({len(self.layer_pattern)}), got {self.mlp_pattern!r}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts: top_k={self.top_k}, num_experts={self.num_experts}")
        if self.short_conv_size < 0 or (self.short_conv_softmax and self.short_conv_size == 0):
            raise ValueError(
                f"short_conv_size must be >= 0 (and > 0 for short_conv_softmax): short_conv_size="
                f"{self.short_conv_size}, short_conv_softmax={self.short_conv_softmax}"
            )
        if self.num_heads % self.mamba_groups:
            raise ValueError(
                f"num_heads must divide by mamba_groups: num_heads={self.num_heads}, mamba_groups={self.mamba_groups}"
            )
        if self.moe_interval < 0:
            raise ValueError(f"moe_interval must be >= 0, got {self.moe_interval}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {self.capacity_factor}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_pattern)

    def mlp_kinds(self) -> str:
        """One letter per layer: ``D`` dense or ``M`` MoE."""
        if self.mlp_pattern is not None:
            return self.mlp_pattern
        k = self.moe_interval
        return "".join("M" if k and (i + 1) % k == 0 else "D" for i in range(self.num_layers))
