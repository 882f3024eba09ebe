"""The chunked gated delta rule against the token-by-token recurrence: initial state, final state, documents,
chunk sizes that do and do not divide T, fp64 and fp32; and the recurrence against a hand-computed step."""

from __future__ import annotations

import pytest
import torch

from distseq.kernels.delta_rule import chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

B, T, H, K, V = 2, 37, 3, 8, 5


def _inputs(dtype, gated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g, dtype=torch.float64)) if gated else None
    state = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    return [None if x is None else x.to(dtype).requires_grad_() for x in (q, k, v, beta, gate, state)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_chunked_equals_recurrence(dtype, chunk_size, documents, gated):
    cu = torch.tensor([0, 5, 20, 21, T]) if documents else None
    got, want = _inputs(dtype, gated), _inputs(torch.float64, gated)
    out, final = chunk_gated_delta_rule(
        *got[:4], gate=got[4], initial_state=got[5], output_final_state=True, cu_seqlens=cu, chunk_size=chunk_size
    )
    ref, ref_final = naive_recurrent_gated_delta_rule(
        *want[:4], gate=want[4], initial_state=want[5], output_final_state=True, cu_seqlens=cu
    )
    assert out.dtype == dtype and final.dtype == dtype
    torch.manual_seed(1)
    d_out, d_final = torch.randn_like(ref), torch.randn_like(ref_final)
    ((out * d_out.to(dtype)).sum() + (final * d_final.to(dtype)).sum()).backward()
    ((ref * d_out).sum() + (ref_final * d_final).sum()).backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    pairs = [("out", out, ref), ("final", final, ref_final)]
    pairs += [
        (f"d{n}", x.grad, r.grad)
        for n, x, r in zip("q k v beta gate state".split(), got, want, strict=True)
        if x is not None
    ]
    for label, a, b in pairs:
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err <= tol, (label, err)


def test_recurrence_one_step_by_hand():
    """S_1 = a (I - b k k^T) S_0 + b k v^T and o_1 = S_1^T q, with the numbers written out."""
    q = torch.tensor([[[[1.0, 2.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.6, 0.8]]]], dtype=torch.float64)
    v = torch.tensor([[[[3.0]]]], dtype=torch.float64)
    beta = torch.tensor([[[0.5]]], dtype=torch.float64)
    gate = torch.log(torch.tensor([[[0.9]]], dtype=torch.float64))
    s0 = torch.tensor([[[[1.0], [-1.0]]]], dtype=torch.float64)
    out, s1 = naive_recurrent_gated_delta_rule(q, k, v, beta, gate=gate, initial_state=s0, output_final_state=True)
    kk = torch.tensor([[0.36, 0.48], [0.48, 0.64]], dtype=torch.float64)
    want = 0.9 * (torch.eye(2, dtype=torch.float64) - 0.5 * kk) @ s0[0, 0] + 0.5 * torch.tensor([[1.8], [2.4]])
    torch.testing.assert_close(s1[0, 0], want)
    torch.testing.assert_close(out[0, 0, 0], want.T @ q[0, 0, 0])


def test_errors_name_the_values():
    q, k, v, beta, gate, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, H\]"):
        chunk_gated_delta_rule(q, k, v, beta[..., :2])
    with pytest.raises(ValueError, match="beta must have q's dtype"):
        chunk_gated_delta_rule(q, k, v, beta.double())
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunk_gated_delta_rule(q, k, v, beta, chunk_size=0)
