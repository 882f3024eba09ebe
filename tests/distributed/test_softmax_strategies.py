"""Every softmax SP strategy x layout x {MHA, GQA} x {causal, non-causal} x {dense, packed documents}:
forward output and dq, dk, dv equal a single-process full-attention reference on this rank's shard.

Tolerances: max abs error <= 1e-9 in fp64 and <= 1e-5 in fp32 (inputs ~N(0,1), outputs and grads O(1));
bf16 inputs (fp32 accumulation inside) are compared with the fp32 reference of the same bf16-rounded inputs
at atol 2e-2 (out) and 5e-2 (grads), a few bf16 ulps of O(1) values.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from distseq.kernels.attention import block_attention
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy

STRATEGIES = ["ring", "ulysses", "allgather_kv", "token_ring", "usp"]
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
# Documents with odd lengths, starting and ending inside chunks and crossing rank boundaries.
DOCS = {32: [0, 5, 6, 19, 27, 32], 48: [0, 7, 20, 21, 40, 48], 64: [0, 3, 30, 33, 50, 64]}
# document_zigzag (every document cut into 2P chunks): lengths divisible by 2P = 8 at P = 4, unequal.
PER_DOCUMENT = {32: [0, 8, 12, 32], 64: [0, 16, 24, 64]}


def _inputs(seq_len, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seq_len, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, seq_len, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(2, seq_len, kv_heads, dim, generator=g, dtype=torch.float64)
    dout = torch.randn(2, seq_len, heads, dim, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _reference(q, k, v, dout, causal, cu):
    """Single-process full attention (plain autograd through the reference kernel), in fp64."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    doc = None
    if cu is not None:
        cu = torch.tensor(cu)
        doc = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
    out, _ = block_attention(q, k, v, causal=causal, q_doc=doc, k_doc=doc)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _options(name, sp):
    return {"ulysses_degree": 2 if sp >= 2 else 1} if name == "usp" else {}


def job_parity(name, dtype_name, cases, block_size=None):
    dtype = getattr(torch, dtype_name)
    comm = Communicator()
    p, r = comm.size, comm.rank
    failures = []
    for kind, (heads, kv_heads), causal, docs in cases:
        seq_len = 32 if p < 4 else (48 if kind == "contiguous" else 64)
        cu = (PER_DOCUMENT if kind == "document_zigzag" else DOCS)[seq_len] if docs else None
        q, k, v, dout = _inputs(seq_len, heads, kv_heads, 8, dtype)
        ref = _reference(q, k, v, dout, causal, cu)
        layout = SequenceLayout(kind, seq_len, p, r, cu)
        strategy = make_strategy(name, comm, layout, **_options(name, p))
        if block_size is not None:
            strategy.block_size = block_size
        ql, kl, vl = (layout.shard(t, 1).detach().requires_grad_() for t in (q, k, v))
        out = strategy.attention(ql, kl, vl, causal=causal)
        out.backward(layout.shard(dout, 1))
        got = [out, ql.grad, kl.grad, vl.grad]
        for label, g, want in zip(["out", "dq", "dk", "dv"], got, ref, strict=True):
            assert g.dtype == dtype and g.shape == layout.shard(want, 1).shape, (label, g.dtype, g.shape)
            err = (g.double() - layout.shard(want, 1)).abs().max().item()
            tol = TOL.get(dtype, 2e-2 if label == "out" else 5e-2)
            if not err <= tol:  # also catches NaN
                failures.append(f"{kind} h={heads}/{kv_heads} causal={causal} docs={docs} {label}: {err:.3g} > {tol}")
    assert not failures, "\n".join(failures)


ALL_CASES = list(itertools.product(["contiguous", "zigzag"], [(4, 4), (4, 2), (4, 1)], [True, False], [False, True]))
ALL_CASES += list(itertools.product(["document_zigzag"], [(4, 2), (4, 1)], [True, False], [True]))


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_parity(worlds, world_size, name, dtype_name):
    worlds(world_size).run(job_parity, name, dtype_name, ALL_CASES, timeout=300)


@pytest.mark.parametrize("name", STRATEGIES)
def test_parity_bf16(worlds, name):
    cases = [("zigzag", (4, 2), True, True), ("contiguous", (4, 4), False, False)]
    worlds(4).run(job_parity, name, "bfloat16", cases)


@pytest.mark.parametrize("name", STRATEGIES)
def test_parity_with_tiled_chunks(worlds, name):
    """Chunks cut into 3-token tiles (not dividing the chunk) give the same result."""
    cases = [("zigzag", (4, 2), True, True), ("contiguous", (4, 1), True, False), ("zigzag", (4, 4), False, False)]
    worlds(4).run(job_parity, name, "float64", cases, block_size=3)
