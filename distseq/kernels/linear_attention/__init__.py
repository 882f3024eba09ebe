"""Causal linear attention with no decay, fixed per-head decay or a data-dependent gate, and state resets.

``naive.py`` is the token-by-token reference; ``chunk.py`` the chunked PyTorch path used everywhere.
"""

from distseq.kernels.linear_attention._gates import check_inputs as check_linear_attention_inputs
from distseq.kernels.linear_attention._gates import checking_values, resolve_gates, value_checks
from distseq.kernels.linear_attention.chunk import chunk_linear_attention, linear_attention_state
from distseq.kernels.linear_attention.naive import naive_recurrent_linear_attention

__all__ = [
    "check_linear_attention_inputs",
    "checking_values",
    "chunk_linear_attention",
    "linear_attention_state",
    "naive_recurrent_linear_attention",
    "resolve_gates",
    "value_checks",
]
