"""Causal linear attention with no decay, fixed per-head decay or a data-dependent gate, and state resets.

``naive.py`` is the token-by-token reference; ``chunk.py`` the chunked PyTorch path used everywhere.
"""

from distseq.kernels.linear_attention.chunk import chunk_linear_attention
from distseq.kernels.linear_attention.naive import naive_recurrent_linear_attention

__all__ = ["chunk_linear_attention", "naive_recurrent_linear_attention"]
