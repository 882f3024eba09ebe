"""Block attention kernels and the (out, lse) merge against a plain full-attention reference."""

import pytest
import torch

from distseq.kernels.attention import (
    BlockKind,
    block_attention,
    block_attention_backward,
    block_mask,
    classify_block,
)
from distseq.kernels.merge import merge_attention, merge_attention_

BATCH, HEAD_DIM = 2, 8
# one tolerance per dtype, applied to every tensor compared (out, lse, dq, dk, dv)
TOLERANCE = {torch.float64: {"atol": 1e-10, "rtol": 1e-10}, torch.float32: {"atol": 1e-5, "rtol": 1e-5}}
# global document starts: irregular lengths, one single-token document, boundaries inside every block below
DOC_STARTS = torch.tensor([0, 2, 3, 9, 17, 30, 41, 44, 60, 75, 100, 120])

HEADS = pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "gqa4"])
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
DOCS = pytest.mark.parametrize("docs", [False, True], ids=["nodocs", "docs"])
POSITIONS = pytest.mark.parametrize("positions", ["arange", "zigzag"])
SEQ_LEN = pytest.mark.parametrize("seq_len", [13, 37])
DTYPE = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


def allowed_mask(q_pos, k_pos, causal, q_doc=None, k_doc=None):
    mask = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    if causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if q_doc is not None:
        mask &= q_doc[:, None] == k_doc[None, :]
    return mask


def reference_attention(q, k, v, mask, softmax_scale=None):
    """Plain softmax attention over the allowed keys; every query row must have one."""
    assert mask.any(dim=-1).all()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    return out, scores.logsumexp(dim=-1)


def make_positions(kind, seq_len):
    if kind == "arange":
        return torch.arange(seq_len)
    # a zigzag rank: one chunk at the start of a longer sequence and one near its end
    first = (seq_len + 1) // 2
    return torch.cat([torch.arange(first), torch.arange(3 * seq_len, 4 * seq_len - first)])


def doc_ids(pos):
    return torch.searchsorted(DOC_STARTS, pos, right=True) - 1


def make_inputs(seq_len, heads, kv_heads, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = randn(BATCH, seq_len, heads, HEAD_DIM).requires_grad_()
    k = randn(BATCH, seq_len, kv_heads, HEAD_DIM).requires_grad_()
    v = randn(BATCH, seq_len, kv_heads, HEAD_DIM).requires_grad_()
    dout = randn(BATCH, seq_len, heads, HEAD_DIM)
    dlse = randn(BATCH, heads, seq_len)
    return q, k, v, dout, dlse


def check(name, actual, expected, dtype):
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype], msg=lambda m: f"{name}: {m}")


