"""The data pipeline without process groups: recall task, token files, prepare, and the sharded loader."""

from __future__ import annotations

import argparse
import importlib
import json
import pickle
import sys
import types

import pytest
import torch

from distseq.data import (
    RecallTask,
    ShardedLoader,
    TokenFile,
    TokenFileSource,
    TokenFileWriter,
    layout_spans,
    token_dtype,
)
from distseq.data.prepare import BYTE_EOS, BYTE_VOCAB_SIZE, prepare
from distseq.models.hybrid import IGNORE_INDEX
from distseq.parallel.layout import SequenceLayout

KINDS = ["contiguous", "zigzag"]


def write_documents(path, documents: list[list[int]], vocab_size: int = 1000) -> TokenFile:
    with TokenFileWriter(path, vocab_size=vocab_size, tokenizer="test", eos_id=None) as writer:
        for doc in documents:
            writer.append(doc)
            writer.end_document()
    return TokenFile(path)


def random_documents(seed: int, lengths: list[int], vocab_size: int = 1000) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab_size, (n,), generator=gen).tolist() for n in lengths]


def reference_sample(documents: list[list[int]], seq_len: int, index: int, packed: bool):
    """Sample ``index`` computed from the plain token list: (ids, labels, cu_seqlens or None)."""
    tokens = [t for doc in documents for t in doc]
    starts, offset = set(), 0
    for doc in documents:
        starts.add(offset)
        offset += len(doc)
    base = index * seq_len
    ids = tokens[base : base + seq_len]
    labels = []
    for p in range(base, base + seq_len):
        ends_document = packed and (p + 1) in starts
        labels.append(tokens[p + 1] if p + 1 < len(tokens) and not ends_document else IGNORE_INDEX)
    cu = None
    if packed:
        cu = [0] + sorted(s - base for s in starts if base < s < base + seq_len) + [seq_len]
    return ids, labels, cu


class RecordingTokenFile(TokenFile):
    """A TokenFile that remembers every token range read."""

    def __init__(self, path):
        super().__init__(path)
        self.ranges: list[tuple[int, int]] = []

    def read(self, start: int, end: int) -> torch.Tensor:
        self.ranges.append((start, end))
        return super().read(start, end)


