"""Every strategy on one CUDA rank, and the trainer for a few steps under NCCL (skipped without CUDA).

Softmax strategies against the reference kernel in fp32 on the same device (tolerance 1e-3 of the largest entry
for fp32 inputs, 3e-2 for bf16); linear strategies and the delta rule against their token-by-token recurrences.
"""

from __future__ import annotations

import pytest
import torch

from distseq.kernels.attention import block_attention
from distseq.kernels.delta_rule import naive_recurrent_gated_delta_rule
from distseq.kernels.linear_attention import naive_recurrent_linear_attention
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES, make_strategy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N, H, D = 512, 4, 64


def _rel(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _inputs(dtype, kv_heads=H):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, N, H, D, device="cuda", generator=g)
    k, v = (torch.randn(2, N, kv_heads, D, device="cuda", generator=g) for _ in range(2))
    return [t.to(dtype) for t in (q, k, v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SOFTMAX_STRATEGIES)
def test_softmax_strategy_on_one_gpu(name, dtype):
    q, k, v = _inputs(dtype, kv_heads=2)
    cu = [0, 100, 333, N]
    options = {"ulysses_degree": 1} if name == "usp" else {}
    strategy = make_strategy(name, Communicator.solo(), SequenceLayout("zigzag", N, 1, 0), **options)
    out = strategy.attention(q, k, v, causal=True, cu_seqlens=cu)
    doc = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor([100, 233, N - 333], device="cuda"))
    want, _ = block_attention(q.float(), k.float(), v.float(), causal=True, q_doc=doc, k_doc=doc)
    assert out.dtype == dtype and _rel(out, want) < (1e-3 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [*LINEAR_STRATEGIES, "ulysses"])
def test_linear_strategy_on_one_gpu(name, dtype):
    q, k, v = (t * D**-0.5 for t in _inputs(dtype))
    gate = torch.nn.functional.logsigmoid(torch.randn(2, N, H, device="cuda") + 3)
    strategy = make_strategy(name, Communicator.solo(), SequenceLayout("zigzag", N, 1, 0))
    out = strategy.linear_attention(q, k, v, gate=gate)
    want, _ = naive_recurrent_linear_attention(q.float(), k.float(), v.float(), gate=gate)
    assert out.dtype == dtype and _rel(out, want) < (1e-3 if dtype == torch.float32 else 3e-2)
    if name != "lasp1":
        beta = torch.rand(2, N, H, device="cuda").to(dtype)
        kn = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
        out = strategy.delta_rule(q, kn, v, beta, gate=gate)
        want, _ = naive_recurrent_gated_delta_rule(q.float(), kn.float(), v.float(), beta.float(), gate=gate)
        assert _rel(out, want) < (1e-3 if dtype == torch.float32 else 3e-2)


def test_trainer_on_one_gpu_with_nccl(tmp_path):
    from pathlib import Path

    from distseq.config import RunConfig, load_yaml
    from distseq.train.trainer import run_training

    config = Path(__file__).resolve().parents[2] / "configs" / "runs" / "tiny-hybrid-cpu.yaml"
    overrides = [
        "parallel.sp=1",
        "parallel.backend=nccl",
        "train.steps=5",
        "data.eval_samples=32",
        f"output_dir={tmp_path}",
    ]
    result = run_training(load_yaml(RunConfig, config, overrides))
    assert len(result.losses) == 5 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]
