"""GPU backends of the local linear-attention kernel against the chunked PyTorch path (skipped without CUDA).

Tolerance: 2e-3 relative to each tensor's largest entry (fp32 with TF32-capable kernels).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from distseq.kernels.linear_attention import chunk_linear_attention
from distseq.kernels.linear_attention.backends import linear_attention_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("backend", ["triton", "fla"])
@pytest.mark.parametrize("documents", [False, True])
def test_backend_matches_torch(backend, documents):
    module = {"triton": "triton", "fla": "fla"}[backend]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    kernel = linear_attention_backend(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 1000, 4, 64)
    q, k = (torch.randn(shape, device="cuda", generator=g) * 0.125 for _ in range(2))
    v = torch.randn(shape, device="cuda", generator=g)
    gate = torch.nn.functional.logsigmoid(torch.randn(shape[:3], device="cuda", generator=g) + 3)
    initial = torch.randn(2, 4, 64, 64, device="cuda", generator=g)
    cu = torch.tensor([0, 130, 517, 1000]) if documents else None
    results = []
    for fn in (kernel, chunk_linear_attention):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gate, initial)]
        out, final = fn(*leaves[:3], gate=leaves[3], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu)
        (out.square().sum() + final.sum()).backward()
        results.append([out, final] + [t.grad for t in leaves])
    for name, got, want in zip(["o", "final", "dq", "dk", "dv", "dgate", "dinitial"], *results, strict=True):
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1.0)).item()
        assert err <= 2e-3, f"{backend} {name}: {err:.3g}"


@pytest.mark.parametrize("documents", [False, True])
def test_delta_rule_fla_step_matches_torch(documents):
    """LASP-2's delta rule with fla's local step against the torch step, on one rank (the exchange is shared)."""
    if importlib.util.find_spec("fla") is None:
        pytest.skip("fla is not installed")
    from distseq.parallel.comm import Communicator
    from distseq.parallel.layout import SequenceLayout
    from distseq.parallel.sequence.registry import make_strategy

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 1024, 4, 64)
    q = torch.randn(shape, device="cuda", generator=g) * 0.125
    k = torch.nn.functional.normalize(torch.randn(shape, device="cuda", generator=g), dim=-1)
    v = torch.randn(shape, device="cuda", generator=g)
    beta = torch.rand(shape[:3], device="cuda", generator=g)
    gate = torch.nn.functional.logsigmoid(torch.randn(shape[:3], device="cuda", generator=g) + 3)
    cu = [0, 130, 517, 1024] if documents else None
    results = []
    for backend in ("fla", "torch"):
        layout = SequenceLayout("zigzag", shape[1], 1, 0)
        strategy = make_strategy("lasp2", Communicator.solo(), layout, backend=backend)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, beta, gate)]
        out = strategy.delta_rule(*leaves[:4], gate=leaves[4], cu_seqlens=cu)
        out.square().sum().backward()
        results.append([out, *(t.grad for t in leaves)])
    for got, want in zip(*results, strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() <= 2e-3