def test_recall_is_deterministic_per_seed_and_index():
    task = RecallTask(64, 256, seed=3)
    ids, labels = task.generate(5)
    again = RecallTask(64, 256, seed=3).generate(5)
    assert torch.equal(ids, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(ids, task.generate(6)[0])
    assert not torch.equal(ids, RecallTask(64, 256, seed=4).generate(5)[0])
    # Generating other samples in between changes nothing: sample i depends only on (seed, i).
    task.generate(0)
    assert torch.equal(task.generate(5)[0], ids)


@pytest.mark.parametrize("num_pairs,num_queries", [(8, None), (4, 2), (1, 1)])
def test_recall_answers_are_recoverable_and_only_answers_have_labels(num_pairs, num_queries):
    task = RecallTask(48, 100, num_pairs=num_pairs, num_queries=num_queries, num_keys=20, num_values=16, seed=1)
    for index in range(20):
        ids, labels = task.generate(index)
        keys, values = ids[0 : 2 * num_pairs : 2], ids[1 : 2 * num_pairs : 2]
        assert len(set(keys.tolist())) == num_pairs and bool((keys < 20).all())
        assert bool(((values >= 20) & (values < 36)).all())
        assert bool((ids[2 * num_pairs : task.answer_positions[0]] >= 36).all())  # filler only between
        answered = torch.nonzero(labels != IGNORE_INDEX).flatten()
        assert answered.tolist() == task.answer_positions.tolist()
        assert len(answered) == task.num_queries
        asked = ids[answered]
        assert len(set(asked.tolist())) == len(asked)
        for q in answered.tolist():
            pair = keys.tolist().index(ids[q].item())
            assert labels[q] == values[pair]
            assert labels[q] == ids[q + 1]  # the label is the next token, as for any LM sample
    assert task.chance_accuracy == pytest.approx(1 / 16)


def test_recall_with_a_pair_count_per_sample():
    task = RecallTask(32, 100, num_pairs=8, num_queries=6, num_keys=20, num_values=16, min_pairs=2, seed=1)
    seen = set()
    for index in range(200):
        ids, labels = task.generate(index)
        answered = torch.nonzero(labels != IGNORE_INDEX).flatten().tolist()
        pairs = next(p for p in range(8, 0, -1) if bool((ids[0 : 2 * p : 2] < 20).all()))
        seen.add(pairs)
        assert len(answered) == min(6, pairs)
        assert answered == list(range(32 - 2 * len(answered), 32, 2)), "queries fill the end"
        keys, values = ids[0 : 2 * pairs : 2].tolist(), ids[1 : 2 * pairs : 2]
        for q in answered:
            assert labels[q] == values[keys.index(ids[q].item())] == ids[q + 1]
    assert seen == set(range(2, 9)), "every pair count in [min_pairs, num_pairs] occurs"
    assert torch.equal(task.generate(7)[0], task.generate(7)[0])
    with pytest.raises(ValueError, match="differ by sample"):
        _ = task.answer_positions
    with pytest.raises(ValueError, match="min_pairs=9, num_pairs=8"):
        RecallTask(32, 100, num_pairs=8, num_keys=20, min_pairs=9)


@pytest.mark.parametrize("sp", [2, 4, 8])
def test_recall_pairs_and_queries_on_different_contiguous_ranks(sp):
    task = RecallTask(64, 256, num_pairs=4, num_queries=3)
    pair_ranks = {p * sp // 64 for p in range(2 * task.num_pairs)}
    query_ranks = {int(p) * sp // 64 for p in task.answer_positions}
    assert pair_ranks == {0} and query_ranks == {sp - 1}


def test_recall_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"vocab_size >= num_keys \+ num_values \+ 1 = 81 .*vocab_size=80"):
        RecallTask(64, 80)
    with pytest.raises(ValueError, match="num_pairs=2, num_queries=3"):
        RecallTask(64, 256, num_pairs=2, num_queries=3)
    with pytest.raises(ValueError, match="2\\*num_pairs=16 .* seq_len=16"):
        RecallTask(16, 256, num_pairs=8)
    RecallTask(16, 256, num_pairs=4)  # 8 pair tokens in the first half, 8 query tokens in the second


def test_prepare_byte_round_trip(tmp_path):
    texts = {"a.txt": "hello world\nsecond line\n", "b.txt": "", "c.txt": "naïve café — ünïcode ✓"}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    files = [tmp_path / name for name in texts]
    token_file = prepare(files, tmp_path / "out" / "corpus")
    assert (token_file.vocab_size, token_file.dtype, token_file.eos_id) == (BYTE_VOCAB_SIZE, "uint16", BYTE_EOS)
    tokens = token_file.read(0, token_file.num_tokens).tolist()
    # Decoding: the bytes of each document, each followed by the separator; the empty file is skipped.
    expected = [t for text in texts.values() if text for t in [*text.encode(), BYTE_EOS]]
    assert tokens == expected
    docs = bytes(t if t != BYTE_EOS else 0 for t in tokens).split(b"\0")[:-1]
    assert [d.decode("utf-8") for d in docs] == [t for t in texts.values() if t]
    offsets = token_file.document_offsets(0, token_file.num_tokens + 1).tolist()
    assert offsets == [0, len(texts["a.txt"].encode()) + 1, token_file.num_tokens]
    meta = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert meta["num_documents"] == 2 and meta["tokenizer"] == "byte"
    assert (tmp_path / "out" / "corpus.bin").stat().st_size == 2 * token_file.num_tokens
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_prepare_lines_jsonl_directories_and_no_eos(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "lines.txt").write_text("one\n\ntwo\r\nthree")
    (tmp_path / "docs" / "records.jsonl").write_text(json.dumps({"text": "four"}) + "\n\n" + '{"text": "five"}\n')
    token_file = prepare([tmp_path / "docs"], tmp_path / "out", eos=False, split_lines=True)
    tokens = token_file.read(0, token_file.num_tokens).tolist()
    assert bytes(tokens) == b"onetwothreefourfive"
    assert token_file.document_offsets(0, 100).tolist() == [0, 3, 6, 11, 15, 19]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no string field 'text'"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "bad")
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt9'"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "bad", tokenizer="gpt9")


def test_prepare_empty_input_writes_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="every input document was empty"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def test_prepare_hf_tokenizer_through_tokenizers_package(tmp_path, monkeypatch):
    class FakeTokenizer:
        """Stands in for tokenizers.Tokenizer: one token per word, EOS '</s>' = 0."""

        vocab = {"</s>": 0, "hello": 1, "world": 2}

        @classmethod
        def from_file(cls, path):
            assert path.endswith("tokenizer.json")
            return cls()

        def token_to_id(self, name):
            return self.vocab.get(name)

        def get_vocab_size(self, with_added_tokens):
            return len(self.vocab)

        def encode(self, text, add_special_tokens):
            return types.SimpleNamespace(ids=[self.vocab[w] for w in text.split()])

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "a.txt").write_text("hello world hello")
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=FakeTokenizer))
    token_file = prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=f"hf:{tmp_path / 'tok'}")
    assert token_file.read(0, token_file.num_tokens).tolist() == [1, 2, 1, 0]
    assert token_file.vocab_size == 3 and token_file.tokenizer == f"hf:{(tmp_path / 'tok').resolve()}"


