"""Local attention backends against the reference kernel, block by block, and the span plans against masks built
from positions.

The fused backend (``sdpa``) is compared with the reference for each block kind (FULL, CAUSAL), GQA ratios,
head_dim 64 and 128, odd lengths, fp32 and bf16 inputs; the backward takes the *merged* out/lse of two blocks (as
ring schedules do) and also ``delta`` instead of ``out``. Tolerances, relative to each tensor's max magnitude:
fp32 2e-6 (two fp32 computations), bf16 inputs 2e-6 as well (both compute in fp32 on CPU); the magnitude is floored
at 1 so that gradients that vanish exactly (one key) compare their rounding noise absolutely.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from distseq.kernels.attention import BlockKind, block_mask
from distseq.kernels.attention.backends import (
    ATTENTION_BACKENDS,
    attention_backend,
    causal_tiles,
    select_attention_backend,
)
from distseq.kernels.merge import merge_attention
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence._blocks import AttentionSpec, block_plan, rank_spans
from distseq.testing.sync import no_host_sync

SDPA, REFERENCE = ATTENTION_BACKENDS["sdpa"], ATTENTION_BACKENDS["reference"]


def _tensors(batch, q_len, k_len, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, generator=g).to(dtype)
    k = torch.randn(batch, k_len, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(batch, k_len, kv_heads, dim, generator=g).to(dtype)
    dout = torch.randn(batch, q_len, heads, dim, generator=g).to(dtype)
    return q, k, v, dout


def _rel(got, want):
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)).item()


# 300: a causal backward long enough to be cut into tiles (causal_tiles), at a length that is no multiple of one
CASES = list(
    itertools.product([BlockKind.FULL, BlockKind.CAUSAL], [(4, 4), (4, 2), (4, 1)], [64, 128], [1, 37, 128, 300])
)


@pytest.mark.parametrize(("kind", "heads", "dim", "length"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_reference(kind, heads, dim, length, dtype):
    q, k, v, dout = _tensors(2, length, length, *heads, dim, dtype)
    scale = 0.7 * dim**-0.5
    with no_host_sync():
        ref_out, ref_lse = REFERENCE.forward(q, k, v, kind, scale)
        out, lse = SDPA.forward(q, k, v, kind, scale)
    assert lse.dtype == torch.float32 and lse.shape == (2, heads[0], length)
    assert _rel(out, ref_out) < 2e-6 and _rel(lse, ref_lse) < 2e-6
    with no_host_sync():
        grads = SDPA.backward(dout, q, k, v, ref_out, ref_lse, kind, scale)
        ref_grads = REFERENCE.backward(dout, q, k, v, ref_out, ref_lse, kind, scale)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert got.shape == want.shape, name
        assert _rel(got, want) < 2e-6, (name, _rel(got, want))


@pytest.mark.parametrize("length", [1, 127, 128, 129, 256, 300, 1000, 1024])
@pytest.mark.parametrize(("tile", "side"), [(64, 2048), (128, 2048), (64, 200)])
def test_causal_tiles_cover_the_causal_square_once(length, tile, side):
    """Every (query, key) pair with key <= query in exactly one piece, no other pair in any; the causal pieces
    are diagonal squares of at most ``tile``, the full ones at most ``side`` a side."""
    count = torch.zeros(length, length, dtype=torch.int64)
    for q0, q1, k0, k1, causal in causal_tiles(length, tile, side):
        assert 0 <= q0 < q1 <= length and 0 <= k0 < k1 <= length
        if causal:
            assert (q0, q1) == (k0, k1) and q1 - q0 <= tile
            count[q0:q1, k0:k1] += torch.ones(q1 - q0, q1 - q0, dtype=torch.int64).tril()
        else:
            assert k1 <= q0 and max(q1 - q0, k1 - k0) <= side  # keys wholly before the queries
            count[q0:q1, k0:k1] += 1
    assert torch.equal(count, torch.ones(length, length, dtype=torch.int64).tril())


@pytest.mark.parametrize(("length", "heads"), [(256, (2, 2)), (300, (4, 2)), (1000, (3, 1)), (4500, (1, 1))])
def test_tiled_causal_backward_equals_reference_in_fp64(length, heads):
    """The fused causal backward of a long block (cut into tiles) against the reference's, fp64: equal to
    rounding (1e-12 relative), for GQA and lengths off the tile grid."""
    q, k, v, dout = _tensors(1, length, length, *heads, 32, torch.float64, seed=length)
    out, lse = REFERENCE.forward(q, k, v, BlockKind.CAUSAL, 0.3)
    assert _rel(SDPA.forward(q, k, v, BlockKind.CAUSAL, 0.3)[0], out) < 1e-12
    with no_host_sync():
        grads = SDPA.backward(dout, q, k, v, out, lse, BlockKind.CAUSAL, 0.3)
    for name, got, want in zip(
        "qkv", grads, REFERENCE.backward(dout, q, k, v, out, lse, BlockKind.CAUSAL, 0.3), strict=True
    ):
        assert got.dtype == torch.float64 and got.shape == want.shape, name
        assert _rel(got, want) < 1e-12, (name, _rel(got, want))


def _strided_like(x):
    """``x``'s values in a tensor whose head dimension is not the innermost one in memory (stride != 1), as a
    depthwise convolution's output ``[B, C, T]`` viewed as ``[B, T, H, D]`` is."""
    return x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


