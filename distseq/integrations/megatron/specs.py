"""Ready Megatron-Core layer specs with distseq's sequence-parallel attention and linear mixer.

From Python::

    spec = gpt_layer_spec("ring")                      # GPTModel(transformer_layer_spec=spec, ...)
    stack = hybrid_stack_spec(softmax="ring", linear="lasp2", decay="lightning")   # MambaModel(mamba_stack_spec=stack)

From Megatron-LM's command line, ``--spec distseq.integrations.megatron.specs <name>`` takes one of the
module attributes ``ring``, ``ulysses``, ``allgather_kv``, ``token_ring`` and ``usp`` (a GPT layer spec with
Megatron's local modules and that strategy; built on first access).
"""

from __future__ import annotations

import copy
from typing import Any

from distseq.integrations.megatron.attention import DistseqCoreAttention
from distseq.integrations.megatron.mixer import DistseqLinearMixer
from distseq.parallel.sequence.registry import SOFTMAX_STRATEGIES

__all__ = ["core_attention_spec", "gpt_layer_spec", "hybrid_stack_spec"]


def core_attention_spec(
    strategy: str | None = "ring", *, strategy_options: dict[str, Any] | None = None, attention_backend: str = "auto"
) -> Any:
    """The ``core_attention`` entry: ``ModuleSpec(module=DistseqCoreAttention, params=...)``. ``strategy=None``
    maps each layer's ``cp_comm_type``."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    params = {"strategy": strategy, "strategy_options": dict(strategy_options or {})}
    params["attention_backend"] = attention_backend
    return ModuleSpec(module=DistseqCoreAttention, params=params)


def gpt_layer_spec(
    strategy: str | None = "ring",
    *,
    strategy_options: dict[str, Any] | None = None,
    attention_backend: str = "auto",
    use_te: bool = False,
    **megatron_options: Any,
) -> Any:
    """Megatron's GPT layer spec (its local modules, or Transformer Engine's with ``use_te``) with distseq core
    attention. ``megatron_options`` go to ``get_gpt_layer_local_spec`` / ``get_gpt_layer_with_transformer_engine_spec``
    (``num_experts``, ``qk_layernorm``, ``normalization``, ...)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**megatron_options)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(**megatron_options)
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = core_attention_spec(
        strategy, strategy_options=strategy_options, attention_backend=attention_backend
    )
    return spec


def hybrid_stack_spec(
    softmax: str | None = "ring",
    linear: str = "lasp2",
    *,
    strategy_options: dict[str, Any] | None = None,
    attention_backend: str = "auto",
    rms_norm: bool = True,
    **mixer_options: Any,
) -> Any:
    """A ``MambaStack`` spec of Megatron's local modules whose ``M`` layers are :class:`DistseqLinearMixer`
    (``linear`` strategy; ``mixer_options``: ``decay``, ``gate``, ``num_heads``, ``head_dim``, ``chunk_size``,
    ``backend``) and whose ``*`` layers run :class:`DistseqCoreAttention` (``softmax`` strategy); ``-`` layers are
    MLPs. Use it as ``MambaModel(mamba_stack_spec=..., hybrid_override_pattern="M*M-")``. (``MambaStack`` builds
    its final norm with Transformer Engine's ``TENorm``.)"""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    local = LocalSpecProvider()
    norm = local.layer_norm(rms_norm=rms_norm)
    mixer = ModuleSpec(module=DistseqLinearMixer, params={"strategy": linear, **mixer_options})
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=local.column_parallel_linear(),
            core_attention=core_attention_spec(
                softmax, strategy_options=strategy_options, attention_backend=attention_backend
            ),
            linear_proj=local.row_parallel_linear(),
        ),
    )
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=local.column_parallel_linear(), linear_fc2=local.row_parallel_linear()),
    )
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=ModuleSpec(
                module=MambaLayer,
                submodules=MambaLayerSubmodules(norm=norm, mixer=mixer, mamba_bda=get_bias_dropout_add),
            ),
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    input_layernorm=norm, self_attention=attention, self_attn_bda=get_bias_dropout_add
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(pre_mlp_layernorm=norm, mlp=mlp, mlp_bda=get_bias_dropout_add),
            ),
        ),
    )


def __getattr__(name: str) -> Any:
    """``--spec distseq.integrations.megatron.specs ring``: a GPT layer spec per softmax strategy."""
    if name in SOFTMAX_STRATEGIES:
        spec = gpt_layer_spec(name)
        globals()[name] = spec
        return spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
