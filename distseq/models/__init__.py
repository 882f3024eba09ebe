"""Model layers and the hybrid linear/softmax attention MoE model (issue #5)."""