@pytest.mark.parametrize("kind", [BlockKind.FULL, BlockKind.CAUSAL])
@pytest.mark.parametrize("strided", ["q", "k", "v", "dout", "out"])
def test_sdpa_reads_any_strides(kind, strided):
    """The fused ops index the head dimension as if contiguous; the backend must hand them such tensors."""
    q, k, v, dout = _tensors(2, 33, 33, 4, 2, 16, torch.float32)
    scale = 16**-0.5
    ref_out, ref_lse = REFERENCE.forward(q, k, v, kind, scale)
    ref_grads = REFERENCE.backward(dout, q, k, v, ref_out, ref_lse, kind, scale)
    tensors = {"q": q, "k": k, "v": v, "dout": dout, "out": ref_out}
    tensors[strided] = _strided_like(tensors[strided])
    assert tensors[strided].stride(-1) != 1
    out, lse = SDPA.forward(tensors["q"], tensors["k"], tensors["v"], kind, scale)
    assert _rel(out, ref_out) < 2e-6 and _rel(lse, ref_lse) < 2e-6
    grads = SDPA.backward(
        tensors["dout"], tensors["q"], tensors["k"], tensors["v"], tensors["out"], ref_lse, kind, scale
    )
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        assert _rel(got, want) < 2e-6, (name, _rel(got, want))