def test_prepare_hf_tokenizer_without_packages_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="needs the `tokenizers` package"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=f"hf:{tmp_path}")


@pytest.mark.parametrize(
    "vocab_size,dtype", [(2, "uint16"), (257, "uint16"), (65536, "uint16"), (65537, "uint32"), (2**32, "uint32")]
)
def test_token_dtype(vocab_size, dtype):
    assert token_dtype(vocab_size) == dtype


def test_uint32_round_trip_and_vocabulary_check(tmp_path):
    documents = [[0, 65535, 65536, 69999], [12345]]
    token_file = write_documents(tmp_path / "wide", documents, vocab_size=70000)
    assert token_file.dtype == "uint32"
    assert token_file.read(0, 5).tolist() == [0, 65535, 65536, 69999, 12345]
    assert (tmp_path / "wide.bin").stat().st_size == 4 * 5
    for bad in (70000, -1):
        with pytest.raises(ValueError, match=f"token id {bad} outside the vocabulary"):
            write_documents(tmp_path / "bad", [[1, bad]], vocab_size=70000)
    with pytest.raises(ValueError, match="token id 300 outside the vocabulary"):
        write_documents(tmp_path / "bad", [[300]], vocab_size=257)
    with pytest.raises(ValueError, match="token id 70000 outside"):
        write_documents(tmp_path / "bad", [[70000]], vocab_size=257)


def test_token_file_pickles_by_path(tmp_path):
    token_file = write_documents(tmp_path / "t", [list(range(100))])
    data = pickle.dumps(TokenFileSource(token_file, 10))
    assert len(data) < 1000  # the path, not the tokens
    assert pickle.loads(data).sample(3, [(0, 10)]).input_ids.tolist() == list(range(30, 40))


def test_token_file_rejects_truncated_files(tmp_path):
    write_documents(tmp_path / "t", [[1, 2, 3, 4]])
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(ValueError, match=r"t.bin should hold 8 bytes .* found 6"):
        TokenFile(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="distseq data prepare"):
        TokenFile(tmp_path / "missing")


# Documents that start and end inside samples, straddle sample boundaries, and one longer than a sample.
LENGTHS = [5, 1, 9, 3, 14, 2, 6]  # 40 tokens


@pytest.mark.parametrize("seq_len", [4, 5, 7, 8, 13])
@pytest.mark.parametrize("packed", [True, False])
def test_token_source_samples_match_reference(tmp_path, seq_len, packed):
    documents = random_documents(0, LENGTHS)
    source = TokenFileSource(write_documents(tmp_path / "d", documents), seq_len, documents=packed)
    assert len(source) == source.num_samples == 40 // seq_len
    for index in range(source.num_samples):
        ids, labels, cu = reference_sample(documents, seq_len, index, packed)
        got = source.sample(index, [(0, seq_len)])
        assert got.input_ids.tolist() == ids
        assert got.labels.tolist() == labels
        assert (got.cu_seqlens.tolist() if packed else got.cu_seqlens) == cu
        # Wrap-around: the next epoch reads the same sample.
        wrapped = source.sample(index + 3 * source.num_samples, [(0, seq_len)])
        assert torch.equal(wrapped.input_ids, got.input_ids) and torch.equal(wrapped.labels, got.labels)


def test_token_source_boundaries_by_hand(tmp_path):
    # Documents [10 11 12] [13 14 15 16 17] [18 19]: samples of 4 tokens.
    source = TokenFileSource(write_documents(tmp_path / "d", [[10, 11, 12], [13, 14, 15, 16, 17], [18, 19]]), 4)
    first = source.sample(0, [(0, 4)])
    assert first.input_ids.tolist() == [10, 11, 12, 13]
    assert first.labels.tolist() == [11, 12, IGNORE_INDEX, 14]  # 12 ends a document
    assert first.cu_seqlens.tolist() == [0, 3, 4]
    second = source.sample(1, [(0, 4)])
    assert second.input_ids.tolist() == [14, 15, 16, 17]
    assert second.labels.tolist() == [15, 16, 17, IGNORE_INDEX]  # 17 ends a document at the sample's end
    assert second.cu_seqlens.tolist() == [0, 4]  # the document crossing the start is cut there
    stream = TokenFileSource(source.file, 4, documents=False).sample(1, [(0, 4)])
    assert stream.labels.tolist() == [15, 16, 17, 18] and stream.cu_seqlens is None
    last = TokenFileSource(source.file, 5).sample(1, [(0, 5)])
    assert last.labels.tolist() == [16, 17, IGNORE_INDEX, 19, IGNORE_INDEX]  # past the end of the file
    with pytest.raises(ValueError, match="has 10 tokens, fewer than one sample of seq_len=11"):
        TokenFileSource(source.file, 11)


