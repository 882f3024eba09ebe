"""``DistseqCoreAttention``: Megatron-Core's core attention run by a distseq softmax strategy over the CP group.

Megatron builds the module from a layer spec's ``core_attention`` entry and calls it with the local tokens of
its context-parallel split, RoPE already applied:

* ``bshd`` batches: query ``[s_local, b, heads, head_dim]``, key/value ``[s_local, b, groups, head_dim]``.
  Megatron gives CP rank ``r`` the chunks ``r`` and ``2cp-1-r`` of ``2cp`` (``get_batch_on_this_cp_rank``):
  distseq's ``zigzag`` layout.
* packed ``thd`` batches (``packed_seq_params.qkv_format == "thd"``): ``[t_local, heads, head_dim]``, every
  document cut into ``2cp`` chunks of which rank ``r`` holds ``r`` and ``2cp-1-r``
  (``get_thd_batch_on_this_cp_rank``): distseq's ``document_zigzag`` layout over the padded offsets.

It returns ``[s_local, b, heads * head_dim]`` (``[t_local, heads * head_dim]`` for thd), as Megatron's own
modules do. The mask comes from ``attn_mask_type`` (``causal`` or ``no_mask``), as in Transformer Engine's
attention: the ``attention_mask`` tensor is not read (with CP it only holds this rank's query rows).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

from distseq.integrations.megatron._groups import cp_and_tp_groups
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import SOFTMAX_STRATEGIES, make_strategy

__all__ = ["CP_COMM_TYPES", "DistseqCoreAttention"]

#: Megatron's ``cp_comm_type`` -> the distseq strategy that does the same exchange
CP_COMM_TYPES = {"p2p": "ring", "a2a": "ulysses", "all_gather": "allgather_kv", "a2a+p2p": "usp"}


def _mask_kind(attn_mask_type: Any) -> bool:
    """``attn_mask_type`` -> causal?; ValueError for the mask types that need a mask tensor."""
    name = getattr(attn_mask_type, "name", str(attn_mask_type))
    if name in ("causal", "no_mask"):
        return name == "causal"
    raise ValueError(
        f"DistseqCoreAttention supports attn_mask_type causal and no_mask, got {name}: padding and arbitrary "
        f"masks are not implemented (for packed documents pass packed_seq_params in the thd format)"
    )


class DistseqCoreAttention(nn.Module):
    """A Megatron-Core core-attention module (``submodules.core_attention`` of a self-attention spec).

    Use ``ModuleSpec(module=DistseqCoreAttention, params={"strategy": "ring"})``; ``strategy`` is any distseq
    softmax strategy (``ring``, ``ulysses``, ``allgather_kv``, ``token_ring``, ``usp``) or None to map the
    layer's ``cp_comm_type`` (p2p -> ring, a2a -> ulysses, all_gather -> allgather_kv, a2a+p2p -> usp; ring when
    unset). ``strategy_options`` go to the strategy (``{"ulysses_degree": 2}`` for usp; its default is the first
    of ``config.hierarchical_context_parallel_sizes``, else the largest degree dividing cp and the KV heads),
    ``attention_backend`` picks the local kernel (``auto``, ``sdpa``, ``flash_attn``, ``reference``).

    The other arguments are the ones Megatron passes when it builds core attention. Every check that can fail
    runs here or before the first collective of a call.
    """

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        *,
        strategy: str | None = None,
        strategy_options: dict[str, Any] | None = None,
        attention_backend: str = "auto",
    ):
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        _mask_kind(attn_mask_type)
        if attention_type != "self":
            raise ValueError(f"DistseqCoreAttention runs self-attention only, got attention_type={attention_type!r}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"DistseqCoreAttention has no attention dropout: set TransformerConfig.attention_dropout=0.0 "
                f"(got {dropout}; Megatron's default is 0.1)"
            )
        if strategy is None:
            strategy = CP_COMM_TYPES.get(cp_comm_type or "p2p")
            if strategy is None:
                raise ValueError(f"unknown cp_comm_type {cp_comm_type!r}; choose one of {sorted(CP_COMM_TYPES)}")
        if strategy not in SOFTMAX_STRATEGIES:
            raise ValueError(
                f"DistseqCoreAttention needs a softmax strategy, one of {SOFTMAX_STRATEGIES}; got {strategy!r}"
            )

        heads = config.num_attention_heads
        self.head_dim = config.kv_channels or config.hidden_size // heads
        self.softmax_scale = self.head_dim**-0.5 if softmax_scale is None else softmax_scale
        cp_group, tp_group = cp_and_tp_groups(pg_collection)
        self.comm = Communicator(cp_group, name="cp")
        groups = config.num_query_groups or heads
        options = dict(strategy_options or {})
        if strategy == "usp" and "ulysses_degree" not in options:
            sizes = getattr(config, "hierarchical_context_parallel_sizes", None)
            local_groups = max(groups // tp_group.size(), 1)
            options["ulysses_degree"] = sizes[0] if sizes else math.gcd(self.comm.size, local_groups)
        # Built now, on every CP rank (usp makes its sub-groups here, a collective); each call rebinds it to the
        # call's layout without communication.
        self.strategy = make_strategy(
            strategy,
            self.comm,
            SequenceLayout("zigzag", 2 * self.comm.size, self.comm.size, self.comm.rank),
            attention_backend=attention_backend,
            **options,
        )

    def extra_repr(self) -> str:
        return f"strategy={self.strategy.name}, cp={self.comm.size}, layer={self.layer_number}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("DistseqCoreAttention does not support attention_bias")
        causal = _mask_kind(self.attn_mask_type if attn_mask_type is None else attn_mask_type)
        p = self.comm.size
        if packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", "thd") == "thd":
            offsets = _cached_packed_offsets(packed_seq_params, causal)
            layout = SequenceLayout("document_zigzag", query.shape[0] * p, p, self.comm.rank)
            q, k, v = (x.unsqueeze(0) for x in (query, key, value))  # [1, t_local, heads, head_dim]
            out = self.strategy.with_layout(layout).attention(
                q, k, v, causal=causal, softmax_scale=self.softmax_scale, cu_seqlens=offsets
            )
            return out[0].reshape(out.shape[1], -1)
        layout = SequenceLayout("zigzag", query.shape[0] * p, p, self.comm.rank)
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [b, s_local, heads, head_dim]
        out = self.strategy.with_layout(layout).attention(q, k, v, causal=causal, softmax_scale=self.softmax_scale)
        return out.transpose(0, 1).reshape(out.shape[1], out.shape[0], -1)


#: the last batch's packed offsets: Megatron hands every layer the same ``PackedSeqParams``, so the offsets are
#: read back from the device once per batch rather than once per layer. The key holds the offset tensors themselves
#: (weakly) with their version counters, so a new batch or an in-place change is never served stale offsets.
_last_packed: list = [None, None]  # key, offsets


def _packed_key(params: Any, causal: bool) -> tuple:
    fields = ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded")
    tensors = [getattr(params, f) for f in fields]
    refs = tuple(weakref.ref(t) if isinstance(t, torch.Tensor) else t for t in tensors)
    versions = tuple(t._version if isinstance(t, torch.Tensor) else None for t in tensors)
    return refs, versions, causal


def _same_key(a: tuple, b: tuple) -> bool:
    (refs_a, versions_a, causal_a), (refs_b, versions_b, causal_b) = a, b
    same = all(
        (x() is y()) if isinstance(x, weakref.ref) and isinstance(y, weakref.ref) else x == y
        for x, y in zip(refs_a, refs_b, strict=True)
    )
    return same and versions_a == versions_b and causal_a == causal_b


def _cached_packed_offsets(params: Any, causal: bool) -> list[int]:
    key = _packed_key(params, causal)
    if _last_packed[0] is not None and _same_key(_last_packed[0], key):
        return _last_packed[1]
    offsets = _packed_offsets(params, causal)
    _last_packed[:] = [key, offsets]
    return offsets


def _packed_offsets(params: Any, causal: bool) -> list[int]:
    """Global document offsets of a packed batch as Python ints: the padded ones (Megatron cuts the padded
    documents into CP chunks). Each document's padding follows its tokens, so under a causal mask no real token
    sees padding; without one it would, and that is refused."""
    padded = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    offsets = padded.tolist() if isinstance(padded, torch.Tensor) else list(padded)
    if params.cu_seqlens_q_padded is not None and not causal:
        real = params.cu_seqlens_q.tolist() if isinstance(params.cu_seqlens_q, torch.Tensor) else params.cu_seqlens_q
        if list(real) != offsets:
            raise ValueError(
                f"no_mask attention over padded packed documents would attend the padding: cu_seqlens_q={list(real)}"
                f" differs from cu_seqlens_q_padded={offsets}"
            )
    kv = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
    if kv is not None and (kv.tolist() if isinstance(kv, torch.Tensor) else list(kv)) != offsets:
        raise ValueError(f"self-attention needs the same query and key documents, got {offsets} and {list(kv)}")
    return offsets
