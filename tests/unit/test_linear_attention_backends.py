"""Backend choice for the local linear-attention kernel, and the flash-linear-attention adapter's plumbing
(rows laid end to end, resets as varlen sequences, per-piece initial states) checked on CPU against the
chunked kernel with a stand-in for fla's ``chunk_simple_gla`` that follows its documented contract.
The real fla kernels run in tests/gpu/."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from distseq.kernels.linear_attention import chunk_linear_attention, naive_recurrent_linear_attention
from distseq.kernels.linear_attention.backends import fla_chunk_linear_attention, linear_attention_backend


def _stand_in_chunk_simple_gla(
    q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """fla's contract: q, k [1, T, H, K] of sequences packed by cu_seqlens, g [1, T, H] finite log gates,
    initial_state [N, H, K, V] per sequence, final states [N, H, K, V]."""
    assert q.shape[0] == 1 and torch.isfinite(g).all() and initial_state.shape[0] == cu_seqlens.numel() - 1
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        piece = slice(start, end)
        out, final = naive_recurrent_linear_attention(
            q[:, piece] * scale,
            k[:, piece],
            v[:, piece],
            gate=g[:, piece],
            initial_state=initial_state[i : i + 1],
            output_final_state=True,
        )
        outs.append(out)
        finals.append(final)
    return torch.cat(outs, 1), (torch.cat(finals) if output_final_state else None)


@pytest.fixture
def fake_fla(monkeypatch):
    for name in ("fla", "fla.ops", "fla.ops.simple_gla"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # so find_spec sees it installed
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["fla.ops.simple_gla"].chunk_simple_gla = _stand_in_chunk_simple_gla


def _case(resets, per_head=False, state=True):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 23, 2, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(3, 23, 2, 5, generator=g, dtype=torch.float64)
    gate = torch.nn.functional.logsigmoid(torch.randn(3, 23, 2, generator=g, dtype=torch.float64) + 2)
    for b, t in resets:
        gate[b, t] = float("-inf")
    if per_head:
        gate[1, 9, 0] = float("-inf")
    initial = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64) if state else None
    decay = torch.tensor([-0.1, -0.3], dtype=torch.float64)
    return q, k, v, decay, gate, initial


@pytest.mark.parametrize(
    ("resets", "per_head", "state", "cu"),
    [
        ([], False, True, None),
        ([(0, 5), (2, 0), (2, 17), (1, 22)], False, True, None),  # a row reset at t=0 drops its initial state
        ([(1, 3)], False, False, torch.tensor([0, 7, 23])),
        ([(0, 4)], True, True, None),  # a reset seen by one head only: the torch path
    ],
)
def test_fla_adapter_equals_chunked_kernel(fake_fla, resets, per_head, state, cu):
    inputs = _case(resets, per_head, state)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    twins = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    kwargs = {"output_final_state": True, "cu_seqlens": cu}
    out, final = fla_chunk_linear_attention(
        *leaves[:3], decay=leaves[3], gate=leaves[4], initial_state=leaves[5], **kwargs
    )
    ref, ref_final = chunk_linear_attention(*twins[:3], decay=twins[3], gate=twins[4], initial_state=twins[5], **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    ((out * w).sum() + final.sum()).backward()
    ((ref * w).sum() + ref_final.sum()).backward()
    for a, b in zip(leaves, twins, strict=True):
        if a is not None:
            assert torch.isfinite(a.grad).all()
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_backend_choice():
    assert linear_attention_backend("torch") is chunk_linear_attention
    if not torch.cuda.is_available():
        assert linear_attention_backend("auto") is chunk_linear_attention
    with pytest.raises(ValueError, match=r"unknown linear-attention backend 'cuda'"):
        linear_attention_backend("cuda")


def test_missing_optional_backend_names_the_package(monkeypatch):
    import distseq.kernels.linear_attention.backends as backends

    monkeypatch.setattr(backends, "_installed", lambda module: False)
    with pytest.raises(ValueError, match=r"backend 'fla' needs flash-linear-attention"):
        linear_attention_backend("fla")
    with pytest.raises(ValueError, match=r"backend 'triton' needs the triton package"):
        linear_attention_backend("triton")


@pytest.mark.parametrize("name", ["lasp2", "lasp1", "ulysses"])
def test_strategies_use_the_chosen_backend(fake_fla, name):
    from distseq.parallel.comm import Communicator
    from distseq.parallel.layout import SequenceLayout
    from distseq.parallel.sequence.registry import make_strategy

    q, k, v, decay, gate, _ = _case([(0, 5)])
    layout = SequenceLayout("zigzag", 22, 1, 0, [0, 9, 22])
    outs = []
    for backend in ("fla", "torch"):
        strategy = make_strategy(name, Communicator.solo(), layout, backend=backend)
        outs.append(strategy.linear_attention(q[:, :22], k[:, :22], v[:, :22], decay=decay, gate=gate[:, :22]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="unknown linear-attention backend"):
        make_strategy(name, Communicator.solo(), layout, backend="cuda")


def test_lasp2_with_triton_backend_equals_torch():
    pytest.importorskip("triton")
    from distseq.parallel.comm import Communicator
    from distseq.parallel.layout import SequenceLayout
    from distseq.parallel.sequence.registry import make_strategy

    q, k, v, decay, gate, _ = (t.float() if t is not None else None for t in _case([(0, 5)]))
    layout = SequenceLayout("zigzag", 22, 1, 0, [0, 9, 22])
    results = []
    for backend in ("triton", "torch"):
        leaves = [t[:, :22].detach().clone().requires_grad_() for t in (q, k, v, gate)]
        strategy = make_strategy("lasp2", Communicator.solo(), layout, backend=backend, chunk_size=8)
        out = strategy.linear_attention(*leaves[:3], decay=decay, gate=leaves[3])
        out.square().sum().backward()
        results.append([out] + [t.grad for t in leaves])
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max().clamp_min(1.0)
