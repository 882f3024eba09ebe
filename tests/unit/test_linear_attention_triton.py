"""Triton linear-attention kernels against the naive recurrence: output, final state and every gradient (q, k,
v, decay, gate, initial state) for the gate modes, ragged chunks, documents and -inf gates.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, fp32/fp64 only: bf16 is wrong
there), so sizes are tiny. Tolerances, relative to each tensor's max magnitude: fp32 1e-4, fp64 1e-10, fp16 2e-3.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from distseq.kernels.linear_attention.chunk import chunk_linear_attention  # noqa: E402
from distseq.kernels.linear_attention.naive import naive_recurrent_linear_attention  # noqa: E402
from distseq.kernels.linear_attention.triton_chunk import _INTERPRETED, triton_chunk_linear_attention  # noqa: E402

if not torch.cuda.is_available() and not _INTERPRETED:
    # Triton reads TRITON_INTERPRET when a kernel is decorated: something imported these kernels earlier.
    pytest.skip(
        "the Triton kernels were compiled for a GPU: set TRITON_INTERPRET=1 before importing them",
        allow_module_level=True,
    )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-3}
NAMES = ["out", "final", "q", "k", "v", "decay", "gate", "initial"]


def _inputs(mode, batch=2, seq_len=40, heads=2, key_dim=16, value_dim=16, dtype=torch.float32, state=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, seq_len, heads, key_dim, generator=gen) for _ in range(2))
    v = torch.randn(batch, seq_len, heads, value_dim, generator=gen)
    decay = gate = initial = None
    if mode in ("decay", "both"):
        decay = -torch.rand(heads, generator=gen) * 0.5
    if mode in ("gate", "both"):
        gate = torch.nn.functional.logsigmoid(torch.randn(batch, seq_len, heads, generator=gen) + 2)
    if state:
        initial = torch.randn(batch, heads, key_dim, value_dim, generator=gen)
    cast = [x if x is None else x.to(DEVICE, dtype) for x in (q, k, v, decay, gate)]
    return *cast, None if initial is None else initial.to(DEVICE)


def _run(fn, q, k, v, decay, gate, initial, **kwargs):
    """Output, final state and the gradients of a fixed random loss, in NAMES order (None where absent)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (q, k, v, decay, gate, initial)]
    q, k, v, decay, gate, initial = leaves
    out, final = fn(q, k, v, decay=decay, gate=gate, initial_state=initial, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=gen).to(out)
    w_final = torch.randn(final.shape, generator=gen).to(final)
    ((out.float() * w_out.float()).sum() + (final * w_final).sum()).backward()
    return [out.detach(), final.detach()] + [None if t is None else t.grad for t in leaves]


def _assert_close(expected, actual, rtol):
    for name, want, got in zip(NAMES, expected, actual, strict=True):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name} is not finite"
        scale = want.double().abs().max().clamp_min(1e-30)
        error = (got.double() - want.double()).abs().max() / scale
        assert error < rtol, f"{name}: relative error {error.item():.3g} >= {rtol}"


@pytest.mark.parametrize("mode", ["none", "decay", "gate", "both"])
def test_matches_naive_per_gate_mode(mode):
    # T=40 with 16-token chunks: the last chunk is ragged.
    inputs = _inputs(mode)
    expected = _run(naive_recurrent_linear_attention, *inputs)
    _assert_close(expected, _run(triton_chunk_linear_attention, *inputs, chunk_size=16), RTOL[torch.float32])


@pytest.mark.parametrize(
    ("chunk_size", "key_dim", "value_dim"),
    [(7, 5, 11), (64, 5, 11), (16, 80, 72)],
    ids=["chunk-7", "one-chunk", "two-dim-tiles"],
)
def test_sizes_that_are_not_blocks(chunk_size, key_dim, value_dim):
    # chunk 7 fills part of a 16-row block; 64 > T is one chunk; K, V > 64 loop over two 64-wide tiles.
    inputs = _inputs("both", batch=1, seq_len=24, heads=1, key_dim=key_dim, value_dim=value_dim)
    expected = _run(naive_recurrent_linear_attention, *inputs)
    actual = _run(triton_chunk_linear_attention, *inputs, chunk_size=chunk_size)
    _assert_close(expected, actual, RTOL[torch.float32])


