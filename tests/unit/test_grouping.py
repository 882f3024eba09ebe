"""``data.group_by_length``: each step's samples have one document-length profile, every window is a permutation of
its samples, the order is fixed by the seed, and a loader resumed from its state reads what an unbroken one does."""

from __future__ import annotations

import pytest
import torch

from distseq.config import ConfigError, RunConfig, from_dict
from distseq.data import LengthGroupedOrder, ShardedLoader, TokenFileSource, TokenFileWriter
from distseq.data.grouping import attention_pairs
from distseq.parallel.layout import SequenceLayout

SEQ = 16
#: per sample: one 16-token document ("long") or four of 4 tokens ("short"); each window of 8 holds four of each
KINDS = "LSSLSLLS" + "SSLLLSSL" + "LSLSLSLS"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> TokenFileSource:
    path = tmp_path_factory.mktemp("grouping") / "mixed"
    token = 0
    with TokenFileWriter(path, vocab_size=97, tokenizer="test", eos_id=None) as writer:
        for kind in KINDS:
            for _ in range(1 if kind == "L" else 4):
                writer.append([(token + i) % 97 for i in range(SEQ if kind == "L" else 4)])
                writer.end_document()
                token += 1
    return TokenFileSource(path, SEQ, documents=True)


def _kind(source: TokenFileSource, index: int) -> str:
    return "L" if attention_pairs(source.cu_seqlens(index)) == SEQ * (SEQ + 1) // 2 else "S"


def test_every_step_takes_samples_of_one_profile(source):
    assert "".join(_kind(source, i) for i in range(len(KINDS))) == KINDS
    order = LengthGroupedOrder(source, global_batch=4, window=8, seed=0)
    for window in range(3):
        positions = range(8 * window, 8 * window + 8)
        read = [order(i) for i in positions]
        assert sorted(read) == list(positions), "a window is a permutation of its samples"
        steps = [{_kind(source, i) for i in read[:4]}, {_kind(source, i) for i in read[4:]}]
        assert sorted(map(sorted, steps)) == [["L"], ["S"]], (window, read)


def test_the_order_is_fixed_by_the_seed(source):
    def orders(seed):
        order = LengthGroupedOrder(source, global_batch=2, window=24, seed=seed)
        return [order(i) for i in range(24)]

    assert orders(3) == orders(3)
    assert len({tuple(orders(seed)) for seed in range(6)}) > 1, "the seed draws the order of the steps"


def test_a_resumed_loader_reads_what_an_unbroken_one_does(source):
    layout = SequenceLayout("zigzag", SEQ, 2, 1)

    def loader():
        order = LengthGroupedOrder(source, global_batch=4, window=8, seed=5)
        return ShardedLoader(source, global_batch=4, micro_batch=1, layout=layout, dp=2, dp_rank=1, order=order)

    unbroken = loader()
    want = [unbroken.next_step() for _ in range(5)]
    first = loader()
    for _ in range(3):
        first.next_step()
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    for step in want[3:]:
        got = resumed.next_step()
        assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(got, step, strict=True))
        assert all(torch.equal(a.cu_seqlens, b.cu_seqlens) for a, b in zip(got, step, strict=True))


def test_the_config_checks_the_grouping():
    def data(**keys):
        return from_dict(RunConfig, {"data": {"source": "tokens", "path": "x", **keys}})

    with pytest.raises(ConfigError, match="data.group_by_length needs data.pack_documents"):
        data(group_by_length=True)
    with pytest.raises(ConfigError, match="group_window=12 must be a positive multiple of global_batch=8"):
        data(pack_documents=True, group_by_length=True, group_window=12)
    assert data(pack_documents=True, group_by_length=True).data.grouping_window == 64
    with pytest.raises(ValueError, match="window must be a positive multiple of global_batch: window=6"):
        LengthGroupedOrder(None, global_batch=4, window=6, seed=0)