def full_layout(seq_len: int) -> SequenceLayout:
    return SequenceLayout("contiguous", seq_len, 1, 0)


def test_loader_splits_steps_over_dp_ranks_and_micro_batches():
    task = RecallTask(32, 128, num_pairs=4)
    loaders = [
        ShardedLoader(task, global_batch=8, micro_batch=2, dp=2, dp_rank=r, layout=full_layout(32), start_sample=5)
        for r in range(2)
    ]
    assert loaders[0].num_micro_batches == 2
    for step in range(2):
        for dp_rank, loader in enumerate(loaders):
            batches = loader.next_step()
            assert len(batches) == 2
            for m, batch in enumerate(batches):
                assert batch.input_ids.shape == batch.labels.shape == (2, 32)
                assert batch.input_ids.dtype == batch.labels.dtype == torch.int64 and batch.cu_seqlens is None
                for row in range(2):
                    index = 5 + 8 * step + 4 * dp_rank + 2 * m + row
                    ids, labels = task.generate(index)
                    assert torch.equal(batch.input_ids[row], ids) and torch.equal(batch.labels[row], labels)
    assert loaders[0].state_dict()["next_sample"] == 5 + 16


def test_loader_rejects_bad_batch_shapes(tmp_path):
    task = RecallTask(32, 128, num_pairs=4)
    with pytest.raises(ValueError, match=r"global_batch=6, dp=4, micro_batch=1, dp\*micro_batch=4"):
        ShardedLoader(task, global_batch=6, micro_batch=1, dp=4, dp_rank=0, layout=full_layout(32))
    with pytest.raises(ValueError, match="global_batch=8, dp=2, micro_batch=3"):
        ShardedLoader(task, global_batch=8, micro_batch=3, dp=2, dp_rank=0, layout=full_layout(32))
    with pytest.raises(ValueError, match="dp=2, dp_rank=2"):
        ShardedLoader(task, global_batch=8, micro_batch=1, dp=2, dp_rank=2, layout=full_layout(32))
    with pytest.raises(ValueError, match="source seq_len=32 differs from layout seq_len=16"):
        ShardedLoader(task, global_batch=8, micro_batch=1, layout=full_layout(16))
    packed = TokenFileSource(write_documents(tmp_path / "d", random_documents(0, LENGTHS)), 8)
    with pytest.raises(ValueError, match="packed documents need micro_batch=1 .* micro_batch=2"):
        ShardedLoader(packed, global_batch=4, micro_batch=2, layout=full_layout(8))
    stream = TokenFileSource(packed.file, 8, documents=False)
    batch = ShardedLoader(stream, global_batch=4, micro_batch=2, layout=full_layout(8)).next_step()[0]
    assert batch.input_ids.shape == (2, 8) and batch.cu_seqlens is None


def test_loader_resumes_at_the_same_global_sample_under_another_split(tmp_path):
    documents = random_documents(1, [7, 30, 4, 11, 50, 9, 17])  # 128 tokens = 16 samples of 8
    source = TokenFileSource(write_documents(tmp_path / "d", documents), 8)
    single = ShardedLoader(source, global_batch=4, micro_batch=1, layout=full_layout(8))
    for _ in range(3):
        single.next_step()
    state = single.state_dict()
    assert state["next_sample"] == 12
    expected = torch.stack([b.input_ids[0] for b in single.next_step()])  # samples 12..15
    for dp_rank in range(2):
        for sp_rank in range(2):
            layout = SequenceLayout("zigzag", 8, 2, sp_rank)
            resumed = ShardedLoader(source, global_batch=4, micro_batch=1, dp=2, dp_rank=dp_rank, layout=layout)
            resumed.load_state_dict(state)
            rows = torch.cat([b.input_ids for b in resumed.next_step()])
            assert torch.equal(rows, layout.shard(expected[2 * dp_rank : 2 * dp_rank + 2], dim=1))
    # 16 samples: step 4 crosses into the second epoch and wraps to sample 0.
    assert single.epoch == 1 and single.steps_per_epoch == 4
    assert torch.equal(single.next_step()[0].input_ids[0], source.sample(0, [(0, 8)]).input_ids)