def test_documents_and_neg_inf_gates_give_finite_exact_gradients():
    q, k, v, decay, gate, initial = _inputs("both")
    gate[0, 3, 1] = float("-inf")  # a reset in the middle of chunk 0
    gate[1, 16, 0] = float("-inf")  # a reset on a chunk's first token
    gate[1, 31, 1] = float("-inf")  # a reset on a chunk's last token
    cu_seqlens = torch.tensor([0, 13, 32, 40])  # documents straddling chunks, one starting on a boundary
    inputs = (q, k, v, decay, gate, initial)
    expected = _run(naive_recurrent_linear_attention, *inputs, cu_seqlens=cu_seqlens)
    actual = _run(triton_chunk_linear_attention, *inputs, cu_seqlens=cu_seqlens, chunk_size=16)
    _assert_close(expected, actual, RTOL[torch.float32])
    assert (actual[NAMES.index("gate")][0, 3, 1] == 0).item()


def test_fp64():
    inputs = _inputs("both", batch=1, seq_len=20, dtype=torch.float64)
    expected = _run(naive_recurrent_linear_attention, *inputs)
    _assert_close(expected, _run(triton_chunk_linear_attention, *inputs, chunk_size=16), RTOL[torch.float64])


def test_fp16_inputs_accumulate_in_fp32():
    inputs = _inputs("gate", batch=1, seq_len=20, dtype=torch.float16)
    expected = _run(naive_recurrent_linear_attention, *inputs)
    actual = _run(triton_chunk_linear_attention, *inputs, chunk_size=16)
    assert actual[0].dtype == torch.float16 and actual[1].dtype == torch.float32
    _assert_close(expected, actual, RTOL[torch.float16])


@pytest.mark.parametrize("loss_on", ["out", "final"])
def test_loss_on_one_result_without_initial_state(loss_on):
    q, k, v, decay, _, _ = _inputs("decay", batch=1, seq_len=20, state=False)
    grads = []
    for fn, kwargs in ((naive_recurrent_linear_attention, {}), (triton_chunk_linear_attention, {"chunk_size": 16})):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, decay)]
        out, final = fn(*leaves[:3], decay=leaves[3], output_final_state=loss_on == "final", **kwargs)
        assert (final is None) == (loss_on == "out")
        (out if loss_on == "out" else final).sum().backward()
        # The naive path leaves q.grad None when only the final state is used; the kernels give zeros.
        input_grads = [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]
        grads.append([out.detach(), final, *input_grads, None, None])  # no gate, no initial state
    _assert_close(*grads, RTOL[torch.float32])


def test_empty_sequence_returns_initial_state():
    q, k, v, _, _, initial = _inputs("none", batch=1, seq_len=0)
    out, final = triton_chunk_linear_attention(q, k, v, initial_state=initial, output_final_state=True)
    assert out.shape == (1, 0, 2, 16)
    torch.testing.assert_close(final, initial)


def test_invalid_inputs_raise():
    q, k, v, _, _, _ = _inputs("none", batch=1, seq_len=8, state=False)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        triton_chunk_linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="decay must be"):
        triton_chunk_linear_attention(q, k, v, decay=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=8"):
        triton_chunk_linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 4]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_chunk_on_gpu():
    q, k, v, decay, gate, initial = _inputs("both", batch=2, seq_len=1000, heads=4, key_dim=64, value_dim=128)
    gate[0, 100, 1] = float("-inf")
    inputs = (q * 0.1, k * 0.1, v, decay, gate, initial)
    cu_seqlens = torch.tensor([0, 300, 640, 1000])
    expected = _run(chunk_linear_attention, *inputs, cu_seqlens=cu_seqlens)
    _assert_close(expected, _run(triton_chunk_linear_attention, *inputs, cu_seqlens=cu_seqlens), 1e-4)
