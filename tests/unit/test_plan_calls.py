"""The planner's per-rank kernel calls (``distseq.plan.calls``) and how the cost model charges them."""

from __future__ import annotations

import dataclasses

import pytest

from distseq.config.model import ModelConfig
from distseq.parallel.mesh import ParallelDims
from distseq.plan.calls import (
    AttentionRates,
    KernelCall,
    attention_calls,
    attention_layer_seconds,
    attention_work,
    call_seconds,
    shared_device_seconds,
)
from distseq.plan.cost import predict_step
from distseq.plan.profiles import load_profile
from distseq.train.plan import plan_report

STRATEGIES = [("ring", None), ("token_ring", None), ("allgather_kv", None), ("ulysses", None), ("usp", 2)]


def _pairs(length: int) -> int:
    return length * (length + 1) // 2


@pytest.mark.parametrize("strategy,u", STRATEGIES)
@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("docs", [None, (0, 40, 45, 128)])
def test_every_causal_pair_is_computed_once_over_the_ranks(strategy, u, kind, docs):
    # Independent of any plan: causal attention over documents computes sum_d L_d (L_d + 1) / 2 pairs per head.
    heads, seq_len, sp = 4, 128, 4
    per_rank = attention_calls(strategy, kind, seq_len, sp, heads, u, docs)
    assert len(per_rank) == sp
    lengths = [b - a for a, b in zip(docs[:-1], docs[1:], strict=True)] if docs else [seq_len]
    want = heads * sum(_pairs(n) for n in lengths)
    assert sum(c.heads * c.pairs for steps in per_rank for calls in steps for c in calls) == want


def test_contiguous_ring_is_unbalanced_and_zigzag_is_not():
    heads, seq_len, sp = 2, 64, 4
    contiguous = attention_calls("ring", "contiguous", seq_len, sp, heads)
    # rank r at step s holds rank r - s's keys: its own chunk on the diagonal at step 0, then the r earlier
    # chunks in full, and nothing for the later ones
    for r, steps in enumerate(contiguous):
        assert [[c.causal for c in calls] for calls in steps] == [[True]] + [[False]] * r + [[]] * (sp - 1 - r)
        assert all((c.q_len, c.k_len) == (16, 16) for calls in steps for c in calls)
        assert [c.merged for calls in steps for c in calls] == [False] + [True] * r
    zigzag = attention_calls("ring", "zigzag", seq_len, sp, heads)
    work = {sum(c.pairs for calls in steps for c in calls) for steps in zigzag}
    assert len(work) == 1  # every rank the same number of pairs


def test_ulysses_is_one_call_over_the_sequence_with_its_share_of_heads():
    for kind in ("contiguous", "zigzag"):
        calls = attention_calls("ulysses", kind, 256, 4, 8)
        assert calls == (((KernelCall(256, 256, True, 2, False),),),) * 4


def test_call_seconds():
    rates = AttentionRates(1e9, 1e9, 1e9, 1e9, backward_factor=2.0, row_s=1e-6)
    full = KernelCall(100, 50, False, 2, False)
    causal = KernelCall(100, 100, True, 2, True)
    # FLOPs at the rate; a causal call adds its diagonal band (row cost x heads x rows); merges at memory speed
    assert call_seconds(full, 16, rates) == pytest.approx(3 * 4 * 16 * 2 * 100 * 50 / 1e9)
    band = 1e-6 * 2 * 100
    flops = 3 * 4 * 16 * 2 * 5050 / 1e9
    assert call_seconds(causal, 16, rates) == pytest.approx(flops + band)
    merge = 4 * 100 * 2 * 17 * 4 + 2 * (100 + 200) * 2 * 16 * 4
    memory = dataclasses.replace(rates, memory_bytes_per_s=1e6)
    assert call_seconds(causal, 16, memory) == pytest.approx(flops + band + merge / 1e6)
    # published rates by pass and mask, the backward as 2.5 forwards
    published = AttentionRates(4e9, 2e9, 3e9, 1e9, backward_factor=2.5)
    forward = 4 * 16 * 2 * 5050
    assert call_seconds(causal, 16, published) == pytest.approx(forward / 2e9 + 2.5 * forward / 1e9)


def test_rates_of_a_profile():
    h100 = load_profile("h100")
    rates = AttentionRates.of(h100)
    kernel = h100.attention_kernel
    assert rates.forward_causal == kernel.fwd_causal_tflops * 1e12 and rates.backward_factor == 2.5
    assert rates.memory_bytes_per_s == h100.memory_gbps * 1e9 * h100.efficiency["memory"]
    plain = AttentionRates.of(dataclasses.replace(h100, attention_kernel=None, memory_gbps=None), "fp32")
    assert plain.forward_full == plain.backward_causal == pytest.approx(66.9e12 * h100.efficiency["attention"])
    assert plain.backward_factor == 2.0 and plain.memory_bytes_per_s is None


def _predict(profile, layout: str, strategy: str = "ring"):
    model = ModelConfig(hidden_size=256, num_heads=4, num_kv_heads=4, layer_pattern="AA", mlp_pattern="DD")
    report = plan_report(
        model,
        ParallelDims(dp=1, sp=4, world_size=4),
        seq_len=8192,
        micro_batch=1,
        grad_accum=1,
        softmax_strategy=strategy,
        linear_strategy="lasp2",
        layout=layout,
    )
    return predict_step(model, report, profile, gpus_per_node=4, seq_len=8192, global_batch=1, checkpointing=False)


