"""The gated delta rule (Gated DeltaNet): a token-by-token reference and a chunked PyTorch path.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t,    a_t = exp(g_t)

per batch row and head, with ``S`` a ``K x V`` state, q not scaled, ``g`` the log gate (0 without one) and a
``-inf`` gate or a document start resetting the state (``S_t = beta_t k_t v_t^T``).

**Chunked form.** Cut the tokens into chunks of ``C``. Within a chunk starting from state ``S_0``, with
``Gamma_t = exp(sum_{s<=t} g_s)`` and the relative decay ``D_ts = Gamma_t / Gamma_s`` (``s <= t``, 0 across a
reset), the residuals ``w_t = beta_t (v_t - a_t S_{t-1}^T k_t)`` solve a unit lower-triangular system
``(I + A) w = beta v - (beta Gamma k) S_0`` with ``A_ts = beta_t (k_t . k_s) D_ts`` for ``s < t``. So with
``U = (I + A)^{-1} (beta v)``, ``W = (I + A)^{-1} (beta Gamma k)`` and ``P = (q k^T) . D`` (``s <= t``):

    o = (Gamma q - P W) S_0 + P U,        S_C = (Gamma_C I - (D_C k)^T W) S_0 + (D_C k)^T U.

Every chunk is an affine map of the state entering it: ``S_C = M S_0 + N`` (``M`` ``K x K``, ``N`` ``K x V``),
and its outputs are ``o = Q~ S_0 + o^0``. Maps compose (``M2 M1``, ``M2 N1 + N2``), which is what lets a block of
tokens be summarised on one rank and the summaries be combined across ranks (``distseq.parallel.sequence.delta``).
Only differences of cumulative gates are exponentiated (every factor is ``<= 1``); masked terms are
``exp(-inf) = 0`` before any product. Gradients come from autograd (the triangular solve included).
"""

from __future__ import annotations

import torch

from distseq.kernels.linear_attention._gates import accumulation_dtype, check_inputs, resolve_gates
from distseq.kernels.linear_attention.chunk import _chunk_gates, _chunking, _to_chunks

__all__ = [
    "check_delta_rule_inputs",
    "delta_rule_backend",
    "chunk_gated_delta_rule",
    "delta_rule_blocks",
    "fla_delta_rule_blocks",
    "naive_recurrent_gated_delta_rule",
]


def delta_rule_backend(name: str, device: torch.device) -> str:
    """The local step of the delta rule for a strategy's kernel ``backend``: ``fla`` when asked for (an error
    naming the package if it is not installed) or, with ``auto``, on CUDA when installed; else ``torch`` (distseq
    has no Triton delta-rule kernel: ``triton`` names the linear-attention kernel only)."""
    from distseq.kernels.linear_attention.backends import _installed

    if name == "fla":
        if not _installed("fla"):
            raise ValueError("backend 'fla' needs flash-linear-attention: pip install flash-linear-attention")
        return "fla"
    return "fla" if name == "auto" and device.type == "cuda" and _installed("fla") else "torch"