def split_bounds(split, seq_len):
    if split == "halves":
        return [0, seq_len // 2, seq_len]
    # zigzag-style: four uneven pieces
    return [0, seq_len // 4, seq_len // 2, seq_len // 2 + 3, seq_len]


@HEADS
@CAUSAL
@DOCS
@POSITIONS
@SEQ_LEN
@DTYPE
def test_block_attention_matches_reference(heads, kv_heads, causal, docs, positions, seq_len, dtype):
    pos = make_positions(positions, seq_len)
    doc = doc_ids(pos) if docs else None
    q, k, v, dout, dlse = make_inputs(seq_len, heads, kv_heads, dtype)

    out, lse = block_attention(q, k, v, q_pos=pos, k_pos=pos, causal=causal, q_doc=doc, k_doc=doc)
    ref_out, ref_lse = reference_attention(q, k, v, allowed_mask(pos, pos, causal, doc, doc))
    assert out.dtype == dtype and lse.dtype == dtype
    assert lse.shape == (BATCH, heads, seq_len)
    check("out", out, ref_out, dtype)
    check("lse", lse, ref_lse, dtype)

    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        check(name, grad, ref_grad, dtype)


def test_softmax_scale_and_low_precision_accumulate_in_fp32():
    q, k, v, _, _ = make_inputs(9, 4, 2, torch.float64)
    out, lse = block_attention(q, k, v, softmax_scale=0.3)
    ref_out, ref_lse = reference_attention(q, k, v, allowed_mask(torch.arange(9), torch.arange(9), True), 0.3)
    check("out", out, ref_out, torch.float64)
    check("lse", lse, ref_lse, torch.float64)

    out, lse = block_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


@HEADS
@CAUSAL
@DOCS
@POSITIONS
@pytest.mark.parametrize("split", ["halves", "pieces"])
@SEQ_LEN
@DTYPE
def test_merge_of_kv_blocks_equals_full_attention(heads, kv_heads, causal, docs, positions, split, seq_len, dtype):
    pos = make_positions(positions, seq_len)
    doc = doc_ids(pos) if docs else None
    q, k, v, dout, dlse = make_inputs(seq_len, heads, kv_heads, dtype)
    bounds = split_bounds(split, seq_len)

    partials = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        partials.append(
            block_attention(
                q,
                k[:, start:end],
                v[:, start:end],
                q_pos=pos,
                k_pos=pos[start:end],
                causal=causal,
                q_doc=doc,
                k_doc=None if doc is None else doc[start:end],
            )
        )
    if causal:  # some rows have no allowed key in some block: exercises the -inf side of the merge
        assert any(torch.isneginf(lse).any() for _, lse in partials)
    out, lse = partials[0]
    for part_out, part_lse in partials[1:]:
        out, lse = merge_attention(out, lse, part_out, part_lse)

    ref_out, ref_lse = reference_attention(q, k, v, allowed_mask(pos, pos, causal, doc, doc))
    check("out", out, ref_out, dtype)
    check("lse", lse, ref_lse, dtype)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert torch.isfinite(grad).all(), name
        check(name, grad, ref_grad, dtype)


@HEADS
@CAUSAL
@DOCS
@POSITIONS
@pytest.mark.parametrize("split", ["halves", "pieces"])
@SEQ_LEN
@DTYPE
def test_backward_summed_over_kv_blocks_equals_reference(
    heads, kv_heads, causal, docs, positions, split, seq_len, dtype
):
    pos = make_positions(positions, seq_len)
    doc = doc_ids(pos) if docs else None
    q, k, v, dout, _ = make_inputs(seq_len, heads, kv_heads, dtype)
    ref_out, ref_lse = reference_attention(q, k, v, allowed_mask(pos, pos, causal, doc, doc))
    ref_dq, ref_dk, ref_dv = torch.autograd.grad((ref_out * dout).sum(), (q, k, v))

    out, lse = ref_out.detach(), ref_lse.detach()
    dq = torch.zeros_like(ref_dq)
    dk_blocks, dv_blocks = [], []
    bounds = split_bounds(split, seq_len)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        dq_block, dk_block, dv_block = block_attention_backward(
            dout,
            q.detach(),
            k.detach()[:, start:end],
            v.detach()[:, start:end],
            out,
            lse,
            q_pos=pos,
            k_pos=pos[start:end],
            causal=causal,
            q_doc=doc,
            k_doc=None if doc is None else doc[start:end],
        )
        assert dq_block.dtype == dtype
        dq += dq_block
        dk_blocks.append(dk_block)
        dv_blocks.append(dv_block)
    check("dq", dq, ref_dq, dtype)
    check("dk", torch.cat(dk_blocks, dim=1), ref_dk, dtype)
    check("dv", torch.cat(dv_blocks, dim=1), ref_dv, dtype)


@HEADS
@DOCS
@pytest.mark.parametrize("sp_rank", [0, 1])
def test_zigzag_ring_schedule_skips_empty_blocks(heads, kv_heads, docs, sp_rank):
    """A ring step by step: per (q chunk, k chunk) pair classify, skip EMPTY, merge in place, sum grads."""
    dtype, chunk_len, sp_size = torch.float64, 5, 2
    seq_len = 2 * sp_size * chunk_len
    q, k, v, dout, _ = make_inputs(seq_len, heads, kv_heads, dtype)
    q, k, v = q.detach(), k.detach(), v.detach()
    all_pos = torch.arange(seq_len)
    all_doc = doc_ids(all_pos) if docs else None
    chunks = [all_pos[c * chunk_len : (c + 1) * chunk_len] for c in range(2 * sp_size)]
    local_chunks = [chunks[sp_rank], chunks[2 * sp_size - 1 - sp_rank]]

    def doc_of(pos):
        return None if all_doc is None else all_doc[pos]

    def block_args(q_pos, k_pos):
        return {"q_pos": q_pos, "k_pos": k_pos, "q_doc": doc_of(q_pos), "k_doc": doc_of(k_pos)}

    kinds = {}
    for q_index, q_pos in enumerate(local_chunks):
        for k_index, k_pos in enumerate(chunks):
            kinds[q_index, k_index] = classify_block(
                q_pos, k_pos, causal=True, q_doc=doc_of(q_pos), k_doc=doc_of(k_pos)
            )
    if not docs:
        empty, full, causal = BlockKind.EMPTY, BlockKind.FULL, BlockKind.CAUSAL
        expected = {
            0: [[causal, empty, empty, empty], [full, full, full, causal]],
            1: [[full, causal, empty, empty], [full, full, causal, empty]],
        }[sp_rank]
        assert [[kinds[i, j] for j in range(len(chunks))] for i in range(2)] == expected

    outs, lses = [], []
    for q_index, q_pos in enumerate(local_chunks):
        acc_out, acc_lse = None, None
        for k_index, k_pos in enumerate(chunks):
            if kinds[q_index, k_index] is BlockKind.EMPTY:
                continue
            block_out, block_lse = block_attention(q[:, q_pos], k[:, k_pos], v[:, k_pos], **block_args(q_pos, k_pos))
            acc_out, acc_lse = merge_attention_(acc_out, acc_lse, block_out, block_lse)
        outs.append(acc_out)
        lses.append(acc_lse)

    local_pos = torch.cat(local_chunks)
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    ref_out, ref_lse = reference_attention(q, k, v, allowed_mask(all_pos, all_pos, True, all_doc, all_doc))
    ref_dq, ref_dk, ref_dv = torch.autograd.grad((ref_out[:, local_pos] * dout[:, local_pos]).sum(), (q, k, v))
    check("out", torch.cat(outs, dim=1), ref_out[:, local_pos], dtype)
    check("lse", torch.cat(lses, dim=2), ref_lse[:, :, local_pos], dtype)

    q, k, v = q.detach(), k.detach(), v.detach()
    dq, dk, dv = torch.zeros_like(ref_dq), torch.zeros_like(ref_dk), torch.zeros_like(ref_dv)
    for q_index, q_pos in enumerate(local_chunks):
        for k_index, k_pos in enumerate(chunks):
            if kinds[q_index, k_index] is BlockKind.EMPTY:
                continue
            dq_block, dk_block, dv_block = block_attention_backward(
                dout[:, q_pos],
                q[:, q_pos],
                k[:, k_pos],
                v[:, k_pos],
                outs[q_index],
                lses[q_index],
                **block_args(q_pos, k_pos),
            )
            dq[:, q_pos] += dq_block
            dk[:, k_pos] += dk_block
            dv[:, k_pos] += dv_block
    check("dq", dq, ref_dq, dtype)
    check("dk", dk, ref_dk, dtype)
    check("dv", dv, ref_dv, dtype)


def run(start, size=4):
    return torch.arange(start, start + size)


def ids(*values):
    return torch.tensor(values)


ZIGZAG = [
    run(0),
    run(4),
    run(8),
    run(12),
]  # 2 ranks, 4 chunks of 4; rank 0 holds 0 and 3, rank 1 holds 1 and 2
CLASSIFY_CASES = {
    "future": (run(0), run(4), True, None, None, BlockKind.EMPTY),
    "past": (run(4), run(0), True, None, None, BlockKind.FULL),
    "diagonal": (run(4), run(4), True, None, None, BlockKind.CAUSAL),
    "partly future": (run(2), run(0), True, None, None, BlockKind.MASKED),
    "diagonal unequal lengths": (run(0, 6), run(0, 4), True, None, None, BlockKind.MASKED),
    "non-causal future": (run(0), run(4), False, None, None, BlockKind.FULL),
    "non-causal diagonal": (run(4), run(4), False, None, None, BlockKind.FULL),
    "documents split diagonal": (run(0), run(0), True, ids(0, 0, 1, 1), ids(0, 0, 1, 1), BlockKind.MASKED),
    "documents split past": (run(4), run(0), True, ids(1, 1, 2, 2), ids(0, 0, 1, 1), BlockKind.MASKED),
    "documents split non-causal": (run(0), run(4), False, ids(0, 0, 0, 1), ids(1, 1, 2, 2), BlockKind.MASKED),
    "documents hide past": (run(4), run(0), True, ids(1, 1, 2, 2), ids(0, 0, 0, 0), BlockKind.EMPTY),
    "documents hide non-causal": (run(0), run(4), False, ids(0, 0, 0, 0), ids(1, 1, 1, 1), BlockKind.EMPTY),
    "one document past": (run(4), run(0), True, ids(3, 3, 3, 3), ids(3, 3, 3, 3), BlockKind.FULL),
    "one document diagonal": (run(4), run(4), True, ids(3, 3, 3, 3), ids(3, 3, 3, 3), BlockKind.CAUSAL),
    "documents only in the future": (
        run(4),
        run(0),
        True,
        ids(0, 0, 1, 1),
        ids(0, 0, 1, 1),
        BlockKind.MASKED,
    ),
    "zigzag 0x0": (ZIGZAG[0], ZIGZAG[0], True, None, None, BlockKind.CAUSAL),
    "zigzag 0x1": (ZIGZAG[0], ZIGZAG[1], True, None, None, BlockKind.EMPTY),
    "zigzag 0x3": (ZIGZAG[0], ZIGZAG[3], True, None, None, BlockKind.EMPTY),
    "zigzag 3x0": (ZIGZAG[3], ZIGZAG[0], True, None, None, BlockKind.FULL),
    "zigzag 3x2": (ZIGZAG[3], ZIGZAG[2], True, None, None, BlockKind.FULL),
    "zigzag 3x3": (ZIGZAG[3], ZIGZAG[3], True, None, None, BlockKind.CAUSAL),
    "zigzag rank 0 x rank 1": (
        torch.cat([ZIGZAG[0], ZIGZAG[3]]),
        torch.cat([ZIGZAG[1], ZIGZAG[2]]),
        True,
        None,
        None,
        BlockKind.MASKED,
    ),
    # same positions but not one contiguous run: lower-triangular, still MASKED by definition of CAUSAL
    "zigzag rank 0 x itself": (
        torch.cat([ZIGZAG[0], ZIGZAG[3]]),
        torch.cat([ZIGZAG[0], ZIGZAG[3]]),
        True,
        None,
        None,
        BlockKind.MASKED,
    ),
    "zigzag non-causal": (
        torch.cat([ZIGZAG[0], ZIGZAG[3]]),
        torch.cat([ZIGZAG[1], ZIGZAG[2]]),
        False,
        None,
        None,
        BlockKind.FULL,
    ),
    "documents hide causal but not future": (ids(5), ids(3, 6), True, ids(1), ids(0, 1), BlockKind.EMPTY),
    "no keys": (run(0), run(0, 0), True, None, None, BlockKind.EMPTY),
}


@pytest.mark.parametrize("case", list(CLASSIFY_CASES))
def test_classify_block_cases(case):
    q_pos, k_pos, causal, q_doc, k_doc, expected = CLASSIFY_CASES[case]
    assert classify_block(q_pos, k_pos, causal=causal, q_doc=q_doc, k_doc=k_doc) is expected
    mask = block_mask(q_pos, k_pos, causal=causal, q_doc=q_doc, k_doc=k_doc)
    if expected is BlockKind.FULL:
        assert mask is None
    else:
        assert torch.equal(mask, allowed_mask(q_pos, k_pos, causal, q_doc, k_doc))


def random_positions(gen, max_start=24, max_len=9):
    def randint(low, high):
        return int(torch.randint(low, high, (), generator=gen))

    pieces = [run(randint(0, max_start), randint(1, max_len)) for _ in range(randint(1, 3))]
    return torch.cat(pieces)


def test_classify_block_agrees_with_mask_property():
    gen = torch.Generator().manual_seed(1234)
    seen = set()
    for trial in range(600):
        q_pos = random_positions(gen)
        k_pos = q_pos.clone() if trial % 3 == 0 else random_positions(gen)
        causal = trial % 4 != 3
        q_doc = k_doc = None
        if trial % 5 in (1, 2):  # packed documents: ids increase with position
            starts = torch.unique(torch.cat([ids(0), torch.randint(1, 34, (3,), generator=gen)]))
            q_doc, k_doc = doc_ids_from(starts, q_pos), doc_ids_from(starts, k_pos)
        elif trial % 5 == 3:  # arbitrary ids
            q_doc = torch.randint(0, 3, (len(q_pos),), generator=gen)
            k_doc = torch.randint(0, 3, (len(k_pos),), generator=gen)

        kind = classify_block(q_pos, k_pos, causal=causal, q_doc=q_doc, k_doc=k_doc)
        mask = allowed_mask(q_pos, k_pos, causal, q_doc, k_doc)
        same_run = torch.equal(q_pos, k_pos) and bool((torch.diff(q_pos) == 1).all())
        is_diagonal = same_run and torch.equal(mask, torch.ones_like(mask).tril())
        assert (kind is BlockKind.EMPTY) == (not mask.any()), (q_pos, k_pos, causal, q_doc, k_doc)
        assert (kind is BlockKind.FULL) == bool(mask.all()), (q_pos, k_pos, causal, q_doc, k_doc)
        assert (kind is BlockKind.CAUSAL) == (is_diagonal and not mask.all()), (q_pos, k_pos, causal)
        got_mask = block_mask(q_pos, k_pos, causal=causal, q_doc=q_doc, k_doc=k_doc)
        assert (got_mask is None) == (kind is BlockKind.FULL)
        if got_mask is not None:
            assert torch.equal(got_mask, mask)
        seen.add(kind)
    assert seen == set(BlockKind)


def doc_ids_from(starts, pos):
    return torch.searchsorted(starts, pos, right=True) - 1


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["mha", "gqa2"])
def test_fully_masked_rows_are_zero_with_finite_grads(heads, kv_heads):
    dtype = torch.float64
    q, k, v, dout, dlse = make_inputs(8, heads, kv_heads, dtype)
    q_pos, k_pos = torch.arange(8), torch.arange(4, 12)  # queries 0..3 precede every key
    q_doc = ids(0, 0, 0, 0, 1, 1, 2, 2)  # query 6, 7 (doc 2) see no key either
    k_doc = ids(1, 1, 1, 1, 1, 1, 1, 1)
    empty, alive = [0, 1, 2, 3, 6, 7], [4, 5]

    out, lse = block_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc)
    assert torch.equal(out[:, empty], torch.zeros_like(out[:, empty]))
    assert torch.isneginf(lse[:, :, empty]).all()
    mask = allowed_mask(q_pos, k_pos, True, q_doc, k_doc)
    ref_out, ref_lse = reference_attention(q[:, alive], k, v, mask[alive])
    check("out", out[:, alive], ref_out, dtype)
    check("lse", lse[:, :, alive], ref_lse, dtype)

    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    grads = torch.autograd.grad((out * dout).sum() + (finite_lse * dlse).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * dout[:, alive]).sum() + (ref_lse * dlse[:, :, alive]).sum(), (q, k, v))
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert torch.isfinite(grad).all(), name
        check(name, grad, ref_grad, dtype)

    dq, dk, dv = block_attention_backward(
        dout,
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        q_pos=q_pos,
        k_pos=k_pos,
        q_doc=q_doc,
        k_doc=k_doc,
    )
    ref_out, _ = reference_attention(q[:, alive], k, v, mask[alive])
    ref_dq, ref_dk, ref_dv = torch.autograd.grad((ref_out * dout[:, alive]).sum(), (q, k, v))
    check("dq", dq, ref_dq, dtype)
    check("dk", dk, ref_dk, dtype)
    check("dv", dv, ref_dv, dtype)


