"""The local parts shared by the linear-attention SP strategies (LASP-2 and the serial LASP-1 baseline).

A rank holds one chunk of the sequence (contiguous layout) or two (zigzag), ``K`` chunks in all. Every
chunk ``c`` contributes ``M_c`` (the state its tokens add) and ``A_c`` (the log-decay it applies to the state
before it); the strategies differ only in how the incoming states ``S_c = sum_{j<c} exp(A_{j+1} + ... +
A_{c-1}) M_j`` reach the chunks' owners. Documents are -inf gates at their first token, so a chunk holding a
document start has ``A_c = -inf`` and every state before it is dropped, exactly.

A chunk's output is an intra term (its causal attention from a zero state), which needs nothing from other
ranks, plus an inter term ``exp(G_t) q_t^T S_c`` (``G_t``: the log-gate summed from the chunk's start to
``t``), which needs ``S_c``. Everything local runs in the accumulation dtype (fp32; fp64 for fp64 inputs)
with autocast off, and reads no device value back to the host.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch

from distseq.kernels.delta_rule import check_delta_rule_inputs, delta_rule_backend
from distseq.kernels.linear_attention._gates import (
    accumulation_dtype,
    check_inputs,
    checking_values,
    split_log_gate,
)
from distseq.kernels.linear_attention.backends import linear_attention_backend
from distseq.kernels.linear_attention.chunk import (
    block_state,
    chunk_linear_attention,
    intra_outputs,
    prefix_states,
    state_outputs,
)
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.base import SequenceStrategy, check_qkv_length

__all__ = [
    "LinearStateStrategy",
    "LocalChunks",
    "global_order",
    "prepare",
    "scan_states",
    "scan_states_backward",
    "without_autocast",
]


def prepare(
    layout: SequenceLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None,
    gate: torch.Tensor | None,
    cu_seqlens: torch.Tensor | Sequence[int] | None,
) -> torch.Tensor | None:
    """Validate (before any collective) and fold decay, gate and document starts into one log-gate.

    Returns ``[B, n, H]`` in the accumulation dtype, ``-inf`` at document starts, or None (no decay). Shapes
    are checked always, values (``decay``, ``gate`` <= 0) only under ``value_checks()``: reading them is a
    host synchronisation.
    """
    check_inputs(q, k, v, decay, gate, None, None, values=checking_values())
    check_qkv_length(q, layout)
    layout = layout.with_documents(cu_seqlens)
    layout.require_uniform_chunks("LASP linear attention")
    starts = layout.document_starts(q.device)
    if decay is None and gate is None and starts is None:
        return None
    log_gate = q.new_zeros(q.shape[:3], dtype=accumulation_dtype(q.dtype))
    if decay is not None:
        log_gate = log_gate + decay.to(log_gate.dtype)
    if gate is not None:
        log_gate = log_gate + gate.to(log_gate.dtype)
    if starts is not None:
        log_gate = log_gate.masked_fill(starts[None, :, None], float("-inf"))
    return log_gate


class LocalChunks:
    """This rank's ``nc`` chunks of one call, folded into the batch (``[B, nc L, H, D]`` -> ``[B nc, L, H, D]``),
    and the three local pieces of linear attention over them; differentiable.

    With the ``torch`` kernel each chunk's state ``M_c`` comes out of the same pass as the states before
    each of the kernel's chunks (:func:`prefix_states`), which the intra term then reuses: every state is
    computed once. Another kernel backend computes ``M_c`` first in one product (:func:`block_state`) and
    runs the intra term itself, from a zero state.
    """

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        log_gate: torch.Tensor | None,
        num_chunks: int,
        chunk_size: int,
        kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    ):
        self.batch, self.num_chunks = q.shape[0], num_chunks
        self.q, self.k, self.v = (self._fold(x) for x in (q, k, v))  # [B nc, L, H, K|V]
        self.log_gate = None if log_gate is None else self._fold(log_gate)  # [B nc, L, H]
        if self.log_gate is None:
            self.g = self.q.new_zeros(self.q.shape[:3])
            self.reset = torch.zeros(self.q.shape[:3], dtype=torch.bool, device=q.device)
        else:
            self.g, self.reset = split_log_gate(self.log_gate)
        self.chunk_size = chunk_size
        self.kernel = kernel
        self.fused = kernel is chunk_linear_attention

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0] * self.num_chunks, x.shape[1] // self.num_chunks, *x.shape[2:])

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch, self.num_chunks * x.shape[1], *x.shape[2:])

    def states(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``M`` ``[nc, B, H, K, V]`` and ``A`` ``[nc, B, H]`` of the local chunks, in local order, and what the
        intra term reuses (the ``torch`` kernel's states before each of its chunks; None for other kernels)."""
        if self.fused:
            prefix, state, log_decay = prefix_states(self.k, self.v, self.g, self.reset, chunk_size=self.chunk_size)
        else:
            prefix, (state, log_decay) = None, block_state(self.k, self.v, self.g, self.reset)
        by_chunk = lambda x: x.unflatten(0, (self.batch, self.num_chunks)).movedim(1, 0)  # noqa: E731
        return by_chunk(state), by_chunk(log_decay), prefix

    def intra(self, prefix: torch.Tensor | None) -> torch.Tensor:
        """``[B, n, H, V]``: each chunk's causal attention within itself, from a zero state."""
        if self.fused:
            out = intra_outputs(self.q, self.k, self.v, self.g, self.reset, prefix, chunk_size=self.chunk_size)
        else:
            out = self.kernel(self.q, self.k, self.v, gate=self.log_gate, chunk_size=self.chunk_size)[0]
        return self._unfold(out)

    def inter(self, incoming: torch.Tensor) -> torch.Tensor:
        """``[B, n, H, V]``: what the incoming states ``[nc, B, H, K, V]`` add, ``exp(G_t) q_t^T S_c``."""
        return self._unfold(state_outputs(self.q, self.g, self.reset, incoming.movedim(0, 1).flatten(0, 1)))


