"""The flash-linear-attention step of the delta rule (rows laid end to end, cut at document starts, three calls
for the map, the increment and the outputs) checked on CPU with a stand-in for fla's ``chunk_gated_delta_rule``
that follows its documented contract; the real kernels need a GPU."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from distseq.kernels.delta_rule import (
    delta_rule_backend,
    delta_rule_blocks,
    fla_delta_rule_blocks,
    naive_recurrent_gated_delta_rule,
)
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy


def _stand_in(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """fla's contract: [1, T, H, *] sequences packed by cu_seqlens, finite log gates g [1, T, H], beta [1, T, H],
    initial_state [N, H, K, V] per sequence; returns outputs and the final state per sequence."""
    assert q.shape[0] == 1 and torch.isfinite(g).all() and initial_state.shape[0] == cu_seqlens.numel() - 1
    outs, finals = [], []
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
        piece = slice(start, end)
        out, final = naive_recurrent_gated_delta_rule(
            q[:, piece] * scale,
            k[:, piece],
            v[:, piece],
            beta[:, piece],
            gate=g[:, piece],
            initial_state=initial_state[i : i + 1],
            output_final_state=True,
        )
        outs.append(out)
        finals.append(final)
    return torch.cat(outs, 1), (torch.cat(finals) if output_final_state else None)


@pytest.fixture
def fake_fla(monkeypatch):
    for name in ("fla", "fla.ops", "fla.ops.gated_delta_rule", "fla.ops.simple_gla"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # so find_spec sees it installed
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["fla.ops.gated_delta_rule"].chunk_gated_delta_rule = _stand_in


def _rows(rows=4, length=11, heads=2, key_dim=4, value_dim=3):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, length, heads, key_dim, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(
        torch.randn(rows, length, heads, key_dim, generator=g, dtype=torch.float64), dim=-1
    )
    v = torch.randn(rows, length, heads, value_dim, generator=g, dtype=torch.float64)
    beta = torch.rand(rows, length, heads, generator=g, dtype=torch.float64)
    gate = torch.nn.functional.logsigmoid(torch.randn(rows, length, heads, generator=g, dtype=torch.float64) + 2)
    incoming = torch.randn(rows, heads, key_dim, value_dim, generator=g, dtype=torch.float64)
    return q, k, v, beta, gate, incoming


def test_fla_step_equals_the_torch_step(fake_fla):
    """Maps, increments and outputs (and their gradients) with resets inside rows and at a row's start."""
    resets = [(), (4,), (0, 7), (3, 9)]
    leaves = [x.requires_grad_() for x in _rows()]
    q, k, v, beta, gate, incoming = leaves
    reset = torch.zeros(gate.shape, dtype=torch.bool)
    for r, offsets in enumerate(resets):
        reset[r, list(offsets)] = True
    g = torch.where(reset, 0.0, gate)
    out0, q_eff, maps, adds = delta_rule_blocks(q, k, v, beta, g, reset, chunk_size=4)
    want = [maps, adds, out0 + torch.einsum("bthk,bhkv->bthv", q_eff, incoming)]
    f_maps, f_adds, outputs = fla_delta_rule_blocks(q, k, v, beta, g, resets)
    got = [f_maps, f_adds, outputs(incoming)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    weights = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(
        sum((w * x).sum() for w, x in zip(weights, want, strict=True)), leaves, retain_graph=True
    )
    f_grads = torch.autograd.grad(sum((w * x).sum() for w, x in zip(weights, got, strict=True)), leaves)
    for a, b in zip(f_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_lasp2_with_the_fla_step_equals_the_recurrence(fake_fla):
    q, k, v, beta, gate, _ = _rows(rows=2, length=24)
    cu = [0, 5, 6, 17, 24]
    layout = SequenceLayout("zigzag", 24, 1, 0)
    strategy = make_strategy("lasp2", Communicator.solo(), layout, backend="fla")
    out = strategy.delta_rule(q, k, v, beta, gate=gate, cu_seqlens=cu)
    want, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, gate=gate, cu_seqlens=torch.tensor(cu))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    gate = gate.clone()
    gate[0, 9, 1] = float("-inf")  # a reset that is not a document start
    with pytest.raises(ValueError, match="resets the state only at document starts"):
        strategy.delta_rule(q, k, v, beta, gate=gate, cu_seqlens=cu)


def test_backend_choice(fake_fla, monkeypatch):
    assert delta_rule_backend("fla", torch.device("cpu")) == "fla"
    assert delta_rule_backend("auto", torch.device("cpu")) == "torch"
    assert delta_rule_backend("triton", torch.device("cuda")) == "torch"
    assert delta_rule_backend("auto", torch.device("cuda")) == "fla"
    monkeypatch.delitem(sys.modules, "fla")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="backend 'fla' needs flash-linear-attention"):
        delta_rule_backend("fla", torch.device("cuda"))
    assert delta_rule_backend("auto", torch.device("cuda")) == "torch"