def test_empty_block_and_empty_merge_are_nan_free():
    dtype = torch.float64
    q, k, v, dout, dlse = make_inputs(6, 4, 2, dtype)
    out, lse = block_attention(q, k, v, q_pos=torch.arange(6), k_pos=torch.arange(10, 16))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    (dq,) = torch.autograd.grad((out * dout).sum(), (q,))
    assert torch.equal(dq, torch.zeros_like(dq))

    out_a = out.detach().clone().requires_grad_()
    lse_a = lse.detach().clone().requires_grad_()
    out_b = torch.randn_like(out_a).requires_grad_()
    lse_b = lse.detach().clone()
    lse_b[:, :, 3:] = torch.randn(lse_b[:, :, 3:].shape, dtype=dtype)  # rows 0..2 empty on both sides
    lse_b.requires_grad_()
    merged_out, merged_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.equal(merged_out[:, :3], torch.zeros_like(merged_out[:, :3]))
    assert torch.isneginf(merged_lse[:, :, :3]).all()
    check("out", merged_out[:, 3:], out_b[:, 3:], dtype)
    check("lse", merged_lse[:, :, 3:], lse_b[:, :, 3:], dtype)
    finite_lse = torch.where(torch.isfinite(merged_lse), merged_lse, 0.0)
    grads = torch.autograd.grad((merged_out * dout).sum() + (finite_lse * dlse).sum(), (out_a, lse_a, out_b, lse_b))
    for grad in grads:
        assert torch.isfinite(grad).all()


