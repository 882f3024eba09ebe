"""The local parts shared by the linear-attention SP strategies (LASP-2 and the serial LASP-1 baseline).

A rank holds one chunk of the sequence (contiguous layout) or two (zigzag), ``K`` chunks in all. Every
chunk ``c`` contributes ``M_c`` (the state its tokens add) and ``A_c`` (the log-decay it applies to the state
before it); the strategies differ only in how the incoming states ``S_c = sum_{j<c} exp(A_{j+1} + ... +
A_{c-1}) M_j`` reach the chunks' owners. Documents are -inf gates at their first token, so a chunk holding a
document start has ``A_c = -inf`` and every state before it is dropped, exactly.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from distseq.kernels.linear_attention import (
    check_linear_attention_inputs,
    chunk_linear_attention,
    linear_attention_state,
    resolve_gates,
)
from distseq.kernels.linear_attention.backends import linear_attention_backend
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import Chunk, SequenceLayout
from distseq.parallel.sequence.base import SequenceStrategy, check_qkv_length

__all__ = ["LinearCall", "LinearStateStrategy", "chunk_outputs", "chunk_states", "prepare", "scan_states"]


@dataclass(frozen=True)
class LinearCall:
    """One linear-attention call on this rank: its chunks and the combined per-token log-gate."""

    chunks: list[Chunk]
    log_gate: torch.Tensor | None  # [B, n, H] (decay + gate, -inf at document starts), or None: no decay


def prepare(
    layout: SequenceLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: torch.Tensor | None,
    gate: torch.Tensor | None,
    cu_seqlens: torch.Tensor | Sequence[int] | None,
) -> LinearCall:
    """Validate (before any collective) and fold decay, gate and document starts into one log-gate."""
    check_linear_attention_inputs(q, k, v, decay, gate, None, None)
    check_qkv_length(q, layout)
    layout = layout.with_documents(cu_seqlens)
    starts = layout.document_starts(q.device)
    if decay is None and gate is None and starts is None:
        return LinearCall(layout.local_chunks(), None)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    finite, reset = resolve_gates(q, decay, gate, None, dtype)
    if starts is not None:
        reset = reset | starts[None, :, None]
    return LinearCall(layout.local_chunks(), finite.masked_fill(reset, float("-inf")))


def _gate_of(call: LinearCall, chunk: Chunk) -> torch.Tensor | None:
    return None if call.log_gate is None else call.log_gate[:, chunk.local_slice]


def chunk_states(call: LinearCall, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``M`` ``[nc, B, H, K, V]`` and ``A`` ``[nc, B, H]`` of this rank's chunks, in local order."""
    states, carries = zip(
        *(
            linear_attention_state(k[:, c.local_slice], v[:, c.local_slice], gate=_gate_of(call, c))
            for c in call.chunks
        ),
        strict=True,
    )
    return torch.stack(states), torch.stack(carries)


def scan_states(states: torch.Tensor, carries: torch.Tensor) -> torch.Tensor:
    """Incoming states ``S_c`` ``[K, B, H, K, V]`` of chunks in global order: ``S_0 = 0``,
    ``S_{c+1} = exp(A_c) S_c + M_c``. ``exp(-inf) = 0`` drops everything before a document start."""
    incoming = [torch.zeros_like(states[0])]
    for state, carry in zip(states.unbind(0)[:-1], carries.unbind(0)[:-1], strict=True):
        incoming.append(torch.exp(carry)[..., None, None] * incoming[-1] + state)
    return torch.stack(incoming)


def chunk_outputs(
    call: LinearCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    incoming: torch.Tensor,
    chunk_size: int,
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = chunk_linear_attention,
) -> torch.Tensor:
    """``o`` ``[B, n, H, V]``: each local chunk attends causally within itself, starting from its incoming state."""
    outputs = [
        kernel(
            q[:, c.local_slice],
            k[:, c.local_slice],
            v[:, c.local_slice],
            gate=_gate_of(call, c),
            initial_state=incoming[i],
            chunk_size=chunk_size,
        )[0]
        for i, c in enumerate(call.chunks)
    ]
    return torch.cat(outputs, dim=1)


class LinearStateStrategy(SequenceStrategy, abc.ABC):
    """Linear attention as chunk states -> an exchange of states -> local outputs (LASP-2, LASP-1).

    Subclasses give ``_exchange(states, carries)``: the incoming states ``[nc, B, H, K, V]`` of the local
    chunks from their ``M`` ``[nc, B, H, K, V]`` and ``A`` ``[nc, B, H]``, differentiable.
    """

    def __init__(self, comm: Communicator, layout: SequenceLayout, *, chunk_size: int = 64, backend: str = "torch"):
        super().__init__(comm, layout)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.kernel = linear_attention_backend(backend)  # the local intra-chunk kernel

    @abc.abstractmethod
    def _exchange(self, states: torch.Tensor, carries: torch.Tensor) -> torch.Tensor:
        """Each subclass is one exchange schedule."""

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
        gate ``[B, n, H]`` (log, -inf resets), cu_seqlens global document offsets. Returns ``[B, n, H, V]``.
        Input errors raise ValueError before any collective.
        """
        call = prepare(self.layout, q, k, v, decay, gate, cu_seqlens)
        states, carries = chunk_states(call, k, v)
        return chunk_outputs(call, q, k, v, self._exchange(states, carries), self.chunk_size, self.kernel)
