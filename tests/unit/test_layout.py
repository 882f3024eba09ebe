"""SequenceLayout rank arithmetic as pure functions: chunks, positions, shard/unshard, documents."""

from __future__ import annotations

import pytest
import torch

from distseq.parallel.layout import SequenceLayout


def layouts(kind: str, seq_len: int, sp: int, cu_seqlens=None) -> list[SequenceLayout]:
    return [SequenceLayout(kind, seq_len, sp, r, cu_seqlens) for r in range(sp)]


@pytest.mark.parametrize("sp", [1, 2, 3, 4])
def test_chunks_and_positions(sp):
    n = 8 * sp * 3
    for r, lay in enumerate(layouts("contiguous", n, sp)):
        assert lay.chunks() == [r]
        assert lay.positions().tolist() == list(range(r * n // sp, (r + 1) * n // sp))
    c = n // (2 * sp)
    for r, lay in enumerate(layouts("zigzag", n, sp)):
        assert lay.chunks() == [r, 2 * sp - 1 - r]
        expected = list(range(r * c, (r + 1) * c)) + list(range((2 * sp - 1 - r) * c, (2 * sp - r) * c))
        assert lay.positions().tolist() == expected
        assert [ch.local_slice for ch in lay.local_chunks()] == [slice(0, c), slice(c, 2 * c)]


def test_zigzag_example_from_the_design():
    # 2P = 8 chunks of 2 tokens over P = 4 ranks: rank 0 holds chunks 0 and 7, rank 3 holds chunks 3 and 4.
    lay = layouts("zigzag", 16, 4)
    assert lay[0].positions().tolist() == [0, 1, 14, 15]
    assert lay[3].positions().tolist() == [6, 7, 8, 9]
    assert lay[0].global_order().tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("sp", [1, 2, 4])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_shard_unshard_round_trip(kind, sp, dim):
    n = 4 * sp * 5
    shape = [3, 2, 5]
    shape[dim] = n
    x = torch.randn(shape)
    lays = layouts(kind, n, sp)
    shards = [lay.shard(x, dim) for lay in lays]
    for lay, s in zip(lays, shards, strict=True):
        assert s.shape[dim] == n // sp
        # The shard is x indexed by the layout's positions.
        torch.testing.assert_close(s, x.index_select(dim % x.dim(), lay.positions()), rtol=0, atol=0)
    torch.testing.assert_close(lays[0].unshard(shards, dim), x, rtol=0, atol=0)
    # The concatenated shards are x permuted by global_order().
    torch.testing.assert_close(torch.cat(shards, dim), x.index_select(dim % x.dim(), lays[0].global_order()))


def test_every_token_held_exactly_once():
    for kind in ("contiguous", "zigzag"):
        for sp in (1, 2, 3, 4, 8):
            order = SequenceLayout(kind, 16 * sp, sp, 0).global_order()
            assert sorted(order.tolist()) == list(range(16 * sp))


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_documents_crossing_ranks(kind):
    # Odd document lengths; documents start and end inside chunks and span rank boundaries.
    n, sp = 48, 4
    cu = torch.tensor([0, 5, 6, 19, 31, 47, 48])
    doc_of = torch.repeat_interleave(torch.arange(6), cu[1:] - cu[:-1])
    for lay in layouts(kind, n, sp, cu):
        pos = lay.positions()
        assert lay.document_ids().tolist() == doc_of[pos].tolist()
        starts = lay.document_starts()
        assert starts.tolist() == [p in set(cu[:-1].tolist()) for p in pos.tolist()]
    # Document 3 (positions 19..30) is spread over more than one rank in both layouts.
    holders = {r for r, lay in enumerate(layouts(kind, n, sp, cu)) if (lay.document_ids() == 3).any()}
    assert len(holders) >= 2


def test_cu_seqlens_as_list_and_single_document():
    lay = SequenceLayout("zigzag", 8, 2, 1, [0, 8])
    assert lay.document_ids().tolist() == [0, 0, 0, 0]
    assert lay.document_starts().tolist() == [False, False, False, False]
    assert SequenceLayout("contiguous", 8, 2, 0).document_ids() is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("zigzag", 12, 4, 0), r"zigzag layout needs seq_len divisible by 8 \(2\*sp\): seq_len=12, sp=4"),
        (
            ("contiguous", 10, 4, 0),
            r"contiguous layout needs seq_len divisible by 4 \(sp\): seq_len=10, sp=4",
        ),
        (("diagonal", 8, 2, 0), r"unknown layout kind 'diagonal'"),
        (("zigzag", 8, 2, 2), r"sp_rank must be in \[0, 2\), got 2"),
        (("zigzag", 8, 0, 0), r"sp_size must be >= 1, got 0"),
    ],
)
def test_bad_layout_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        SequenceLayout(*args)


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        ([1, 8], r"start at 0 and end at seq_len=8, got first=1 last=8"),
        ([0, 7], r"start at 0 and end at seq_len=8, got first=0 last=7"),
        ([0, 4, 4, 8], r"strictly increasing .* got 4 then 4 at index 1"),
        ([[0, 8]], r"1-D integer tensor"),
        (torch.tensor([0.0, 8.0]), r"1-D integer tensor"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match=match):
        SequenceLayout("contiguous", 8, 2, 0, cu)