def test_in_place_merge_matches_merge():
    gen = torch.Generator().manual_seed(7)
    outs = [torch.randn(2, 5, 3, 4, generator=gen) for _ in range(3)]
    lses = [torch.randn(2, 3, 5, generator=gen) * 10 for _ in range(3)]
    lses[1][:, :, :2] = float("-inf")
    out, lse = merge_attention(*merge_attention(outs[0], lses[0], outs[1], lses[1]), outs[2], lses[2])
    acc_out, acc_lse = None, None
    for part_out, part_lse in zip(outs, lses, strict=True):
        acc_out, acc_lse = merge_attention_(acc_out, acc_lse, part_out, part_lse)
    assert acc_out is not outs[0]  # the first partial is copied, never aliased
    check("out", acc_out, out, torch.float32)
    check("lse", acc_lse, lse, torch.float32)


def shapes(**overrides):
    shape = {"q": (2, 5, 4, 8), "k": (2, 5, 2, 8), "v": (2, 5, 2, 8)}
    shape.update(overrides)
    return {name: torch.randn(*size, dtype=torch.float64) for name, size in shape.items()}


@pytest.mark.parametrize(
    "tensors,kwargs,match",
    [
        (shapes(q=(2, 5, 3, 8)), {}, r"heads=3, kv_heads=2"),
        (shapes(k=(3, 5, 2, 8), v=(3, 5, 2, 8)), {}, r"batch mismatch: q batch=2, k/v batch=3"),
        (shapes(k=(2, 5, 2, 4), v=(2, 5, 2, 4)), {}, r"head_dim mismatch: q head_dim=8, k/v head_dim=4"),
        (shapes(v=(2, 6, 2, 8)), {}, r"k and v must have the same shape"),
        (shapes(), {"q_pos": torch.arange(4)}, r"q_pos=4 vs Tq=5"),
        (shapes(), {"k_pos": torch.arange(6)}, r"k_pos=6 vs Tk=5"),
        (shapes(), {"q_pos": torch.arange(5.0)}, r"q_pos must be a 1-D integer tensor"),
        (shapes(), {"q_doc": torch.zeros(5, dtype=torch.long)}, r"q_doc and k_doc must be given together"),
        (
            shapes(),
            {"q_doc": torch.zeros(4, dtype=torch.long), "k_doc": torch.zeros(5, dtype=torch.long)},
            r"document ids must match positions",
        ),
    ],
    ids=["heads", "batch", "head_dim", "kv_length", "q_pos", "k_pos", "float_pos", "one_doc", "doc_length"],
)
def test_block_attention_rejects_bad_inputs(tensors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_attention(tensors["q"], tensors["k"], tensors["v"], **kwargs)


def test_dtype_mismatch_is_rejected():
    tensors = shapes()
    with pytest.raises(ValueError, match=r"q=torch.float64 k=torch.float32 v=torch.float64"):
        block_attention(tensors["q"], tensors["k"].float(), tensors["v"])


def test_backward_and_merge_reject_bad_shapes():
    t = shapes()
    q, k, v = t["q"], t["k"], t["v"]
    out, lse = block_attention(q, k, v)
    with pytest.raises(ValueError, match=r"lse must be \[B, H, Tq\]"):
        block_attention_backward(out, q, k, v, out, lse[:, :2])
    with pytest.raises(ValueError, match=r"dout and out must have the shape of q"):
        block_attention_backward(out[:, :3], q, k, v, out, lse)
    with pytest.raises(ValueError, match=r"outputs must both be \[B, T, H, D\] of one shape"):
        merge_attention(out, lse, out[:, :3], lse)
    with pytest.raises(ValueError, match=r"lse must be \[B, H, T\]"):
        merge_attention(out, lse, out, lse[:, :2])
    with pytest.raises(ValueError, match=r"acc_out and acc_lse must both be None"):
        merge_attention_(out, None, out, lse)
