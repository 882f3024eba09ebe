"""Megatron-Core plugin: distseq's sequence-parallel attention and linear mixer as Megatron modules.

* :class:`DistseqCoreAttention`: the ``core_attention`` of a self-attention spec; any distseq softmax strategy
  over Megatron's context-parallel group, on Megatron's own CP split (bshd and packed thd batches).
* :class:`DistseqLinearMixer`: the mixer of a ``MambaModel``'s ``M`` layers; distseq linear attention (LASP-2 by
  default) over the CP group.
* :func:`gpt_layer_spec`, :func:`hybrid_stack_spec`, :func:`core_attention_spec`: ready specs
  (``--spec distseq.integrations.megatron.specs ring`` from Megatron-LM).

Nothing here imports megatron until a module is built or a spec is asked for.
"""

from distseq.integrations.megatron.attention import CP_COMM_TYPES, DistseqCoreAttention
from distseq.integrations.megatron.mixer import DistseqLinearMixer
from distseq.integrations.megatron.specs import core_attention_spec, gpt_layer_spec, hybrid_stack_spec

__all__ = [
    "CP_COMM_TYPES",
    "DistseqCoreAttention",
    "DistseqLinearMixer",
    "core_attention_spec",
    "gpt_layer_spec",
    "hybrid_stack_spec",
]
