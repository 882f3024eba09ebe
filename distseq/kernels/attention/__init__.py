"""Block softmax attention returning ``(out, lse)``, and masks from positions and document ids."""

from distseq.kernels._dtypes import accumulation_dtype
from distseq.kernels.attention.mask import BlockKind, block_mask, classify_block
from distseq.kernels.attention.naive import attention_delta, block_attention, block_attention_backward

__all__ = [
    "BlockKind",
    "accumulation_dtype",
    "attention_delta",
    "block_attention",
    "block_attention_backward",
    "block_mask",
    "classify_block",
]