@pytest.mark.parametrize("name", ["sdpa", "reference"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("n", [24, 300])
def test_backward_with_merged_out_and_lse(name, heads, n):
    """Two key blocks (past FULL + diagonal CAUSAL) merged: per-block gradients taken with the merged out/lse
    (or with delta instead of out) sum to the gradients of one attention over both blocks (n = 300: the fused
    causal backward runs in tiles)."""
    backend = ATTENTION_BACKENDS[name]
    q, k, v, dout = _tensors(2, n, 2 * n, *heads, 16, torch.float64 if name == "reference" else torch.float32)
    past, diag = slice(0, n), slice(n, 2 * n)
    out_a, lse_a = backend.forward(q, k[:, past], v[:, past], BlockKind.FULL, 0.25)
    out_b, lse_b = backend.forward(q, k[:, diag], v[:, diag], BlockKind.CAUSAL, 0.25)
    out, lse = merge_attention(out_a.double(), lse_a.double(), out_b.double(), lse_b.double())

    # independent: autograd through one masked attention over all 2n keys (query i sits at position n + i)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = block_mask(torch.arange(n, 2 * n), torch.arange(2 * n), causal=True)
    qg, kg, vg = leaves
    group = heads[0] // heads[1]
    scores = torch.einsum("bqhd,bkhd->bhqk", qg, kg.repeat_interleave(group, 2)) * 0.25
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    want_out = torch.einsum("bhqk,bkhd->bqhd", probs, vg.repeat_interleave(group, 2))
    want_out.backward(dout.double())
    assert _rel(out, want_out) < 1e-6

    delta = (dout.double() * out).sum(-1).transpose(1, 2)
    for given_out, given_delta in ((out, None), (None, delta)):
        dq = torch.zeros_like(leaves[0])
        dk, dv = torch.zeros_like(leaves[1]), torch.zeros_like(leaves[2])
        for keys, kind in ((past, BlockKind.FULL), (diag, BlockKind.CAUSAL)):
            dq_b, dk_b, dv_b = backend.backward(
                dout, q, k[:, keys], v[:, keys], given_out, lse, kind, 0.25, delta=given_delta
            )
            dq += dq_b
            dk[:, keys] += dk_b
            dv[:, keys] += dv_b
        for label, got, leaf in zip("qkv", (dq, dk, dv), leaves, strict=True):
            assert _rel(got, leaf.grad) < 1e-5, (label, given_out is None, _rel(got, leaf.grad))


def test_auto_choice_and_named_errors():
    cpu = torch.device("cpu")
    assert select_attention_backend(cpu, torch.float32, 64).name == "sdpa"
    assert select_attention_backend(cpu, torch.bfloat16, 64).name == "sdpa"
    assert select_attention_backend(cpu, torch.float64, 64).name == "reference"
    assert attention_backend("reference", cpu, torch.float32, 64).name == "reference"
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash'; choose one of \['auto', 'sdpa'"):
        attention_backend("flash", cpu, torch.float32, 64)
    with pytest.raises(ValueError, match=r"attention backend 'flash_attn' cannot serve torch.float32 on cpu"):
        attention_backend("flash_attn", cpu, torch.float32, 64)
    reason = SDPA.unavailable(torch.device("cuda"), torch.float32, 64)
    assert "fp16/bf16 only" in reason


def _mask_from_positions(layout, docs, causal, q_ranks, k_ranks):
    """Independent truth: the [Tq, Tk] mask of the concatenated tokens of q_ranks vs k_ranks."""
    order = [torch.cat([layout.for_rank(r).positions() for r in ranks]) for ranks in (q_ranks, k_ranks)]
    doc = None
    if docs is not None:
        cu = torch.tensor(docs)
        doc = [torch.searchsorted(cu, pos, right=True) - 1 for pos in order]
    mask = block_mask(order[0], order[1], causal=causal, q_doc=None if doc is None else doc[0],
                      k_doc=None if doc is None else doc[1])  # fmt: skip
    return torch.ones(len(order[0]), len(order[1]), dtype=torch.bool) if mask is None else mask


def test_plans_reproduce_the_position_mask():
    """Every (query span, key span) pair of a plan is all-allowed (FULL) or the aligned lower triangle (CAUSAL),
    every pair left out is all-forbidden: for random layouts, documents, causality and span limits."""
    rng = random.Random(0)
    for trial in range(300):
        sp = rng.choice([1, 2, 3, 4])
        kind = rng.choice(["contiguous", "zigzag"])
        chunks = sp if kind == "contiguous" else 2 * sp
        seq_len = chunks * rng.randint(1, 9)
        docs = None
        if rng.random() < 0.7 and seq_len > 1:
            inner = sorted(rng.sample(range(1, seq_len), rng.randint(0, min(6, seq_len - 1))))
            docs = (0, *inner, seq_len)
        causal = rng.random() < 0.75
        max_span = rng.choice([None, 1, 2, 3, 5])
        layout = SequenceLayout(kind, seq_len, sp, 0, docs)
        spec = AttentionSpec(layout, causal, 1.0, REFERENCE, docs, max_span)
        q_ranks = rng.sample(range(sp), rng.randint(1, sp))
        k_ranks = rng.sample(range(sp), rng.randint(1, sp))
        truth = _mask_from_positions(layout, docs, causal, q_ranks, k_ranks)
        covered = torch.zeros_like(truth)
        for qs, ks, pair_kind in block_plan(spec, q_ranks, k_ranks):
            assert max_span is None or (qs.length <= max_span and ks.length <= max_span)
            block = truth[qs.local, ks.local]
            if pair_kind is BlockKind.FULL:
                assert block.all(), (trial, qs, ks)
            else:
                assert pair_kind is BlockKind.CAUSAL and qs.length == ks.length, (trial, qs, ks)
                assert torch.equal(block, torch.ones_like(block).tril()), (trial, qs, ks)
            assert not covered[qs.local, ks.local].any(), "pairs overlap"
            covered[qs.local, ks.local] = True
        assert torch.equal(truth & ~covered, torch.zeros_like(truth)), f"trial {trial}: an allowed pair is missing"
        spans = rank_spans(spec, q_ranks)
        assert sum(s.length for s in spans) == len(q_ranks) * layout.local_len


def test_plans_are_cached():
    layout = SequenceLayout("zigzag", 64, 4, 0, (0, 5, 40, 64))
    spec = AttentionSpec(layout, True, 1.0, SDPA, layout.doc_offsets, None)
    assert block_plan(spec, [0], [1, 2]) is block_plan(spec, [0], [1, 2])


class _VarlenReference(type(REFERENCE)):
    """The reference kernel behind a varlen entry (looping over the pieces), counting calls: stands in for the
    CUDA varlen kernels so that the grouping of plan pairs into runs is tested here."""

    name = "varlen-reference"
    max_span = None

    def __init__(self):
        self.calls = 0

    def varlen(self, device):
        return True

    def _pieces(self, pieces):
        cu_q, cu_k = pieces.cu_q.tolist(), pieces.cu_k.tolist()
        return list(zip(zip(cu_q[:-1], cu_q[1:], strict=True), zip(cu_k[:-1], cu_k[1:], strict=True), strict=True))

    def forward_varlen(self, q, k, v, pieces, causal, scale):
        self.calls += 1
        kind = BlockKind.CAUSAL if causal else BlockKind.FULL
        out = torch.zeros(q.shape, dtype=torch.float64)
        lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float64)
        for (q0, q1), (k0, k1) in self._pieces(pieces):
            o, s = self.forward(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], kind, scale)
            out[q0:q1], lse[:, q0:q1] = o[0], s[0]
        return out, lse

    def backward_varlen(self, dout, q, k, v, out, lse, pieces, causal, scale, delta=None):
        self.calls += 1
        kind = BlockKind.CAUSAL if causal else BlockKind.FULL
        grads = [torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v)]
        for (q0, q1), (k0, k1) in self._pieces(pieces):
            piece = self.backward(
                dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                None if out is None else out[None, q0:q1], lse[None, :, q0:q1], kind, scale,
                delta=None if delta is None else delta[None, :, q0:q1],
            )  # fmt: skip
            for grad, got, (a, b) in zip(grads, piece, [(q0, q1), (k0, k1), (k0, k1)], strict=True):
                grad[a:b] += got[0]
        return grads


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("with_out", [True, False])
def test_varlen_runs_equal_the_pair_by_pair_path(kind, with_out):
    """Many short documents: the plan's pairs grouped into varlen runs (batch folded into the tokens) give the
    pair-by-pair result, in fewer kernel calls."""
    from distseq.parallel.sequence._blocks import attend, attend_backward, new_accumulators, varlen_runs

    docs = (0, 3, 4, 9, 17, 18, 30, 41, 47, 56, 64)
    layout = SequenceLayout(kind, 64, 2, 0, docs)
    q, k, v, dout = _tensors(2, 64, 64, 4, 2, 8, torch.float64, seed=5)
    results = []
    for backend in (REFERENCE, _VarlenReference()):
        spec = AttentionSpec(layout, True, 0.3, backend, docs, None)
        plan = block_plan(spec, [0, 1], [0, 1])
        out, lse = new_accumulators(q)
        attend(spec, q, k, v, plan, out, lse)
        delta = (dout * out).sum(-1).transpose(1, 2)
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        attend_backward(spec, dout, q, k, v, out if with_out else None, lse, delta, plan, *grads)
        results.append([out, lse, *grads])
    runs = varlen_runs(plan)
    assert sum(run.causal for run in runs) == 1  # every diagonal document piece in one call
    assert backend.calls == 2 * len(runs) < len(plan)
    for label, got, want in zip(["out", "lse", "dq", "dk", "dv"], results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=label)
