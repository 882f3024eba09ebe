"""The interface every sequence-parallel strategy implements, and the input checks they share.

Every check here runs before any collective, so bad input raises a ValueError on every rank instead of
leaving some ranks waiting in a collective.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence

import torch

from distseq.kernels.attention.backends import ATTENTION_BACKENDS, AttentionBackend, attention_backend
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._blocks import AttentionSpec

__all__ = ["SequenceStrategy", "autocast_off", "check_qkv", "check_qkv_length", "replicate_kv_heads"]


def autocast_off(method: Callable) -> Callable:
    """Run an autograd Function's ``forward`` or ``backward`` with autocast disabled on the device of its
    first tensor argument (any device type), so accumulators, LSE, merges and states stay fp32 whatever
    autocast is active; the Function casts its results back to the input dtypes itself."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return method(ctx, *args)

    return wrapper


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SequenceLayout) -> None:
    """Shapes ``[batch, local_tokens, heads, head_dim]``, GQA divisibility, dtypes and the layout's length."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, local_tokens, heads, head_dim], got q={tuple(q.shape)} "
            f"k={tuple(k.shape)} v={tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k={tuple(k.shape)} v={tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch mismatch: q batch={q.shape[0]}, k/v batch={k.shape[0]}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"local token mismatch: q has {q.shape[1]} tokens, k/v have {k.shape[1]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim mismatch: q head_dim={q.shape[3]}, k/v head_dim={k.shape[3]}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads must be divisible by kv heads: heads={heads}, kv_heads={kv_heads}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating dtype, got q={q.dtype} k={k.dtype} v={v.dtype}")
    check_qkv_length(q, layout)


def check_qkv_length(q: torch.Tensor, layout: SequenceLayout) -> None:
    if q.shape[1] != layout.local_len:
        raise ValueError(
            f"q has {q.shape[1]} local tokens but the {layout.kind.value} layout gives this rank "
            f"{layout.local_len} (seq_len={layout.seq_len}, sp={layout.sp_size})"
        )


def replicate_kv_heads(k: torch.Tensor, v: torch.Tensor, heads: int, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each KV head so the KV head count divides by ``degree`` (for head-sharded attention).

    The smallest factor ``f = degree / gcd(kv_heads, degree)`` keeps the GQA grouping: query head ``h``
    still reads a copy of KV head ``h // (heads / kv_heads)``. Autograd sums the copies' gradients.
    """
    kv_heads = k.shape[2]
    factor = degree // math.gcd(kv_heads, degree)
    if factor == 1:
        return k, v
    assert heads % (kv_heads * factor) == 0, (heads, kv_heads, factor)
    return k.repeat_interleave(factor, dim=2), v.repeat_interleave(factor, dim=2)


class SequenceStrategy:
    """Base of the sequence-parallel strategies: one Communicator (the SP group) and the model's layout.

    Subclasses implement ``attention`` (softmax layers) and/or ``linear_attention`` (LASP-2).
    """

    name: str = ""
    #: Longest run of tokens handed to the kernel as one span (None: the backend's own limit, if any).
    block_size: int | None = None

    def __init__(self, comm: Communicator, layout: SequenceLayout, *, attention_backend: str = "auto"):
        if comm.size != layout.sp_size or comm.rank != layout.sp_rank:
            raise ValueError(
                f"{self.name or type(self).__name__}: the communicator (rank {comm.rank} of {comm.size}) does "
                f"not match the layout (sp_rank {layout.sp_rank} of sp {layout.sp_size})"
            )
        if attention_backend not in ("auto", *ATTENTION_BACKENDS):
            raise ValueError(
                f"unknown attention backend {attention_backend!r}; choose one of {['auto', *ATTENTION_BACKENDS]}"
            )
        self.comm = comm
        self.layout = layout
        #: the local softmax kernel asked for: "auto" (per device and dtype), "sdpa", "flash_attn", "reference"
        self.attention_backend = attention_backend

    def resolve_attention_backend(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> AttentionBackend:
        """The local kernel this strategy runs for inputs on ``device`` of ``dtype`` (ValueError when a backend
        asked for by name cannot serve them)."""
        return attention_backend(self.attention_backend, torch.device(device), dtype, head_dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(comm={self.comm!r}, layout={self.layout!r})"

    def with_layout(self, layout: SequenceLayout) -> SequenceStrategy:
        """This strategy, with its communicators and settings, for another layout of the same ranks (another
        sequence length or layout kind). No collective: sub-groups made at construction are shared."""
        if (layout.sp_size, layout.sp_rank) != (self.layout.sp_size, self.layout.sp_rank):
            raise ValueError(
                f"{self.name}: with_layout keeps the ranks (sp_rank {self.layout.sp_rank} of {self.layout.sp_size}),"
                f" got sp_rank {layout.sp_rank} of {layout.sp_size}"
            )
        other = copy.copy(self)
        other.layout = layout
        return other

    def communicators(self) -> list[Communicator]:
        """The communicators this strategy moves bytes through; their ``stats`` add up to its traffic."""
        return [self.comm]

    def bytes_sent(self) -> int:
        return sum(c.stats.bytes_sent for c in self.communicators())

    def bytes_received(self) -> int:
        return sum(c.stats.bytes_received for c in self.communicators())

    def reset_stats(self) -> None:
        for c in self.communicators():
            c.stats.reset()

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = True,
        softmax_scale: float | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Softmax attention of this rank's queries over the whole sharded sequence.

        q: ``[batch, local_tokens, heads, head_dim]``, k and v: ``[batch, local_tokens, kv_heads, head_dim]``
        in the layout's order; ``softmax_scale`` defaults to ``head_dim ** -0.5``; ``cu_seqlens`` are global
        document offsets (or come from the layout). Returns q's shape and dtype. Input errors raise
        ValueError before any collective.
        """
        if self._attention is None:
            raise TypeError(f"strategy {self.name!r} does not implement softmax attention")
        return self._attention(q, k, v, self._spec(q, k, v, causal, softmax_scale, cu_seqlens))

    #: ``_attention(q, k, v, spec)`` in subclasses that implement softmax attention (inputs validated).
    _attention = None

    def linear_attention(self, q, k, v, *, decay=None, gate=None, cu_seqlens=None) -> torch.Tensor:
        raise TypeError(f"strategy {self.name!r} does not implement linear attention; use 'lasp2'")

    def delta_rule(self, q, k, v, beta, *, gate=None, cu_seqlens=None) -> torch.Tensor:
        raise TypeError(f"strategy {self.name!r} does not implement the gated delta rule; use 'lasp2' or 'ulysses'")

    def _spec(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        softmax_scale: float | None,
        cu_seqlens: torch.Tensor | Sequence[int] | None,
    ) -> AttentionSpec:
        """Validate a softmax-attention call and resolve its scale and documents (no collective)."""
        check_qkv(q, k, v, self.layout)
        docs = self.layout.with_documents(cu_seqlens).doc_offsets
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        backend = self.resolve_attention_backend(q.device, q.dtype, q.shape[-1])
        spans = [n for n in (self.block_size, backend.max_span) if n is not None]
        return AttentionSpec(self.layout, bool(causal), scale, backend, docs, min(spans) if spans else None)