def global_order(layout: SequenceLayout, gathered: torch.Tensor) -> torch.Tensor:
    """Rows of an all-gather over the SP group (rank by rank, each in local chunk order) in global chunk order."""
    rows = gathered.unbind(0)
    position = {c: i for i, c in enumerate(c for r in range(layout.sp_size) for c in layout.chunk_indices_of(r))}
    return torch.stack([rows[position[c]] for c in range(layout.num_chunks)])


def scan_states(states: torch.Tensor, carries: torch.Tensor) -> torch.Tensor:
    """Incoming states ``S_c`` ``[K, B, H, K, V]`` of chunks in global order: ``S_0 = 0``,
    ``S_{c+1} = exp(A_c) S_c + M_c``. ``exp(-inf) = 0`` drops everything before a document start."""
    incoming = [torch.zeros_like(states[0])]
    for state, carry in zip(states.unbind(0)[:-1], carries.unbind(0)[:-1], strict=True):
        incoming.append(torch.exp(carry)[..., None, None] * incoming[-1] + state)
    return torch.stack(incoming)


def scan_states_backward(
    incoming: torch.Tensor, carries: torch.Tensor, d_incoming: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dM``, ``dA`` (global order) of :func:`scan_states` from its output's gradient ``dS``.

    With ``g_c`` the whole gradient of ``S_c``, ``g_c = dS_c + exp(A_c) g_{c+1}``, ``dM_c = g_{c+1}`` and
    ``dA_c = exp(A_c) <S_c, g_{c+1}>``; the last chunk's ``M`` and ``A`` reach no state.
    """
    grad = d_incoming[-1]
    d_states, d_carries = [torch.zeros_like(grad)], [torch.zeros_like(carries[-1])]
    for c in reversed(range(len(incoming) - 1)):
        decay = torch.exp(carries[c])
        d_states.append(grad)
        d_carries.append(decay * (incoming[c] * grad).sum((-1, -2)))
        grad = d_incoming[c] + decay[..., None, None] * grad
    return torch.stack(d_states[::-1]), torch.stack(d_carries[::-1])


class _WithoutAutocast(torch.autograd.Function):
    """``fn(*inputs)`` on detached copies of the inputs, differentiated with autocast off."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        leaves = [x.detach().requires_grad_(needs) for x, needs in zip(inputs, ctx.needs_input_grad[1:], strict=True)]
        with torch.enable_grad():
            out = fn(*leaves)
        ctx.graph = (out, leaves)
        return out.detach()

    @staticmethod
    def backward(ctx, d_out):
        if ctx.graph is None:
            raise RuntimeError("this linear attention frees its graph in backward: run backward through it once")
        (out, leaves), ctx.graph = ctx.graph, None
        wanted = [x for x in leaves if x.requires_grad]
        with torch.autocast(d_out.device.type, enabled=False):
            grads = iter(torch.autograd.grad(out, wanted, d_out, allow_unused=True, materialize_grads=True))
        return None, *(next(grads) if x.requires_grad else None for x in leaves)


def without_autocast(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor | None) -> torch.Tensor:
    """``fn(*inputs)``, whose backward runs with autocast off.

    The autograd engine runs a backward under the autocast of the ``backward()`` call, so a plain graph's
    products drop to bf16 when it is called inside ``torch.autocast``; this keeps them in the inputs' dtype.
    """
    present = [x for x in inputs if x is not None]
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in present)):
        return fn(*inputs)
    slots = [x is not None for x in inputs]

    def rebuild(*leaves):
        it = iter(leaves)
        return fn(*(next(it) if slot else None for slot in slots))

    return _WithoutAutocast.apply(rebuild, *present)


