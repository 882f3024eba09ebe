"""Choosing the local linear-attention kernel: ``torch`` (chunked PyTorch, always available), ``triton``
(distseq's Triton kernels), ``fla`` (flash-linear-attention's ``chunk_simple_gla``) or ``auto``.

Every backend has the signature and semantics of :func:`chunk_linear_attention`. The optional ones are
imported only when chosen; asking for one that is not installed is a ValueError naming the package.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from distseq.kernels.linear_attention._gates import accumulation_dtype, check_inputs, resolve_gates
from distseq.kernels.linear_attention.chunk import chunk_linear_attention

__all__ = ["BACKENDS", "fla_chunk_linear_attention", "linear_attention_backend"]

BACKENDS = ("auto", "torch", "triton", "fla")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def linear_attention_backend(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The kernel function for backend ``name``. ``auto`` is ``triton`` on a CUDA machine with triton
    installed, else ``torch``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown linear-attention backend {name!r}; choose one of {list(BACKENDS)}")
    if name == "auto":
        name = "triton" if torch.cuda.is_available() and _installed("triton") else "torch"
    if name == "torch":
        return chunk_linear_attention
    if name == "triton":
        if not _installed("triton"):
            raise ValueError("backend 'triton' needs the triton package: pip install 'distseq[triton]'")
        from distseq.kernels.linear_attention.triton_chunk import triton_chunk_linear_attention

        return triton_chunk_linear_attention
    if not _installed("fla"):
        raise ValueError("backend 'fla' needs flash-linear-attention: pip install flash-linear-attention")
    return fla_chunk_linear_attention


def fla_chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_linear_attention` computed by flash-linear-attention's ``chunk_simple_gla`` (GPU).

    fla takes a finite per-token log-gate, so state resets become varlen sequences: the batch rows are laid
    end to end and cut at every reset, the first piece of each row starting from that row's initial state
    and the others from zero. A reset that only some heads see cannot be a sequence boundary; such input
    runs on the torch path instead. ``chunk_size`` is fla's own choice.
    """
    from fla.ops.simple_gla import chunk_simple_gla  # type: ignore[import-not-found]

    cu = check_inputs(q, k, v, decay, gate, initial_state, cu_seqlens)
    dtype = accumulation_dtype(q.dtype)
    g, reset = resolve_gates(q, decay, gate, cu, dtype)  # [B, T, H]
    if not torch.equal(reset.any(-1), reset.all(-1)):
        return chunk_linear_attention(
            q,
            k,
            v,
            decay=decay,
            gate=gate,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
        )
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[3]
    token_reset = reset[..., 0].clone()  # [B, T]
    token_reset[:, 0] = True  # every row starts a sequence of its own
    starts = torch.nonzero(token_reset.reshape(-1)).flatten()  # offsets into the rows laid end to end
    offsets = torch.cat([starts, starts.new_tensor([batch * seq_len])])
    row_first = starts % seq_len == 0  # the first piece of each row
    states = q.new_zeros(starts.numel(), heads, key_dim, value_dim, dtype=dtype)
    if initial_state is not None:
        # A row whose first token is itself a reset drops its initial state.
        keep = row_first & ~reset[:, 0, 0].repeat_interleave(token_reset.sum(1))
        states = states.index_put((torch.nonzero(keep).flatten(),), initial_state[keep[row_first]].to(dtype))
    flat = [x.reshape(1, batch * seq_len, heads, -1) for x in (q, k, v)]
    out, final = chunk_simple_gla(
        *flat,
        g=g.reshape(1, batch * seq_len, heads),
        scale=1.0,
        initial_state=states,
        output_final_state=output_final_state,
        cu_seqlens=offsets,
    )
    out = out.reshape(batch, seq_len, heads, value_dim).to(q.dtype)
    if not output_final_state:
        return out, None
    last_piece = torch.cumsum(token_reset.sum(1), 0) - 1  # the last piece of each row
    return out, final[last_piece].to(dtype)