def test_cost_charges_the_slowest_rank_unless_ranks_share_a_device():
    # FLOPs only, at one rate: merges and the published causal / full rates aside
    gpu = dataclasses.replace(load_profile("h100"), memory_gbps=None, attention_kernel=None)
    contiguous, zigzag = _predict(gpu, "contiguous"), _predict(gpu, "zigzag")
    # one GPU per rank: the causal ring waits for its last rank (7 of the 16 diagonal-block units against 4 mean)
    ratio = contiguous.details["compute_by_kind_s"]["attention"] / zigzag.details["compute_by_kind_s"]["attention"]
    assert ratio == pytest.approx(7 / 4, rel=0.02)
    # two ranks per core (a CPU running 4 ranks on 2 cores): a rank that finished lends its core to the others.
    # Ranks' works (half blocks) 1, 3, 5, 7 on 2 cores: all four at half speed until rank 0 is done (t = 2), three at
    # 2/3 until rank 1 is (t = 5), then one core each: 2 more for rank 2, 4 for rank 3 (t = 9); zigzag's 4 x 4
    # half blocks take 8 on 2 cores. So the imbalance costs 9/8, not 7/4.
    shared = dataclasses.replace(gpu, ranks_per_device=2.0)
    contiguous, zigzag = _predict(shared, "contiguous"), _predict(shared, "zigzag")
    attention = [p.details["compute_by_kind_s"]["attention"] for p in (contiguous, zigzag)]
    assert attention[0] / attention[1] == pytest.approx(9 / 8, rel=0.02)


def test_shared_devices_by_hand():
    # one device per rank: the slowest rank
    assert shared_device_seconds([1.0, 2.0, 3.0], 1.0) == 3.0
    # balanced work takes its own (contended) time
    assert shared_device_seconds([4.0] * 4, 2.0) == pytest.approx(4.0)
    # 2 ranks on 1 device, contended times 2 and 6 (work alone 1 and 3): both at half speed until the first is
    # done (t = 2), then the second alone for its remaining 2: t = 4
    assert shared_device_seconds([2.0, 6.0], 2.0) == pytest.approx(4.0)


@pytest.mark.parametrize("strategy,u", STRATEGIES)
def test_rank_work_sums_the_calls(strategy, u):
    docs = (0, 40, 45, 128)
    rates = AttentionRates(3e9, 2e9, 2e9, 1e9, backward_factor=2.5, row_s=1e-6, memory_bytes_per_s=1e7)
    calls = attention_calls(strategy, "zigzag", 128, 4, 4, u, docs)
    work = attention_work(strategy, "zigzag", 128, 4, 4, u, docs)
    for rank_calls, rank_work in zip(calls, work, strict=True):
        for step_calls, step_work in zip(rank_calls, rank_work, strict=True):
            want = sum(call_seconds(c, 16, rates) for c in step_calls)
            assert step_work.seconds(16, rates) == pytest.approx(want, rel=1e-12)


def test_layer_seconds_synchronises_ring_steps():
    rates = AttentionRates(1e9, 1e9, 1e9, 1e9, backward_factor=2.0)
    work = attention_work("ring", "contiguous", 64, 4, 2)
    per_step = [[w.seconds(16, rates) for w in steps] for steps in work]
    block = per_step[3][1]  # a full 16 x 16 block
    # each step waits for its slowest rank (a full block from step 1 on) or its hop, whichever is longer
    assert attention_layer_seconds(work, "ring", 16, rates) == pytest.approx(per_step[0][0] + 3 * block)
    slow_hop = attention_layer_seconds(work, "ring", 16, rates, hop_s=10 * block)
    assert slow_hop == pytest.approx(per_step[0][0] + 30 * block)
    # not a ring: ranks run back to back, the slowest rank sets the time (or the mean, sharing a device)
    gathered = attention_work("allgather_kv", "contiguous", 64, 4, 2)
    totals = [sum(w.seconds(16, rates) for w in steps) for steps in gathered]
    assert attention_layer_seconds(gathered, "allgather_kv", 16, rates) == pytest.approx(max(totals))
    shared = attention_layer_seconds(gathered, "allgather_kv", 16, rates, ranks_per_device=2.0)
    assert shared == pytest.approx(shared_device_seconds(totals, 2.0)) and shared < max(totals)


def test_measured_strategy_overhead_is_a_fixed_cost_per_layer_and_micro_batch():
    gpu = load_profile("h100")
    overheads = {"softmax/ulysses/zigzag": 1000.0, "softmax/ulysses/contiguous": 5.0, "softmax/ring/zigzag": 7.0}
    measured = dataclasses.replace(gpu, strategy_overhead_us=overheads)
    for layout, overhead in (("zigzag", 1e-3), ("contiguous", 5e-6)):
        plain, charged = _predict(gpu, layout, "ulysses"), _predict(measured, layout, "ulysses")
        # two softmax layers, one micro-batch; Ulysses' exchanges do not overlap, so the step grows by as much
        assert charged.details["compute_by_kind_s"]["strategy overhead"] == pytest.approx(2 * overhead)
        assert charged.step_s == pytest.approx(plain.step_s + 2 * overhead, rel=1e-9)
    # a strategy without an entry gets nothing
    assert _predict(measured, "contiguous", "ring").step_s == _predict(gpu, "contiguous", "ring").step_s