class LinearStateStrategy(SequenceStrategy, abc.ABC):
    """Linear attention as chunk states -> an exchange of states -> local outputs (LASP-2, LASP-1).

    Subclasses give ``_attend(q, k, v, log_gate)``: the output ``[B, n, H, V]`` from validated inputs in the
    accumulation dtype, with autocast off.
    """

    def __init__(self, comm: Communicator, layout: SequenceLayout, *, chunk_size: int = 64, backend: str = "torch"):
        super().__init__(comm, layout)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.backend = backend  # its name: the delta rule picks its own local step from it
        self.kernel = linear_attention_backend(backend)  # the local intra-chunk kernel

    @abc.abstractmethod
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor | None) -> torch.Tensor:
        """Each subclass is one exchange schedule."""

    #: how the delta rule's chunk summaries travel: ``allgather`` (LASP-2), ``scan`` (All-Scan); None: no delta rule
    delta_exchange: str | None = None
    #: rows (linear attention) or columns (delta rule) of a state per piece of a scan; None: whole states
    block: int | None = None

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
        """The gated delta rule over the whole sharded sequence (``distseq.kernels.delta_rule``):
        ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t`` (q not scaled).

        q, k ``[B, n, H, K]``, v ``[B, n, H, V]``, beta and gate (log, -inf resets) ``[B, n, H]``, this rank's
        tokens in layout order; cu_seqlens global document offsets. Each chunk is summarised as an affine map of
        the state entering it and the summaries travel as ``delta_exchange`` says (``distseq.parallel.sequence.
        delta``). Returns ``[B, n, H, V]`` in q's dtype, computed in fp32 (fp64 for fp64) under any autocast;
        input errors raise ValueError before any collective.
        """
        if self.delta_exchange is None:
            return super().delta_rule(q, k, v, beta, gate=gate, cu_seqlens=cu_seqlens)  # TypeError naming it
        from distseq.parallel.sequence.delta import delta_rule_exchange  # it builds on this module

        check_delta_rule_inputs(q, k, v, beta, gate, None, None, values=False)
        dtype = accumulation_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            log_gate = prepare(self.layout, q, k, v, None, gate, cu_seqlens)
            cast = (x.to(dtype) for x in (q, k, v, beta))
            layout, backend = self.layout.with_documents(cu_seqlens), delta_rule_backend(self.backend, q.device)
            out = delta_rule_exchange(
                self.comm,
                layout,
                *cast,
                log_gate,
                chunk_size=self.chunk_size,
                backend=backend,
                exchange=self.delta_exchange,
                block=self.block,
            )
        return out.to(q.dtype)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor | None) -> LocalChunks:
        return LocalChunks(q, k, v, log_gate, len(self.layout.chunks()), self.chunk_size, self.kernel)

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
        """Causal linear attention over the whole sharded sequence (see ``distseq.kernels.linear_attention``).

        q, k: ``[B, n, H, K]``, v: ``[B, n, H, V]``, this rank's tokens in layout order; decay ``[H]`` (log),
        gate ``[B, n, H]`` (log, -inf resets), cu_seqlens global document offsets. Returns ``[B, n, H, V]`` in
        q's dtype; states and sums are fp32 (fp64 for fp64 inputs) under any autocast. Input errors raise
        ValueError before any collective.
        """
        dtype = accumulation_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            log_gate = prepare(self.layout, q, k, v, decay, gate, cu_seqlens)
            out = self._attend(q.to(dtype), k.to(dtype), v.to(dtype), log_gate)
        return out.to(q.dtype)
