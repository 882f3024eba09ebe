"""The CUDA attention backends against the reference kernel in fp32 (skipped without CUDA): torch's flash ops
(``sdpa``), flash-attn when installed, block by block and through the varlen entry.

Tolerance: 2e-2 relative to each tensor's largest entry (bf16 inputs and outputs; the reference computes the same
bf16 inputs in fp32).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from distseq.kernels.attention import BlockKind
from distseq.kernels.attention.backends import ATTENTION_BACKENDS
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._blocks import AttentionSpec, attend, attend_backward, block_plan, new_accumulators

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REFERENCE = ATTENTION_BACKENDS["reference"]


def _backend(name):
    if name == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    return ATTENTION_BACKENDS[name]


def _tensors(length, heads, kv_heads, dim, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(2, length, heads, dim), (2, length, kv_heads, dim), (2, length, kv_heads, dim), (2, length, heads, dim)]
    return [torch.randn(s, device="cuda", generator=g).bfloat16() for s in shapes]


def _rel(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1.0)).item()


@pytest.mark.parametrize("name", ["sdpa", "flash_attn"])
@pytest.mark.parametrize("kind", [BlockKind.FULL, BlockKind.CAUSAL])
@pytest.mark.parametrize(("heads", "dim", "length"), [((8, 8), 64, 1000), ((8, 2), 128, 257), ((4, 1), 64, 1)])
def test_blocks_match_reference(name, kind, heads, dim, length):
    backend = _backend(name)
    q, k, v, dout = _tensors(length, *heads, dim)
    ref_out, ref_lse = REFERENCE.forward(q, k, v, kind, 0.1)
    out, lse = backend.forward(q, k, v, kind, 0.1)
    assert _rel(out, ref_out) < 2e-2 and _rel(lse, ref_lse) < 2e-2
    grads = backend.backward(dout, q, k, v, ref_out, ref_lse, kind, 0.1)
    ref_grads = REFERENCE.backward(dout, q, k, v, ref_out, ref_lse, kind, 0.1)
    for got, want in zip(grads, ref_grads, strict=True):
        assert _rel(got, want) < 2e-2


@pytest.mark.parametrize("name", ["sdpa", "flash_attn"])
def test_varlen_runs_match_reference(name):
    """Packed documents: the varlen calls (diagonal pieces in one call) equal the reference pair by pair."""
    backend = _backend(name)
    docs = (0, 3, 4, 90, 170, 181, 300, 411, 470, 560, 640)
    layout = SequenceLayout("zigzag", 640, 2, 0, docs)
    q, k, v, dout = _tensors(640, 8, 2, 64)
    results = []
    for kernel in (REFERENCE, backend):
        spec = AttentionSpec(layout, True, 0.125, kernel, docs, None)
        plan = block_plan(spec, [0, 1], [0, 1])
        out, lse = new_accumulators(q)
        attend(spec, q, k, v, plan, out, lse)
        delta = (dout.float() * out).sum(-1).transpose(1, 2)
        grads = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
        attend_backward(spec, dout, q, k, v, out, lse, delta, plan, *grads)
        results.append([out, *grads])
    for got, want in zip(results[1], results[0], strict=True):
        assert _rel(got, want) < 2e-2
