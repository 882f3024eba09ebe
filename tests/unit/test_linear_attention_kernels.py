"""Linear-attention kernels: the naive recurrence against an explicit formula, the chunked path against the
naive one (forward, final state and every gradient), documents and -inf gates, dtypes and input errors.

Tolerances: fp64 atol 1e-10 (rtol 1e-10); fp32 atol 1e-5 relative to the tensor's scale.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from distseq.kernels.linear_attention import (
    chunk_linear_attention,
    linear_attention_state,
    naive_recurrent_linear_attention,
)

MODES = ["none", "decay", "gate", "both"]


def _inputs(mode, batch=2, seq_len=37, heads=3, key_dim=4, value_dim=5, dtype=torch.float64, seed=0, state=False):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, seq_len, heads, key_dim, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, seq_len, heads, value_dim, generator=g, dtype=dtype)
    decay = gate = initial = None
    if mode in ("decay", "both"):
        decay = -torch.rand(heads, generator=g, dtype=dtype) * 0.5
    if mode in ("gate", "both"):
        gate = torch.nn.functional.logsigmoid(torch.randn(batch, seq_len, heads, generator=g, dtype=dtype) + 2)
    if state:
        initial = torch.randn(batch, heads, key_dim, value_dim, generator=g, dtype=dtype)
    return q, k, v, decay, gate, initial


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _run(fn, q, k, v, decay, gate, initial, **kwargs):
    """Output, final state and the gradients of every input of a random scalar loss."""
    q, k, v, decay, gate, initial = _leaves(q, k, v, decay, gate, initial)
    out, final = fn(q, k, v, decay=decay, gate=gate, initial_state=initial, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    w_state = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.dtype)
    ((out * w_out).sum() + (final * w_state).sum()).backward()
    grads = {
        name: t.grad
        for name, t in zip("q k v decay gate initial".split(), (q, k, v, decay, gate, initial), strict=True)
        if t is not None
    }
    return out.detach(), final.detach(), grads


def _explicit(q, k, v, decay, gate, initial):
    """o = ((q k^T) * D) v + decayed initial state, with D[t, s] = prod_{u in (s, t]} a_u built in full."""
    batch, seq_len, heads, _ = q.shape
    g = torch.zeros(batch, seq_len, heads, dtype=q.dtype)
    if decay is not None:
        g = g + decay
    if gate is not None:
        g = g + gate
    cum = g.cumsum(1).transpose(1, 2)  # [B, H, T]
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    dmat = torch.exp(cum[..., :, None] - cum[..., None, :]).masked_fill(~mask, 0.0)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * dmat
    out = torch.einsum("bhts,bshv->bthv", scores, v)
    if initial is not None:
        out = out + torch.einsum("bthk,bhkv,bht->bthv", q, initial, torch.exp(cum))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_naive_matches_explicit_formula(mode):
    q, k, v, decay, gate, initial = _inputs(mode, seq_len=11, state=True)
    out, _ = naive_recurrent_linear_attention(q, k, v, decay=decay, gate=gate, initial_state=initial)
    torch.testing.assert_close(out, _explicit(q, k, v, decay, gate, initial), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("mode", "chunk_size", "state"), list(itertools.product(MODES, [8, 16, 64], [False, True])))
def test_chunk_matches_naive_fp64(mode, chunk_size, state):
    inputs = _inputs(mode, seq_len=37, state=state)
    ref_out, ref_state, ref_grads = _run(naive_recurrent_linear_attention, *inputs)
    out, final, grads = _run(chunk_linear_attention, *inputs, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref_state, rtol=1e-10, atol=1e-10)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], ref_grads[name], rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}"
        )


@pytest.mark.parametrize("mode", MODES)
def test_chunk_matches_naive_fp32(mode):
    inputs = _inputs(mode, seq_len=50, dtype=torch.float32, state=True)
    ref_out, ref_state, ref_grads = _run(naive_recurrent_linear_attention, *inputs)
    out, final, grads = _run(chunk_linear_attention, *inputs, chunk_size=16)
    for name, got, want in [("o", out, ref_out), ("state", final, ref_state)] + [
        (f"d{n}", grads[n], ref_grads[n]) for n in grads
    ]:
        scale = want.abs().max().clamp_min(1.0)
        err = (got - want).abs().max() / scale
        assert err <= 1e-5, f"{name}: relative error {err:.3g}"


def _doc_inputs(mode, seq_len=41):
    return _inputs(mode, seq_len=seq_len, state=True, seed=3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_documents_equal_separate_runs(mode, chunk_size):
    """Packed documents (odd lengths, boundaries inside and across chunks) equal running each document on its
    own: the first continues from initial_state, the others start from zero."""
    q, k, v, decay, gate, initial = _doc_inputs(mode)
    cu = torch.tensor([0, 5, 6, 19, 33, 41])
    out, final = chunk_linear_attention(
        q,
        k,
        v,
        decay=decay,
        gate=gate,
        initial_state=initial,
        output_final_state=True,
        cu_seqlens=cu,
        chunk_size=chunk_size,
    )
    state = initial
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        piece = slice(start, end)
        ref, state = naive_recurrent_linear_attention(
            q[:, piece],
            k[:, piece],
            v[:, piece],
            decay=decay,
            gate=None if gate is None else gate[:, piece],
            initial_state=state if i == 0 else None,
            output_final_state=True,
        )
        torch.testing.assert_close(out[:, piece], ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_neg_inf_gates_are_resets_and_gradients_are_finite(mode):
    """A -inf gate equals a document start; forward and every gradient stay finite, chunked = naive."""
    q, k, v, decay, gate, initial = _doc_inputs(mode)
    if gate is None:
        gate = torch.zeros(q.shape[:3], dtype=q.dtype)
    gate = gate.clone()
    gate[:, [0, 6, 19, 20]] = float("-inf")  # a reset at t=0 drops the initial state; 19, 20 back to back
    gate[1, 30, 1] = float("-inf")  # one head of one row only
    ref_out, ref_state, ref_grads = _run(naive_recurrent_linear_attention, q, k, v, decay, gate, initial)
    out, final, grads = _run(chunk_linear_attention, q, k, v, decay, gate, initial, chunk_size=8)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref_state, rtol=1e-10, atol=1e-10)
    for name in grads:
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-10)
    assert (grads["gate"][:, [0, 6, 19, 20]] == 0).all() and grads["gate"][1, 30, 1] == 0
    assert (grads["initial"] == 0).all()  # every row resets at t=0
    # The same resets expressed as documents give the same result (row-1 head-1 reset excluded).
    gate_docs = gate.clone()
    gate_docs[:, [0, 6, 19, 20]] = 0.0 if mode in ("none", "decay") else gate_docs[:, [1]].expand(-1, 4, -1)
    gate_docs[1, 30, 1] = float("-inf")
    out_docs, _ = chunk_linear_attention(
        q, k, v, decay=decay, gate=gate_docs, initial_state=None, cu_seqlens=torch.tensor([0, 6, 19, 20, 41])
    )
    torch.testing.assert_close(out_docs, out, rtol=1e-10, atol=1e-10)


def test_strong_decay_does_not_overflow():
    q, k, v, _, _, _ = _inputs("none", seq_len=64)
    decay = torch.full((3,), -80.0, dtype=torch.float64)  # exp(-80 * 64) underflows, exp(+80 * 64) would not fit
    ref, _ = naive_recurrent_linear_attention(q, k, v, decay=decay)
    out, _ = chunk_linear_attention(q, k, v, decay=decay, chunk_size=64)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v, decay, gate, initial = _inputs("both", seq_len=40, dtype=torch.float32, state=True)
    ref, ref_state = chunk_linear_attention(
        q, k, v, decay=decay, gate=gate, initial_state=initial, output_final_state=True
    )
    low = [t.to(dtype) for t in (q, k, v)]
    out, final = chunk_linear_attention(*low, decay=decay, gate=gate, initial_state=initial, output_final_state=True)
    assert out.dtype == dtype and final.dtype == torch.float32
    # bf16 has 8 mantissa bits: the inputs alone carry ~0.4% relative error, outputs are sums of O(10) terms.
    tol = 0.1 if dtype == torch.bfloat16 else 0.02
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()
    assert (final - ref_state).abs().max() <= tol * ref_state.abs().max()


def test_single_token_and_chunk_larger_than_sequence():
    for seq_len in (1, 3):
        inputs = _inputs("both", seq_len=seq_len, state=True)
        ref_out, ref_state, _ = _run(naive_recurrent_linear_attention, *inputs)
        out, final, _ = _run(chunk_linear_attention, *inputs, chunk_size=64)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final, ref_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [naive_recurrent_linear_attention, chunk_linear_attention])
def test_input_errors(fn):
    q, k, v, decay, gate, initial = _inputs("both", seq_len=8, state=True)
    cases = [
        (dict(q=q[0]), r"q, k must be \[B, T, H, K\]"),
        (dict(k=k[:, :, :, :3]), r"q and k must have the same shape"),
        (dict(v=v[:, :4]), r"v must match q in \[B, T, H\]"),
        (dict(k=k.float(), v=v.float()), r"one floating dtype, got q=torch.float64 k=torch.float32"),
        (dict(decay=decay[:2]), r"decay must be \[H\]=\(3,\), got \(2,\)"),
        (dict(decay=decay.abs() + 0.5), r"decay is a log decay and must be <= 0, got max"),
        (dict(gate=gate[:, :5]), r"gate must be \[B, T, H\]=\(2, 8, 3\), got \(2, 5, 3\)"),
        (dict(gate=gate + 1.0), r"gate is a log gate and must be <= 0"),
        (dict(decay=decay.masked_fill(decay < 0, float("nan"))), r"decay contains NaN"),
        (dict(initial_state=initial[:, :2]), r"initial_state must be \[B, H, K, V\]=\(2, 3, 4, 5\)"),
        (dict(cu_seqlens=torch.tensor([0, 5])), r"cu_seqlens must start at 0 and end at T=8"),
        (dict(cu_seqlens=torch.tensor([0, 5, 5, 8])), r"cu_seqlens must be strictly increasing"),
    ]
    base = dict(q=q, k=k, v=v, decay=decay, gate=gate, initial_state=initial)
    for override, match in cases:
        args = base | override
        with pytest.raises(ValueError, match=match):
            fn(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    if fn is chunk_linear_attention:
        with pytest.raises(ValueError, match=r"chunk_size must be >= 1, got 0"):
            fn(q, k, v, chunk_size=0)
    # A NaN gate (a diverged activation, not an input error) gives NaN outputs instead of raising on one rank.
    out = fn(q, k, v, decay=decay, gate=gate.masked_fill(gate < -0.5, float("nan")))
    out = out[0] if isinstance(out, tuple) else out
    assert out.isnan().any()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("documents", [False, True])
def test_state_composes_with_the_state_before(mode, documents):
    """exp(log_carry) * S_before + state == the final state of the recurrence started from S_before,
    values and gradients (the identity LASP-2 relies on)."""
    q, k, v, decay, gate, initial = _inputs(mode, seq_len=29, state=True, seed=5)
    cu = torch.tensor([0, 4, 17, 29]) if documents else None
    k, v, decay, gate = _leaves(k, v, decay, gate)
    state, log_carry = linear_attention_state(k, v, decay=decay, gate=gate, cu_seqlens=cu)
    if documents:
        assert torch.isneginf(log_carry).all()
    composed = torch.exp(log_carry)[..., None, None] * initial + state
    _, final = naive_recurrent_linear_attention(
        q, k, v, decay=decay, gate=gate, initial_state=initial, output_final_state=True, cu_seqlens=cu
    )
    torch.testing.assert_close(composed, final, rtol=1e-10, atol=1e-10)
    w = torch.randn(final.shape, generator=torch.Generator().manual_seed(9), dtype=final.dtype)
    leaves = [t for t in (k, v, decay, gate) if t is not None]
    got = torch.autograd.grad((composed * w).sum(), leaves)
    want = torch.autograd.grad((final * w).sum(), leaves)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
