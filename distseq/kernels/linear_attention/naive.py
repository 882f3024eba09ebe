"""The slow, obviously correct reference: causal linear attention as a token-by-token recurrence.

    S_t = a_t S_{t-1} + k_t v_t^T,    o_t = q_t^T S_t,    a_t = exp(g_t)

with ``g_t`` the per-token, per-head log-gate (0: no decay; ``decay[h]``: fixed decay; ``gate[b, t, h]``:
data-dependent gate; both add up) and ``S_{-1}`` the initial state. A ``-inf`` gate, or a document start
given by ``cu_seqlens``, resets the state: ``S_t = k_t v_t^T``.
"""

from __future__ import annotations

import torch

from distseq.kernels.linear_attention._gates import accumulation_dtype, check_inputs, resolve_gates

__all__ = ["naive_recurrent_linear_attention"]


def naive_recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal linear attention, one token at a time.

    Args:
        q, k: ``[B, T, H, K]`` (q is not scaled); v: ``[B, T, H, V]``.
        decay: ``[H]`` log decay per head (<= 0).
        gate: ``[B, T, H]`` log gate per token and head (<= 0; ``-inf`` resets the state).
        initial_state: ``[B, H, K, V]`` state before the first token.
        output_final_state: return the state after the last token.
        cu_seqlens: ``[0, ..., T]`` offsets of documents packed along T (the same for every batch row);
            the state resets at every offset but 0 (so ``initial_state`` flows into the first document).

    Returns:
        ``o`` ``[B, T, H, V]`` in q's dtype and the final state ``[B, H, K, V]`` (fp32, fp64 for fp64
        inputs) or None.
    """
    cu = check_inputs(q, k, v, decay, gate, initial_state, cu_seqlens)
    dtype = accumulation_dtype(q.dtype)
    g, reset = resolve_gates(q, decay, gate, cu, dtype)
    batch, seq_len, heads, key_dim = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[3], dtype=dtype)
    if initial_state is not None:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(seq_len):
        kept = torch.where(reset[:, t, :, None, None], 0.0, torch.exp(g[:, t, :, None, None]) * state)
        state = kept + k[:, t, :, :, None].to(dtype) * v[:, t, :, None, :].to(dtype)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(dtype), state))
    out = torch.stack(outputs, dim=1) if outputs else q.new_zeros(batch, 0, heads, v.shape[3], dtype=dtype)
    return out.to(q.dtype), (state if output_final_state else None)