def test_loader_resume_with_another_seq_len_keeps_the_token_offset(tmp_path):
    source = TokenFileSource(write_documents(tmp_path / "d", random_documents(1, [128])), 4)
    loader = ShardedLoader(source, global_batch=2, micro_batch=1, layout=full_layout(4))
    with pytest.warns(UserWarning, match="seq_len=8, now seq_len=4: continuing at sample 6"):
        loader.load_state_dict({"next_sample": 3, "seq_len": 8})
    assert loader.next_sample == 6


def shard_batches(source, layout: SequenceLayout, steps: int = 2, global_batch: int = 4, micro_batch: int = 1):
    loader = ShardedLoader(source, global_batch=global_batch, micro_batch=micro_batch, layout=layout, start_sample=1)
    return [loader.next_step() for _ in range(steps)]


@pytest.mark.parametrize("sp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source_kind", ["recall", "packed", "stream"])
def test_shards_reassemble_to_the_single_rank_sample(tmp_path, sp, kind, source_kind):
    seq_len = 16
    if source_kind == "recall":
        source = RecallTask(seq_len, 128, num_pairs=2, seed=7)
    else:
        token_file = write_documents(tmp_path / "d", random_documents(2, [3, 20, 5, 1, 30, 9, 8]))
        source = TokenFileSource(token_file, seq_len, documents=source_kind == "packed")
    micro_batch = 1 if source_kind == "packed" else 2
    reference = shard_batches(source, full_layout(seq_len), micro_batch=micro_batch)
    layouts = [SequenceLayout(kind, seq_len, sp, r) for r in range(sp)]
    per_rank = [shard_batches(source, layout, micro_batch=micro_batch) for layout in layouts]
    for step, ref_batches in enumerate(reference):
        for m, ref in enumerate(ref_batches):
            shards = [rank_steps[step][m] for rank_steps in per_rank]
            for field in ("input_ids", "labels"):
                pieces = [getattr(b, field) for b in shards]
                assert all(p.shape == (micro_batch, seq_len // sp) for p in pieces)
                torch.testing.assert_close(layouts[0].unshard(pieces, dim=1), getattr(ref, field), rtol=0, atol=0)
            for b in shards:
                assert (b.cu_seqlens is None) == (ref.cu_seqlens is None)
                if ref.cu_seqlens is not None:
                    assert torch.equal(b.cu_seqlens, ref.cu_seqlens)


@pytest.mark.parametrize("sp", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_rank_reads_only_its_shard(tmp_path, sp, kind):
    seq_len = 16
    write_documents(tmp_path / "d", random_documents(3, [10, 40, 7, 7]))  # 64 tokens: the last label is past EOF
    for sp_rank in range(sp):
        token_file = RecordingTokenFile(tmp_path / "d")
        layout = SequenceLayout(kind, seq_len, sp, sp_rank)
        loader = ShardedLoader(TokenFileSource(token_file, seq_len), global_batch=4, micro_batch=1, layout=layout)
        loader.next_step()
        reads_per_sample = len(layout_spans(layout))
        assert len(token_file.ranges) == 4 * reads_per_sample
        for index in range(4):
            ranges = token_file.ranges[index * reads_per_sample : (index + 1) * reads_per_sample]
            read = [t for start, end in ranges for t in range(start, end)]
            positions = (index * seq_len + layout.positions()).tolist()
            # Exactly the held positions and the label token after each (none past the end of the file).
            assert set(read) == set(positions) | {p + 1 for p in positions if p + 1 < 64}
            assert len(read) == len(set(read))  # touching chunks are read as one range, no token twice


def test_prepare_command_line(tmp_path, capsys):
    prepare_module = importlib.import_module("distseq.data.prepare")  # the package attribute is the function
    (tmp_path / "a.txt").write_text("ab\ncd\n")
    parser = argparse.ArgumentParser()
    prepare_module.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "a.txt"), "--output", str(tmp_path / "out"), "--split-lines", "--no-eos"])
    assert prepare_module.main(args) == 0
    assert "wrote 4 tokens in 2 documents" in capsys.readouterr().out
    assert TokenFile(tmp_path / "out.bin").read(0, 4).tolist() == list(b"abcd")