def test_shard_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"shard expects 8 tokens along dim 1, got shape \(2, 6\)"):
        SequenceLayout("contiguous", 8, 2, 0).shard(torch.zeros(2, 6))


def test_document_zigzag_cuts_every_document():
    """Megatron's packed split: each document in 2P chunks, rank r holds chunks r and 2P-1-r of each, in order."""
    docs = [0, 8, 12, 24]  # lengths 8, 4, 12 at P = 2: chunks of 2, 1 and 3 tokens
    lay = layouts("document_zigzag", 24, 2, docs)
    assert lay[0].positions().tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 14, 21, 22, 23]
    assert lay[1].positions().tolist() == [2, 3, 4, 5, 9, 10, 15, 16, 17, 18, 19, 20]
    assert sorted(lay[0].global_order().tolist()) == list(range(24))
    x = torch.arange(24)[None]
    assert torch.equal(lay[0].unshard([lay_r.shard(x) for lay_r in lay]), x)
    assert lay[1].document_starts().nonzero().flatten().tolist() == []  # no document starts on rank 1
    # without documents it is the zigzag layout
    assert (
        SequenceLayout("document_zigzag", 24, 2, 1).positions().tolist()
        == layouts("zigzag", 24, 2)[1].positions().tolist()
    )


def test_document_zigzag_errors_name_the_values():
    with pytest.raises(ValueError, match=r"divisible by 2\*sp = 4 .*\(1, 6\)"):
        SequenceLayout("document_zigzag", 24, 2, 0, [0, 8, 14, 24])
    lay = SequenceLayout("document_zigzag", 24, 2, 0, [0, 8, 12, 24])
    with pytest.raises(ValueError, match="LASP linear attention needs the sequence in 2P .*3 documents"):
        lay.require_uniform_chunks("LASP linear attention")
    SequenceLayout("document_zigzag", 24, 2, 0, [0, 24]).require_uniform_chunks("one document")  # one size


def test_a_strategy_rebinds_to_another_layout_of_the_same_ranks():
    from distseq.parallel.comm import Communicator
    from distseq.parallel.sequence.registry import make_strategy

    ring = make_strategy("ring", Communicator.solo(), SequenceLayout("zigzag", 16, 1, 0))
    longer = ring.with_layout(SequenceLayout("document_zigzag", 64, 1, 0))
    assert longer.layout.seq_len == 64 and longer.comm is ring.comm and ring.layout.seq_len == 16
    with pytest.raises(ValueError, match=r"with_layout keeps the ranks \(sp_rank 0 of 1\), got sp_rank 0 of 2"):
        ring.with_layout(SequenceLayout("zigzag", 16, 2, 0))


def test_chunk_owners_and_neighbours():
    # zigzag over 3 ranks: chunks 0..5 held by 0 1 2 2 1 0
    lay = layouts("zigzag", 24, 3)
    assert lay[0].chunk_owners() == [0, 1, 2, 2, 1, 0]
    assert lay[0].chunk_neighbours(0) == [(0, None, 1), (5, 1, None)]
    assert lay[0].chunk_neighbours(2) == [(2, 1, 2), (3, 2, 1)]
    assert SequenceLayout("contiguous", 24, 3, 0).chunk_neighbours(1) == [(1, 0, 2)]
