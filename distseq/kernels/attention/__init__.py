"""Block softmax attention returning ``(out, lse)``, and masks from positions and document ids."""

from distseq.kernels.attention.mask import BlockKind, block_mask, classify_block
from distseq.kernels.attention.naive import attention_delta, block_attention, block_attention_backward

__all__ = [
    "BlockKind",
    "attention_delta",
    "block_attention",
    "block_attention_backward",
    "block_mask",
    "classify_block",
]
