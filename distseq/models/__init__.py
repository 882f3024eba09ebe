"""Model layers and the hybrid linear/softmax-attention MoE language model."""

from distseq.models.hybrid import HybridLM, LMOutput

__all__ = ["HybridLM", "LMOutput"]