def check_delta_rule_inputs(q, k, v, beta, gate, initial_state, cu_seqlens, *, values: bool = True):
    """The linear-attention checks plus ``beta`` ``[B, T, H]`` in q's dtype; returns cu_seqlens (or None)."""
    cu = check_inputs(q, k, v, None, gate, initial_state, cu_seqlens, values=values)
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H]={tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    if beta.dtype != q.dtype:
        raise ValueError(f"beta must have q's dtype {q.dtype}, got {beta.dtype}")
    return cu


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule one token at a time (the test oracle).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; beta: ``[B, T, H]``.
        gate: ``[B, T, H]`` log gate (<= 0, ``-inf`` resets the state).
        initial_state: ``[B, H, K, V]``; cu_seqlens: ``[0, ..., T]`` document offsets (resets at each but 0).

    Returns:
        ``o`` ``[B, T, H, V]`` in q's dtype and the final state (fp32; fp64 for fp64) or None.
    """
    cu = check_delta_rule_inputs(q, k, v, beta, gate, initial_state, cu_seqlens)
    dtype = accumulation_dtype(q.dtype)
    g, reset = resolve_gates(q, None, gate, cu, dtype)
    batch, seq_len, heads, key_dim = q.shape
    state = q.new_zeros(batch, heads, key_dim, v.shape[3], dtype=dtype)
    if initial_state is not None:
        state = initial_state.to(dtype)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    outputs = []
    for t in range(seq_len):
        kept = torch.where(reset[:, t, :, None, None], 0.0, torch.exp(g[:, t, :, None, None]) * state)
        k_t, b_t = k[:, t], beta[:, t, :, None, None]
        kept = kept - b_t * k_t[..., :, None] * torch.einsum("bhk,bhkv->bhv", k_t, kept)[..., None, :]
        state = kept + b_t * k_t[..., :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    out = torch.stack(outputs, dim=1) if outputs else q.new_zeros(batch, 0, heads, v.shape[3], dtype=dtype)
    return out.to(q.dtype), (state if output_final_state else None)


def delta_rule_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    reset: torch.Tensor,
    *,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each batch row as one block, summarised as an affine map of the state entering it.

    q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``, g (finite log gate, 0 at resets) and reset
    ``[B, T, H]``, all in the accumulation dtype (nothing is checked; nothing is read back from the device).

    Returns ``(out0, q_eff, M, N)``: the outputs from a zero state ``[B, T, H, V]``, the effective queries
    ``[B, T, H, K]`` with ``o = out0 + q_eff S_in``, and the block's map ``S_out = M S_in + N``
    (``M`` ``[B, H, K, K]``, ``N`` ``[B, H, K, V]``).
    """
    batch, seq_len, heads, key_dim = q.shape
    value_dim = v.shape[3]
    chunk, pad = _chunking(seq_len, chunk_size)
    qc, kc, vc = (_to_chunks(x, chunk, pad) for x in (q, k, v))  # [B, H, NC, C, K|V]
    bc = _to_chunks(beta, chunk, pad)  # [B, H, NC, C]; padding has beta = 0: it changes nothing
    cum, seg = _chunk_gates(g, reset, chunk, pad)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    connected = causal & (seg[..., :, None] == seg[..., None, :])  # [.., t, s]: s <= t, no reset in (s, t]
    decay = torch.exp(torch.where(connected, cum[..., :, None] - cum[..., None, :], float("-inf")))
    from_start = torch.where(seg == 0, torch.exp(cum), 0.0)  # Gamma_t, 0 after a reset

    strict = (kc @ kc.transpose(-1, -2)) * decay * bc[..., :, None]
    system = strict.tril(-1) + torch.eye(chunk, dtype=q.dtype, device=q.device)
    rhs = torch.cat([bc[..., None] * vc, (bc * from_start)[..., None] * kc], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u, w = solved.split([value_dim, key_dim], dim=-1)  # [.., C, V], [.., C, K]
    scores = (qc @ kc.transpose(-1, -2)) * decay  # P, s <= t
    q_tilde = from_start[..., None] * qc - scores @ w  # [.., C, K]: o = q_tilde S_0 + P U
    intra = scores @ u  # [.., C, V]
    to_end = decay[..., -1, :, None] * kc  # D_C k [.., C, K]
    eye = torch.eye(key_dim, dtype=q.dtype, device=q.device)
    maps = from_start[..., -1, None, None] * eye - to_end.transpose(-1, -2) @ w  # M_c [.., K, K]
    adds = to_end.transpose(-1, -2) @ u  # N_c [.., K, V]

    # Compose the chunks' maps in order: S_c = M_pre S_in + N_pre before chunk c.
    m_pre = eye.expand(batch, heads, key_dim, key_dim)
    n_pre = q.new_zeros(batch, heads, key_dim, value_dim)
    outs, effective = [], []
    # unbind, not indexing: the backward of x[:, :, c] would write a full-size zero tensor per chunk.
    for q_c, intra_c, m_c, n_c in zip(q_tilde.unbind(2), intra.unbind(2), maps.unbind(2), adds.unbind(2), strict=True):
        outs.append(intra_c + q_c @ n_pre)
        effective.append(q_c @ m_pre)
        n_pre = m_c @ n_pre + n_c
        m_pre = m_c @ m_pre

    def unchunk(x: list[torch.Tensor]) -> torch.Tensor:  # [B, H, C, D] per chunk -> [B, T, H, D]
        x = torch.stack(x, dim=2)
        return x.movedim(1, 3).reshape(batch, seq_len + pad, heads, x.shape[-1])[:, :seq_len]

    return unchunk(outs), unchunk(effective), m_pre, n_pre


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The delta rule chunk by chunk; the arguments and results of :func:`naive_recurrent_gated_delta_rule`."""
    cu = check_delta_rule_inputs(q, k, v, beta, gate, initial_state, cu_seqlens)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = accumulation_dtype(q.dtype)
    g, reset = resolve_gates(q, None, gate, cu, dtype)
    with torch.autocast(q.device.type, enabled=False):
        out, q_eff, m, n = delta_rule_blocks(*(x.to(dtype) for x in (q, k, v, beta)), g, reset, chunk_size=chunk_size)
        final = n
        if initial_state is not None:
            state = initial_state.to(dtype)
            out = out + torch.einsum("bthk,bhkv->bthv", q_eff, state)
            final = m @ state + n
    return out.to(q.dtype), (final if output_final_state else None)


def fla_delta_rule_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    row_resets: list[tuple[int, ...]],
):
    """:func:`delta_rule_blocks` through flash-linear-attention's ``chunk_gated_delta_rule`` (GPU kernels).

    Rows ``[R, L, H, *]`` (g finite); ``row_resets[r]``: the offsets in row ``r`` where the state resets, as host
    integers (document starts; offset 0 means the row ignores the state entering it). fla resets only between
    the sequences of a varlen batch, so the rows are laid end to end and cut at every reset. Three fla calls:
    with zero values from the identity (the map ``M``), with the values from zero (``N``), and, once the entering
    states are known, with the values from them (the outputs). Returns ``(M [R, H, K, K], N [R, H, K, V],
    outputs)``, ``outputs(incoming [R, H, K, V]) -> [R, L, H, V]``; gradients through fla's autograd.
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # type: ignore[import-not-found]

    rows, length, heads, key_dim = q.shape
    value_dim = v.shape[3]
    offsets, first, last, carried = [0], [], [], []
    for r, resets in enumerate(row_resets):
        cuts = sorted({c for c in resets if 0 < c < length} | {length})
        first.append(len(offsets) - 1)
        offsets += [r * length + c for c in cuts]
        last.append(len(offsets) - 2)
        carried.append(0 not in resets)
    pieces = len(offsets) - 1
    cu_seqlens = torch.tensor(offsets, dtype=torch.int64, device=q.device)
    index = lambda xs: torch.tensor(xs, dtype=torch.int64, device=q.device)  # noqa: E731
    starts = index([p for p, keep in zip(first, carried, strict=True) if keep])
    kept_rows = index([r for r, keep in enumerate(carried) if keep])
    last_pieces = index(last)
    flat = lambda x: x.reshape(1, rows * length, *x.shape[2:])  # noqa: E731

    def run(values: torch.Tensor, initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunk_gated_delta_rule(
            flat(q),
            flat(k),
            flat(values),
            flat(g),
            flat(beta),
            scale=1.0,
            initial_state=initial,
            output_final_state=True,
            cu_seqlens=cu_seqlens,
        )

    identity = torch.eye(key_dim, dtype=q.dtype, device=q.device).expand(len(starts), heads, key_dim, key_dim)
    from_identity = q.new_zeros(pieces, heads, key_dim, key_dim).index_copy(0, starts, identity)
    maps = run(torch.zeros_like(k), from_identity)[1][last_pieces]
    adds = run(v, q.new_zeros(pieces, heads, key_dim, value_dim))[1][last_pieces]

    def outputs(incoming: torch.Tensor) -> torch.Tensor:
        initial = q.new_zeros(pieces, heads, key_dim, value_dim).index_copy(0, starts, incoming[kept_rows])
        return run(v, initial)[0].reshape(rows, length, heads, value_dim)

    return maps, adds, outputs
