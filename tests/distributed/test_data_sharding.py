"""Every (dp, sp) rank loads its own shard; together the ranks hold exactly the single-process global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distseq.data import RecallTask, ShardedLoader, TokenFileSource, TokenFileWriter
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import MeshAxis, ParallelDims

SEQ_LEN = 16
GLOBAL_BATCH = 4
STEPS = 3


def make_source(source_kind: str, path: str | None):
    if source_kind == "recall":
        return RecallTask(SEQ_LEN, 128, num_pairs=2, seed=5)
    return TokenFileSource(path, SEQ_LEN, documents=source_kind == "packed")


def job_union_is_global_batch(source_kind: str, path: str | None, kind: str, dp: int, sp: int) -> None:
    dims = ParallelDims(dp=dp, sp=sp, world_size=dist.get_world_size())
    coords = dims.coords(dist.get_rank())
    source = make_source(source_kind, path)
    micro_batch = 1 if source.has_documents else GLOBAL_BATCH // dp  # all of a rank's rows at once
    layout = SequenceLayout(kind, SEQ_LEN, sp, coords[MeshAxis.SP])
    loader = ShardedLoader(
        source,
        global_batch=GLOBAL_BATCH,
        micro_batch=micro_batch,
        dp=dp,
        dp_rank=coords[MeshAxis.DP],
        layout=layout,
        start_sample=3,
    )
    mine = [loader.next_step() for _ in range(STEPS)]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (coords[MeshAxis.DP], coords[MeshAxis.SP], mine))

    reference = ShardedLoader(
        source, global_batch=GLOBAL_BATCH, micro_batch=1, layout=SequenceLayout(kind, SEQ_LEN, 1, 0), start_sample=3
    )
    by_coords = {(d, s): steps for d, s, steps in gathered}
    assert sorted(by_coords) == [(d, s) for d in range(dp) for s in range(sp)]
    for step in range(STEPS):
        expected = reference.next_step()  # one sample per micro-batch, GLOBAL_BATCH of them
        for field in ("input_ids", "labels"):
            rows = []
            for d in range(dp):
                shards = [torch.cat([getattr(b, field) for b in by_coords[d, s][step]]) for s in range(sp)]
                rows.append(layout.unshard(shards, dim=1))
            want = torch.cat([getattr(b, field) for b in expected])
            torch.testing.assert_close(torch.cat(rows), want, rtol=0, atol=0)
        for d in range(dp):
            for s in range(sp):
                got = [b.cu_seqlens for b in by_coords[d, s][step]]
                want = [b.cu_seqlens for b in expected[d * GLOBAL_BATCH // dp : (d + 1) * GLOBAL_BATCH // dp]]
                if source.has_documents:
                    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
                else:
                    assert all(g is None for g in got)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus"
    gen = torch.Generator().manual_seed(0)
    with TokenFileWriter(path, vocab_size=500, tokenizer="test", eos_id=None) as writer:
        for length in [5, 23, 2, 40, 11, 17, 1, 30, 9, 26]:  # 164 tokens: 10 samples, so the loader wraps
            writer.append(torch.randint(500, (length,), generator=gen).tolist())
            writer.end_document()
    return str(path)


@pytest.mark.parametrize("source_kind", ["recall", "packed", "stream"])
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
def test_dp2_sp2_union_is_global_batch(worlds, token_file, source_kind, kind):
    worlds(4).run(job_union_is_global_batch, source_kind, token_file, kind, 2, 2, timeout=120)


@pytest.mark.parametrize("dp,sp", [(1, 4), (4, 1)])
def test_other_splits_union_is_global_batch(worlds, token_file, dp, sp):
    worlds(4).run(job_union_is_global_batch, "packed", token_file, "zigzag", dp, sp, timeout=120)
