"""The per-batch softmax strategy choice (``distseq.plan.batch``): causal pairs per rank pair from chunk spans and
documents, the predicted times against numbers worked out by hand, the choice flipping between one long document
and many short ones, and the config's checks."""

from __future__ import annotations

import json

import pytest
import torch

from distseq.config import ConfigError, RunConfig, from_dict
from distseq.parallel.layout import SequenceLayout
from distseq.plan.batch import SoftmaxBatchChooser, SoftmaxShape, softmax_batch_seconds
from distseq.plan.profiles import load_profile


def _brute_pairs(layout: SequenceLayout, q_rank: int, k_rank: int) -> int:
    q, k = layout.for_rank(q_rank).positions(), layout.for_rank(k_rank).positions()
    offsets = torch.tensor(layout.doc_offsets or (0, layout.seq_len))
    q_doc = torch.searchsorted(offsets, q, right=True)
    k_doc = torch.searchsorted(offsets, k, right=True)
    return int(((k[None, :] <= q[:, None]) & (q_doc[:, None] == k_doc[None, :])).sum())


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize(
    "docs", [None, [0, 3, 9, 24, 32], [0, 1, 31, 32], [0, 16, 32]], ids=["one", "mixed", "edges", "half"]
)
def test_causal_pairs_count_every_pair_inside_a_document(kind, p, docs):
    layout = SequenceLayout(kind, 32, p, 0, docs)
    for q_rank in range(p):
        for k_rank in range(p):
            assert layout.causal_pairs(q_rank, k_rank) == _brute_pairs(layout, q_rank, k_rank), (q_rank, k_rank)
    lengths = [b - a for a, b in zip(docs[:-1], docs[1:], strict=True)] if docs else [32]
    total = sum(layout.causal_pairs(q, k) for q in range(p) for k in range(p))
    assert total == sum(n * (n + 1) // 2 for n in lengths)


def _profile(tmp_path, *, tflops: float, gbps: float, latency_us: float = 0.0):
    """A one-link profile file: every efficiency 1."""
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps(
            {
                "devices": {"dev": {"bf16": tflops, "fp32": tflops, "memory_gib": 1}},
                "links": {"link": {"gbps": gbps, "latency_us": latency_us}},
                "efficiency": {"matmul": 1.0, "attention": 1.0, "scan": 1.0, "link": 1.0},
                "clusters": {"test": {"device": "dev", "intra": "link", "inter": "link"}},
            }
        )
    )
    return load_profile(str(path))


def test_one_long_document_runs_ring_and_short_documents_run_ulysses(tmp_path):
    """Two ranks, zigzag, 8 tokens (chunks of 2: rank 0 holds [0, 2) and [6, 8), rank 1 [2, 6)), 2 heads of size 1,
    fp32. A causal pair costs 12 H D = 24 FLOPs: at 6e-7 TFLOP/s, 40 us. A byte costs 1 us (1e-3 GB/s), no latency.

    Bytes per layer, forward + backward, n = 4 local tokens: ring K/V 2 n Hkv D = 16 elements, (P-1) 16 x 4 B forward,
    the same plus P 16 x 4 B of fp32 dK/dV backward: 64 + 192 = 256 B; Ulysses (P-1)/P n (2 H + 2 Hkv) D x 4 B = 64 B
    each way: 128 B.

    One document: rank 0's queries see 3 + 7 = 10 of its own pairs and 8 of rank 1's keys; rank 1 10 of its own and
    8 of rank 0's; 36 in all. Ring: step 0 max(10, 10) pairs, step 1 max(8 pairs, the 256 us hop):
    400 + max(320, 256) = 720 us; Ulysses: 128 + 36 / 2 x 40 = 848 us. Ring.
    Four documents of 2 tokens: 3 pairs each, none across ranks. Ring: 6 x 40 + max(0, 256) = 496 us; Ulysses:
    128 + 12 / 2 x 40 = 368 us. Ulysses."""
    profile = _profile(tmp_path, tflops=6e-7, gbps=1e-3)
    shape = SoftmaxShape(heads=2, kv_heads=2, head_dim=1, batch=1, elem_bytes=4)
    chooser = SoftmaxBatchChooser(
        ["ring", "ulysses"],
        kind="zigzag",
        seq_len=8,
        sp=2,
        shape=shape,
        profile=profile,
        link=profile.intra,
        dtype="fp32",
    )
    long, short = [0, 8], [0, 2, 4, 6, 8]
    assert chooser.costs(long) == pytest.approx({"ring": 720e-6, "ulysses": 848e-6})
    assert chooser.costs(short) == pytest.approx({"ring": 496e-6, "ulysses": 368e-6})
    assert chooser.choose(long) == "ring" and chooser.choose(None) == "ring"
    assert chooser.choose(short) == "ulysses"
    # TokenRing on the short documents: its queries still travel ((P-1) n d s = 32 B forward, the (q, dout, lse,
    # delta) bundle 4 (2 x 2 x 4 + 2 x 2 x 4) = 128 B backward) but no partial result comes back: 240 + 160 us.
    layout = SequenceLayout("zigzag", 8, 2, 0, short)
    assert softmax_batch_seconds("token_ring", layout, shape, profile, profile.intra, dtype="fp32") == pytest.approx(
        400e-6
    )


