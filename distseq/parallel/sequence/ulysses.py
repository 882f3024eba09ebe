"""Ulysses (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards, full-sequence attention on
``heads / P`` heads, all-to-all back.

On NCCL q, k and v travel in ONE all-to-all (packed into one buffer, one copy each); the output comes back in
one, and in the backward dout goes in one and dq, dk, dv come back in one. On gloo each tensor is its own
all-to-all, all in flight at once (``Communicator.packs_messages``: there packing is the slower choice). The
bytes are the same either way.

When the KV heads do not divide by ``P`` (GQA with few KV heads) each KV head is replicated by the smallest
factor that makes them divide, and autograd sums the copies' gradients. Query heads must divide by ``P``.

Communication per rank (``n`` local tokens, ``d = heads * head_dim``, ``dkv`` the KV width after
replication, ``s`` bytes per element): forward ``(P-1)/P n (2d + 2dkv) s`` (q, k, v there, out back);
backward the same (dout there; dq, dk, dv back).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from distseq.kernels.attention import BlockKind, accumulation_dtype
from distseq.kernels.delta_rule import check_delta_rule_inputs
from distseq.kernels.linear_attention import check_linear_attention_inputs, checking_values
from distseq.kernels.linear_attention.backends import linear_attention_backend
from distseq.parallel import functional as F
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._blocks import (
    AttentionSpec,
    Plan,
    attend,
    attend_backward,
    block_plan,
    new_accumulators,
    single_block,
)
from distseq.parallel.sequence.base import SequenceStrategy, autocast_off, check_qkv_length, replicate_kv_heads
from distseq.parallel.sequence.lasp2 import LASP2

__all__ = ["HeadsToSeq", "SeqToHeads", "UlyssesAttention", "check_head_sharding", "heads_to_seq", "seq_to_heads"]


def seq_to_heads(comm: Communicator, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sequence shards ``[B, n, H_i, D]`` -> head shards ``[B, n * P, H_i / P, D]`` (ranks' tokens in rank
    order). When ``comm.packs_messages`` every tensor travels in one all-to-all, packed into one buffer;
    otherwise each in its own, all in flight before the first is awaited (each copy is made while the previous
    tensor moves). One copy per tensor either way; the results are views of what was received (copies for
    B > 1)."""
    p = comm.size
    batch, tokens, _, dim = tensors[0].shape
    heads = [x.shape[2] // p for x in tensors]
    # [P, B, n, H_i / P, D] each: part j holds the tensor's j-th head slice
    parts = [x.reshape(batch, tokens, p, h, dim).permute(2, 0, 1, 3, 4) for x, h in zip(tensors, heads, strict=True)]
    packed = comm.packs_messages and len(parts) > 1
    if packed:
        received = [comm.all_to_all_stacked(torch.cat(parts, dim=3))]
    else:
        handles = [comm.all_to_all_stacked(part.contiguous(), async_op=True) for part in parts]
        received = [handle.wait() for handle in handles]
    full = [recv.permute(1, 0, 2, 3, 4).reshape(batch, p * tokens, recv.shape[3], dim) for recv in received]
    return list(full[0].split(heads, dim=2)) if packed else full


def heads_to_seq(
    comm: Communicator, tensors: list[torch.Tensor], dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Inverse of :func:`seq_to_heads`: head shards ``[B, n * P, H_i / P, D]`` -> ``[B, n, H_i, D]`` in
    ``dtype`` (default: each tensor's own; all must then share one), packed into one all-to-all or one each as
    ``comm.packs_messages`` says. A tensor sent alone that is token-major with B = 1 (what the fused kernels
    return) is sent as it is; anything else costs one (casting) copy.

    Empties ``tensors`` as it sends them, so that a tensor nobody else holds (a gradient) is freed before the
    exchange rather than after it: the peak holds the packed buffer, not the packed buffer and its sources."""
    p = comm.size
    batch, total, _, dim = tensors[0].shape
    tokens = total // p
    heads = [x.shape[2] for x in tensors]
    dtype = dtype or tensors[0].dtype
    if comm.packs_messages and len(tensors) > 1:
        send = torch.empty(p, batch, tokens, sum(heads), dim, dtype=dtype, device=tensors[0].device)
        offset = 0
        for h in heads:  # one (casting) copy per tensor
            x = tensors.pop(0)
            send[:, :, :, offset : offset + h].copy_(x.reshape(batch, p, tokens, h, dim).transpose(0, 1))
            offset += h
        del x
        recv = comm.all_to_all_stacked(send)
        del send
        parts = recv.permute(1, 2, 0, 3, 4).split(heads, dim=3)  # [B, n, P, H_i, D] each
    else:
        handles = []
        for h in heads:
            part = tensors.pop(0).reshape(batch, p, tokens, h, dim).transpose(0, 1)
            send = part.to(dtype, memory_format=torch.contiguous_format)  # a view when it already is
            handles.append(comm.all_to_all_stacked(send, async_op=True))
        del part, send
        # taken one at a time below, so each received buffer is freed once copied out
        parts = (handles.pop(0).wait().permute(1, 2, 0, 3, 4) for _ in heads)
    return [part.reshape(batch, tokens, p * h, dim) for part, h in zip(parts, heads, strict=True)]


def check_head_sharding(name: str, heads: int, degree: int, axis: str) -> None:
    if heads % degree:
        raise ValueError(
            f"{name} needs heads divisible by {axis}: heads={heads}, {axis}={degree}; "
            f"use strategy='ring' or 'usp' (with a ulysses_degree dividing {heads})"
        )


def _gathered_order(layout: SequenceLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(to sequence order, back to gathered order): index tensors on ``device`` for the tokens of every rank
    concatenated in rank order (what the all-to-all gathers), built once per layout and device."""
    return _gathered_order_cached(layout.kind.value, layout.seq_len, layout.sp_size, layout.doc_offsets, str(device))


@functools.lru_cache(maxsize=64)
def _gathered_order_cached(kind, seq_len, sp_size, doc_offsets, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    layout = SequenceLayout(kind, seq_len, sp_size, 0, doc_offsets)  # documents place document_zigzag's chunks
    order = layout.global_order()  # global position of each gathered token
    return torch.argsort(order).to(device), order.to(device)


def _in_sequence_order(spec: AttentionSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a layout whose gathered tokens are out of sequence order (zigzag) and no documents: the index tensors
    that put them in order, so the whole sequence is one kernel call instead of ``2P x 2P`` span pairs (the
    contiguous layout is in order already; documents keep the span plan, which cuts at their boundaries, and so
    does a backend with a span limit)."""
    layout = spec.layout
    if layout.sp_size == 1 or layout.kind.value == "contiguous" or spec.doc_offsets is not None:
        return None
    if spec.max_span is not None and layout.seq_len > spec.max_span:  # a kernel that tiles (the reference)
        return None
    return _gathered_order(layout, device)


def ulysses_forward(spec, qh, kh, vh, plan):
    """Full-sequence attention on head shards (all ranks' tokens in gathered order): returns (out, lse, q, k, v,
    reorder), in sequence order when ``reorder`` (the index tensors of :func:`_in_sequence_order`) is not None,
    else in gathered order; ``out`` is fp32 unless the whole sequence was one kernel call (then the kernel's own
    output)."""
    whole = single_block(plan, qh.shape[1], kh.shape[1])
    if whole is not None:  # the contiguous layout without documents: one causal call, nothing to merge
        return *spec.backend.forward(qh, kh, vh, whole[2], spec.scale), qh, kh, vh, None
    reorder = _in_sequence_order(spec, qh.device)
    if reorder is not None:  # one copy per tensor buys one kernel call over the whole sequence
        qh, kh, vh = (x.index_select(1, reorder[0]) for x in (qh, kh, vh))
        kind = BlockKind.CAUSAL if spec.causal else BlockKind.FULL
        return *spec.backend.forward(qh, kh, vh, kind, spec.scale), qh, kh, vh, reorder
    out, lse = new_accumulators(qh)
    attend(spec, qh, kh, vh, plan, out, lse, fresh=True)
    return out, lse, qh, kh, vh, None


def ulysses_backward(spec, dout_h, qh, kh, vh, out, lse, plan, reorder):
    """(dq, dk, dv) in head-shard layout, gathered order (``dout_h`` in gathered order)."""
    whole = single_block(plan, qh.shape[1], kh.shape[1])
    if whole is not None:
        return spec.backend.backward(dout_h, qh, kh, vh, out, lse, whole[2], spec.scale)
    if reorder is not None:
        kind = BlockKind.CAUSAL if spec.causal else BlockKind.FULL
        dout_h = dout_h.index_select(1, reorder[0])
        grads = spec.backend.backward(dout_h, qh, kh, vh, out, lse, kind, spec.scale)
        return [g.index_select(1, reorder[1]) for g in grads]
    dtype = accumulation_dtype(qh.dtype)
    dq = torch.zeros(qh.shape, dtype=dtype, device=qh.device)
    dk, dv = torch.zeros(kh.shape, dtype=dtype, device=kh.device), torch.zeros(vh.shape, dtype=dtype, device=vh.device)
    attend_backward(spec, dout_h, qh, kh, vh, out, lse, None, plan, dq, dk, dv)
    return dq, dk, dv


# The exchanges and the attention between them are separate autograd Functions, as in DeepSpeed-Ulysses: autograd
# frees the attention's saved tensors (q, k, v, out on the rank's heads) as soon as its backward has run, before
# dq, dk, dv are exchanged, so the backward's peak holds one or the other, not both.


class SeqToHeads(torch.autograd.Function):
    """``SeqToHeads.apply(comm, *tensors)``: :func:`seq_to_heads` (all in one dtype); the backward sends the
    gradients back with :func:`heads_to_seq`, in that dtype."""

    @staticmethod
    @autocast_off
    def forward(ctx, comm: Communicator, *tensors: torch.Tensor):
        ctx.comm, ctx.dtype = comm, tensors[0].dtype
        return tuple(seq_to_heads(comm, *tensors))

    @staticmethod
    @autocast_off
    def backward(ctx, *grads):
        return None, *heads_to_seq(ctx.comm, list(grads), dtype=ctx.dtype)


class HeadsToSeq(torch.autograd.Function):
    """``HeadsToSeq.apply(x, comm, dtype)``: :func:`heads_to_seq` of one tensor, cast to ``dtype``; the backward
    sends the gradient to head shards with :func:`seq_to_heads`."""

    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, comm: Communicator, dtype: torch.dtype):
        ctx.comm = comm
        return heads_to_seq(comm, [x], dtype=dtype)[0]

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        return seq_to_heads(ctx.comm, dout)[0], None, None


class _HeadAttention(torch.autograd.Function):
    """Full-sequence attention on this rank's heads, gathered order in and out (fp32 or the kernel's dtype)."""

    @staticmethod
    @autocast_off
    def forward(ctx, qh, kh, vh, spec: AttentionSpec, plan: Plan):
        out, lse, qh, kh, vh, reorder = ulysses_forward(spec, qh, kh, vh, plan)
        ctx.save_for_backward(qh, kh, vh, out, lse)
        ctx.spec, ctx.plan, ctx.reorder = spec, plan, reorder
        return out if reorder is None else out.index_select(1, reorder[1])

    @staticmethod
    @autocast_off
    def backward(ctx, dout_h):
        qh, kh, vh, out, lse = ctx.saved_tensors
        return *ulysses_backward(ctx.spec, dout_h, qh, kh, vh, out, lse, ctx.plan, ctx.reorder), None, None


class UlyssesAttention(SequenceStrategy):
    """Ulysses all-to-all attention; heads must divide by the SP size."""

    name = "ulysses"

    def __init__(
        self,
        comm: Communicator,
        layout: SequenceLayout,
        *,
        chunk_size: int = 64,
        backend: str = "torch",
        attention_backend: str = "auto",
    ):
        super().__init__(comm, layout, attention_backend=attention_backend)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        linear_attention_backend(backend)  # validates the name now
        self.chunk_size = chunk_size  # for linear attention
        self.linear_backend = backend  # for linear attention

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
        check_head_sharding("ulysses", q.shape[2], self.comm.size, "sp")
        k, v = replicate_kv_heads(k, v, q.shape[2], self.comm.size)
        everyone = range(self.comm.size)
        qh, kh, vh = SeqToHeads.apply(self.comm, q, k, v)
        out = _HeadAttention.apply(qh, kh, vh, spec, block_plan(spec, everyone, everyone))
        return HeadsToSeq.apply(out, self.comm, q.dtype)

    def linear_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        decay: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Linear attention by head all-to-all: each rank runs the whole sequence, in natural order, on
        ``heads / P`` heads (the baseline LASP-2 is compared against). Differentiable through autograd.

        Bytes per rank each way: ``(P-1)/P B n (2 h dk + 2 h dv [+ h for a gate]) s``.
        """
        check_linear_attention_inputs(q, k, v, decay, gate, None, None, values=checking_values())
        to_heads, back, local = self._on_heads(q, cu_seqlens)
        heads = q.shape[2] // self.comm.size
        out = local.linear_attention(
            to_heads(q),
            to_heads(k),
            to_heads(v),
            decay=None if decay is None else decay[self.comm.rank * heads : (self.comm.rank + 1) * heads],
            gate=None if gate is None else to_heads(gate[..., None])[..., 0],
        )
        return back(out)

    def delta_rule(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        beta: torch.Tensor,
        *,
        gate: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The gated delta rule by head all-to-all (the baseline of LASP-2's ``delta_rule``, same contract): each
        rank runs the whole sequence on ``heads / P`` heads. Bytes per rank each way:
        ``(P-1)/P B n (2 h dk + 2 h dv + h [+ h for a gate]) s``."""
        check_delta_rule_inputs(q, k, v, beta, gate, None, None, values=checking_values())
        to_heads, back, local = self._on_heads(q, cu_seqlens)
        scalar = lambda x: None if x is None else to_heads(x[..., None])[..., 0]  # noqa: E731  [B, n, H] tensors
        return back(local.delta_rule(to_heads(q), to_heads(k), to_heads(v), scalar(beta), gate=scalar(gate)))

    def _on_heads(self, q: torch.Tensor, cu_seqlens) -> tuple[Callable, Callable, LASP2]:
        """The exchange of the linear baselines: ``to_heads`` (this rank's tokens of all heads -> every token of
        ``heads / P`` heads, in sequence order), ``back`` (the inverse) and LASP-2 over one rank for the whole
        sequence (it computes in fp32 under any autocast and reads nothing back from the device)."""
        check_qkv_length(q, self.layout)
        check_head_sharding("ulysses", q.shape[2], self.comm.size, "sp")
        layout = self.layout.with_documents(cu_seqlens)
        comm = self.comm
        natural, order = _gathered_order(layout, q.device)

        def to_heads(x: torch.Tensor) -> torch.Tensor:
            return F.all_to_all(x, comm, scatter_dim=2, gather_dim=1)[:, natural]

        def back(x: torch.Tensor) -> torch.Tensor:
            return F.all_to_all(x[:, order], comm, scatter_dim=1, gather_dim=2)

        whole = SequenceLayout("contiguous", layout.seq_len, 1, 0, layout.doc_offsets)
        return (
            to_heads,
            back,
            LASP2(Communicator.solo(), whole, chunk_size=self.chunk_size, backend=self.linear_backend),
        )