@pytest.mark.parametrize("docs", [None, [0, 5, 6, 30, 64]])
def test_usp_at_its_ends_is_ring_and_ulysses(tmp_path, docs):
    profile = _profile(tmp_path, tflops=1e-3, gbps=1e-2, latency_us=3.0)
    shape = SoftmaxShape(heads=4, kv_heads=2, head_dim=8, batch=1, elem_bytes=2)
    layout = SequenceLayout("zigzag", 64, 4, 0, docs)

    def seconds(name, u=None):
        return softmax_batch_seconds(name, layout, shape, profile, profile.intra, dtype="bf16", ulysses_degree=u)

    assert seconds("usp", 1) == pytest.approx(seconds("ring"))
    assert seconds("usp", 4) == pytest.approx(seconds("ulysses"))
    with pytest.raises(ValueError, match="usp needs a ulysses_degree dividing sp=4, got 3"):
        seconds("usp", 3)


def test_ties_go_to_the_first_listed_strategy(tmp_path):
    profile = _profile(tmp_path, tflops=1.0, gbps=1.0)
    shape = SoftmaxShape(heads=2, kv_heads=2, head_dim=4)
    for order in (["ring", "token_ring"], ["token_ring", "ring"]):
        chooser = SoftmaxBatchChooser(
            order, kind="zigzag", seq_len=16, sp=1, shape=shape, profile=profile, link=profile.intra
        )
        assert chooser.choose([0, 4, 16]) == order[0]  # one rank: no communication, the same compute


def test_the_per_batch_list_is_checked_when_loaded():
    def parallel(**keys):
        return from_dict(RunConfig, {"parallel": keys})

    with pytest.raises(ConfigError, match=r"two or more different strategies, got \['ring', 'ring'\]"):
        parallel(softmax_strategy_per_batch=["ring", "ring"])
    with pytest.raises(ConfigError, match=r"two or more different strategies, got \['ulysses'\]"):
        parallel(softmax_strategy_per_batch=["ulysses"])
    with pytest.raises(ConfigError, match=r"softmax_strategy='ring' must be one of softmax_strategy_per_batch"):
        parallel(softmax_strategy="ring", softmax_strategy_per_batch=["ulysses", "usp"])
    with pytest.raises(ConfigError, match=r"softmax_strategy_per_batch\[1\]: 'rung' is not one of"):
        parallel(softmax_strategy_per_batch=["ring", "rung"])
    cfg = parallel(softmax_strategy="ulysses", softmax_strategy_per_batch=["ring", "ulysses"])
    assert cfg.parallel.softmax_strategies() == ["ulysses", "ring"]  # the nominal one first
    with pytest.warns(UserWarning, match=r"every batch gets the same choice"):
        cfg.check(2)  # no packed documents
