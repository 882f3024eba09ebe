"""The dry-run plan: per-strategy bytes equal the closed forms the distributed tests assert against CommStats,
parameter counts equal the real model's (sharded by the TP plan's rules), the step totals add up, and bad
settings raise before anything runs."""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import pytest

from distseq.config.model import ModelConfig
from distseq.models import HybridLM
from distseq.models.mamba import Mamba2
from distseq.models.parallelize import TP_PLAN
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import ParallelDims
from distseq.parallel.sequence.registry import SOFTMAX_STRATEGIES
from distseq.train.metrics import model_flops_per_sequence
from distseq.train.plan import (
    LayerBytes,
    format_plan,
    linear_layer_bytes,
    parameter_counts,
    plan_report,
    softmax_layer_bytes,
)
from tests.distributed.test_softmax_strategy_comm import CASES, expected_bytes


@pytest.mark.parametrize("elem", [2, 4, 8])
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("name", SOFTMAX_STRATEGIES)
def test_softmax_bytes_match_the_distributed_tests_closed_forms(name, p, elem):
    seq_len, batch, dim = 32, 2, 4  # the shapes of tests/distributed/test_softmax_strategy_comm.py
    degree = (2 if p >= 2 else 1) if name == "usp" else None
    for kind, heads, kv_heads, causal, docs in CASES:
        for rank in range(p):
            layout = SequenceLayout(kind, seq_len, p, rank, docs)  # documents: token_ring skips partials
            got = softmax_layer_bytes(
                name,
                layout,
                batch=batch,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=dim,
                elem_bytes=elem,
                causal=causal,
                ulysses_degree=degree,
            )
            sent, received = expected_bytes(name, layout, batch, heads, kv_heads, dim, elem, causal, docs, degree)
            assert ((got.fwd_sent, got.bwd_sent), (got.fwd_received, got.bwd_received)) == (sent, received), (
                kind,
                heads,
                kv_heads,
                causal,
                rank,
            )


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_lasp2_bytes_match_the_distributed_test(p, kind):
    batch, heads, key_dim, value_dim = 2, 2, 8, 4  # job_lasp2_bytes in tests/distributed/test_linear_strategies.py
    for seq_len in (8192, 65536):
        for rank in range(p):
            layout = SequenceLayout(kind, seq_len, p, rank)
            chunks = len(layout.chunks())
            state = (p - 1) * chunks * batch * heads * key_dim * value_dim * 4
            scalars = (p - 1) * chunks * batch * heads * 4
            got = linear_layer_bytes(
                "lasp2", layout, batch=batch, heads=heads, key_dim=key_dim, value_dim=value_dim, elem_bytes=4
            )
            assert got == LayerBytes(state + scalars, state + scalars, state, state)


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("p", [2, 4])
def test_lasp1_bytes_match_the_distributed_test(p, kind):
    state = 2 * 2 * 4 * 3 * 4  # job_lasp1_bytes: B h dk dv fp32
    total_sent = total_received = 0
    for rank in range(p):
        layout = SequenceLayout(kind, 64 * p, p, rank)
        owner = {c: j for j in range(p) for c in layout.chunk_indices_of(j)}
        fwd_hops = sum(1 for c in layout.chunks() if c + 1 < layout.num_chunks and owner[c + 1] != rank)
        bwd_hops = sum(1 for c in layout.chunks() if c > 0 and owner[c - 1] != rank)
        got = linear_layer_bytes("lasp1", layout, batch=2, heads=2, key_dim=4, value_dim=3, elem_bytes=4)
        assert got.fwd_sent + got.bwd_sent == (fwd_hops + bwd_hops) * state
        total_sent += got.fwd_sent + got.bwd_sent
        total_received += got.fwd_received + got.bwd_received
    assert total_sent == total_received
    # The chain crosses ranks P-1 times on contiguous, 2P-2 on zigzag (of its 2P-1 steps, the one between rank
    # P-1's two chunks stays home), once forward and once backward.
    assert total_sent == 2 * (p - 1 if kind == "contiguous" else 2 * p - 2) * state


def test_linear_ulysses_bytes():
    # (P-1)/P B n h (2 dk + 2 dv) s, plus the fp32 gate: P=4, B=2, n=16, h=8, dk=dv=4, bf16.
    layout = SequenceLayout("zigzag", 64, 4, 1)
    kwargs = dict(batch=2, heads=8, key_dim=4, value_dim=4, elem_bytes=2)
    plain = 3 * 2 * 16 * 8 * 16 * 2 // 4
    assert linear_layer_bytes("ulysses", layout, **kwargs) == LayerBytes(plain, plain, plain, plain)
    gated = plain + 3 * 2 * 16 * 8 * 4 // 4
    assert linear_layer_bytes("ulysses", layout, gate=True, **kwargs).bwd_sent == gated


def test_unknown_strategy_names():
    layout = SequenceLayout("contiguous", 8, 2, 0)
    with pytest.raises(ValueError, match=r"softmax layers take one of .*, got 'lasp2'"):
        softmax_layer_bytes("lasp2", layout, batch=1, heads=2, kv_heads=2, head_dim=2, elem_bytes=4)
    with pytest.raises(ValueError, match=r"linear layers take one of .*, got 'ring'"):
        linear_layer_bytes("ring", layout, batch=1, heads=2, key_dim=2, value_dim=2, elem_bytes=4)


CONFIGS = [
    dict(layer_pattern="LALA", mlp_pattern="DMDM", shared_expert=True, qk_norm=True, linear_gate=True),
    dict(layer_pattern="LLA", moe_interval=0, linear_output_gate=False, num_kv_heads=4),
    dict(layer_pattern="AL", moe_interval=1, num_experts=8, tie_embeddings=True, vocab_size=96),
    # Mamba2 with B and C split over tp (2 groups) or whole (1 group); convolutions in every kind of layer
    dict(layer_pattern="MGLA", mlp_pattern="DMDD", short_conv_size=4, short_conv_softmax=True, mamba_groups=2),
    dict(layer_pattern="GM", mamba_groups=1, mamba_state_size=8, mamba_conv_size=3, short_conv_size=2),
]


LAYOUTS = [(1, 1, 1, 1), (1, 2, 2, 2), (2, 2, 2, 4), (1, 1, 4, 1)]  # dp, sp, tp, ep


@pytest.mark.parametrize(
    ("overrides", "dp", "sp", "tp", "ep"),
    [
        (overrides, *degrees)
        for overrides in CONFIGS
        for degrees in LAYOUTS
        if not (degrees[2] > 1 and overrides.get("tie_embeddings"))
        and overrides.get("num_experts", 4) % degrees[3] == 0
        and overrides.get("mamba_groups", 1) in (1, degrees[2], 2 * degrees[2])
    ],
)
def test_parameter_counts_match_the_model(overrides, dp, sp, tp, ep):
    cfg = ModelConfig(**overrides)
    dims = ParallelDims(dp=dp, sp=sp, tp=tp, ep=ep, world_size=dp * sp * tp)
    model = HybridLM(cfg)
    counts = parameter_counts(cfg, dims)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # Per rank by the rules parallelize_hybrid applies: TP_PLAN modules split over tp with the convolutions' filters
    # and the per-head parameters, experts over ep; Mamba2's B and C split when tp divides the groups, else whole
    # on every rank with partial gradients.
    split_groups = cfg.mamba_groups % tp == 0
    per_rank = partial = 0
    for name, param in model.named_parameters():
        module = name.rpartition(".")[0]
        mixer = ".".join(name.split(".")[:3]) if name.startswith("blocks.") else ""  # blocks.<i>.attn
        mamba_bc = isinstance(model.get_submodule(mixer), Mamba2) and (
            name.endswith(("b_proj.weight", "c_proj.weight")) or ".conv.q_" in name or ".conv.k_" in name
        )
        if mamba_bc and not split_groups:
            per_rank += param.numel()
            partial += param.numel()
        elif (
            any(fnmatch.fnmatchcase(module, key) for key in TP_PLAN)
            or mamba_bc
            or ".conv." in name
            or name.endswith(("A_log", "dt_bias", ".D", "norm_weight"))
        ):
            assert param.numel() % tp == 0
            per_rank += param.numel() // tp
        elif name.endswith(("w_gate_up", "w_down")):
            per_rank += param.numel() // ep
        else:
            per_rank += param.numel()
            partial += param.numel() if name.endswith(("q_norm.weight", "k_norm.weight", "out_norm.weight")) else 0
    assert counts["per_rank"] == per_rank
    assert counts["per_rank_tp_partial"] == (partial if tp > 1 else 0)


BIG = ModelConfig(
    vocab_size=32000,
    hidden_size=2048,
    num_heads=16,
    num_kv_heads=4,
    layer_pattern="LLLA" * 4,
    moe_interval=2,
    intermediate_size=5632,
    num_experts=8,
    top_k=2,
    moe_intermediate_size=1024,
    shared_expert=True,
    linear_gate=True,
    loss_chunk_size=4096,
)


def _big_plan(**overrides):
    settings = dict(
        seq_len=65536,
        micro_batch=1,
        grad_accum=4,
        softmax_strategy="ring",
        linear_strategy="lasp2",
        layout="zigzag",
        dtype_bytes=2,
    )
    dims = overrides.pop("dims", ParallelDims(dp=2, sp=4, tp=2, ep=4, world_size=16))
    return plan_report(BIG, dims, **(settings | overrides))


def test_plan_sequence_parallel_by_hand():
    report = _big_plan()
    softmax, linear = report["communication"]["sequence_parallel"]
    # ring, sp=4, n=16384, 2 KV heads per tp rank, D=128, bf16: 3 hops of K and V forward; fp32 dK/dV 4 hops back.
    kv = 2 * 16384 * 2 * 128
    assert softmax["layers"] == 4 and softmax["strategy"] == "ring" and not softmax["rank_dependent"]
    assert softmax["per_layer"] == {
        "fwd_sent": 3 * kv * 2,
        "fwd_received": 3 * kv * 2,
        "bwd_sent": 3 * kv * 2 + 4 * kv * 4,
        "bwd_received": 3 * kv * 2 + 4 * kv * 4,
    }
    assert softmax["per_step_sent"] == 4 * 4 * (2 * 3 * kv * 2 + 4 * kv * 4)  # 4 layers x grad_accum 4
    # lasp2 on zigzag: 2 chunks per rank, 8 heads per tp rank, fp32 states of 128 x 128 plus one scalar.
    assert linear["layers"] == 12
    assert linear["per_layer"]["fwd_sent"] == 3 * 2 * 8 * (128 * 128 + 1) * 4 == 3_145_920
    assert linear["per_layer"]["bwd_sent"] == 3 * 2 * 8 * 128 * 128 * 4
    assert report["layout"]["groups"]["sp"][0] == [0, 2, 4, 6]  # ranks differing only in sp (tp fastest)
    assert report["layout"]["edp"] == 2 and report["tokens"]["global_per_step"] == 2 * 4 * 65536


def test_plan_short_convolution_halos_by_hand():
    dims = ParallelDims(dp=2, sp=4, tp=2, ep=4, world_size=16)
    settings = dict(seq_len=65536, micro_batch=1, grad_accum=4, softmax_strategy="ring", linear_strategy="lasp2")
    cfg = dataclasses.replace(BIG, short_conv_size=4, short_conv_softmax=True)
    report = plan_report(cfg, dims, layout="zigzag", dtype_bytes=2, **settings)
    softmax, linear, conv_softmax, conv_linear = report["communication"]["sequence_parallel"]
    # One tail of 3 tokens per boundary between ranks, to the next chunk's owner (its gradient back); bf16; channels
    # per tp rank: softmax q + k + v = (8 + 2 + 2) heads x 128, linear 3 x 8 heads x 128. Zigzag over 4 ranks: the
    # chain 0 1 2 3 | 3 2 1 0 crosses ranks 6 times; ranks 0 and 3 send 1 tail forward (1 back), ranks 1 and 2 two.
    assert conv_softmax["layers"] == 4 and conv_linear["layers"] == 12
    tail_softmax, tail_linear = 3 * 12 * 128 * 2, 3 * 24 * 128 * 2
    assert [r["fwd_sent"] for r in conv_linear["per_sp_rank"]] == [
        tail_linear,
        2 * tail_linear,
        2 * tail_linear,
        tail_linear,
    ]
    assert conv_softmax["per_layer"]["fwd_sent"] == conv_softmax["per_layer"]["bwd_sent"] == 2 * tail_softmax
    assert conv_linear["rank_dependent"] and conv_linear["per_step_sent"] == 12 * 4 * 2 * 2 * tail_linear
    # contiguous: rank r sends forward to r + 1 (none from the last) and backward to r - 1
    contiguous = plan_report(cfg, dims, layout="contiguous", dtype_bytes=2, **settings)["communication"]
    per_rank = contiguous["sequence_parallel"][3]["per_sp_rank"]
    assert [(r["fwd_sent"], r["bwd_sent"]) for r in per_rank] == [
        (tail_linear, 0),
        (tail_linear, tail_linear),
        (tail_linear, tail_linear),
        (0, tail_linear),
    ]
    only_linear = dataclasses.replace(cfg, short_conv_softmax=False)
    kinds = [e["kind"] for e in plan_report(only_linear, dims, layout="zigzag", dtype_bytes=2, **settings)[
        "communication"]["sequence_parallel"]]  # fmt: skip
    assert kinds == ["softmax", "linear", "short conv (linear)"]


def test_plan_rank_dependent_strategies_report_the_busiest_rank():
    dims = ParallelDims(sp=4, world_size=4)
    report = _big_plan(dims=dims, softmax_strategy="token_ring", linear_strategy="lasp1", layout="contiguous")
    softmax, linear = report["communication"]["sequence_parallel"]
    assert softmax["rank_dependent"] and linear["rank_dependent"]
    for layer in (softmax, linear):
        for field in ("fwd_sent", "bwd_received"):
            assert layer["per_layer"][field] == max(r[field] for r in layer["per_sp_rank"])
    # causal contiguous token_ring: rank 0 sends its partials to all 3 later ranks, rank 3 to none
    sent = [r["fwd_sent"] for r in softmax["per_sp_rank"]]
    assert sent == sorted(sent, reverse=True) and sent[0] > sent[-1]


def test_plan_tensor_expert_and_gradient_bytes():
    dims = ParallelDims(dp=2, sp=1, tp=2, ep=2, world_size=4)
    report = _big_plan(dims=dims, seq_len=8192, grad_accum=1)
    comm = report["communication"]
    tokens, h = 8192, 2048
    hidden = 2 * 1 * math.ceil(tokens * h / 2) * 2  # one tp all-reduce of [tokens, hidden] in bf16
    tp = comm["tensor_parallel"]
    # forward: embedding + o_proj of 16 layers + down_proj of 8 dense MLPs + 3 fp32 loss all-reduces per chunk
    loss = 2 * 3 * (2 * math.ceil(4096 / 2) * 4)
    assert tp["forward"] == hidden * (1 + 16 + 8) + loss
    # backward: q,k,v of 4 softmax layers, q,k,v,gate,out_gate of 12 linear, gate/up of 8 MLPs, the LM head per
    # chunk, and the recomputed loss all-reduces
    assert tp["backward"] == hidden * (4 * 3 + 12 * 5 + 8 * 2) + 2 * (2 * math.ceil(4096 * h / 2) * 2) + loss
    ep = comm["expert_parallel"]
    rows = tokens * 2 // 2 * h * 2  # half of the B n top_k assignments leave, hidden bf16 each
    assert ep["forward_per_layer"] == 1 * 4 * 8 + 2 * rows and ep["backward_per_layer"] == 2 * rows
    assert ep["per_step"] == 8 * (4 * 8 + 4 * rows)
    params = report["params"]
    grads = comm["gradients"]["items"]
    dense = params["per_rank"] - params["per_rank_experts"]
    assert grads["replicated and tp-sharded weights over dp_sp"] == 2 * 1 * math.ceil(dense / 2) * 2
    assert grads["expert weights over edp"] == 0  # edp = dp*sp/ep = 1
    assert grads["tp-partial norms over tp"] == 2 * 1 * math.ceil(12 * 128 / 2) * 2
    assert comm["moe_stats"]["per_layer"] == 0  # balance statistics are per sequence: nothing to reduce at sp = 1
    sp2 = _big_plan(dims=ParallelDims(dp=1, sp=2, tp=2, ep=2, world_size=4), seq_len=8192, grad_accum=1)
    assert sp2["communication"]["moe_stats"]["per_layer"] == 2 * 1 * math.ceil(9 / 2) * 8  # one sequence: E + 1


def test_plan_memory_and_flops():
    cfg = ModelConfig(layer_pattern="LA", moe_interval=0)
    dims = ParallelDims(dp=2, sp=2, world_size=4)
    common = dict(seq_len=64, micro_batch=2, grad_accum=3, softmax_strategy="ulysses", linear_strategy="lasp2")
    report = plan_report(cfg, dims, layout="contiguous", dtype_bytes=2, **common)
    weights = report["params"]["per_rank"]
    memory = report["memory"]
    assert memory["params"] == memory["grads"] == 2 * weights
    assert memory["optimizer"] == 2 * 4 * weights and memory["master_weights"] == 4 * weights
    assert memory["total"] == 16 * weights + memory["activations"]
    fsdp = plan_report(cfg, dims, layout="contiguous", dtype_bytes=4, data_parallel="fsdp", optimizer="sgd", **common)
    assert fsdp["memory"]["params"] == math.ceil(4 * weights / 4) and fsdp["memory"]["optimizer"] == 0
    assert fsdp["memory"]["master_weights"] == 0
    # activations: 64 local tokens x (2 layers: norms 4h, dense MLP 4I; linear (4 + 3) H D + softmax (2H + 2Hkv) D
    # in 2 bytes, lse in 4) + final norm, plus one loss chunk of logits (2 + 8 bytes per entry).
    h, d, per_token = 64, 16, 0
    per_token += 2 * (4 * h * 2 + 4 * 128 * 2) + 7 * 4 * d * 2 + (8 + 4) * d * 2 + 4 * 4 + 2 * h * 2
    assert memory["activations"] == 64 * per_token + 64 * 256 * 10
    flops = model_flops_per_sequence(cfg, 64)
    assert report["flops"]["train_per_step_per_rank"] == flops["total_train"] * 2 * 2 * 3 // 4


def test_plan_errors():
    cfg = ModelConfig(num_heads=4, num_kv_heads=2, layer_pattern="LA")
    common = dict(seq_len=64, micro_batch=1, grad_accum=1, linear_strategy="lasp2", layout="zigzag")
    sp8 = ParallelDims(sp=8, world_size=8)
    with pytest.raises(ValueError, match=r"ulysses needs heads per tp rank divisible by sp: num_heads=4 / tp=1"):
        plan_report(cfg, sp8, softmax_strategy="ulysses", **common)
    with pytest.raises(ValueError, match=r"usp needs ulysses_degree dividing sp: ulysses_degree=None, sp=8"):
        plan_report(cfg, sp8, softmax_strategy="usp", **common)
    with pytest.raises(ValueError, match=r"zigzag layout needs seq_len divisible by 16 \(2\*sp\): seq_len=24"):
        plan_report(cfg, sp8, softmax_strategy="ring", **(common | {"seq_len": 24}))
    with pytest.raises(ValueError, match=r"tp=8 must divide \{'num_heads': 4, 'num_kv_heads': 2"):
        plan_report(cfg, ParallelDims(tp=8, world_size=8), softmax_strategy="ring", **common)
    moe = ModelConfig(layer_pattern="LA", moe_interval=1)
    for mode in ("fsdp", "ddp"):
        with pytest.raises(ValueError, match=rf"data_parallel='{mode}' does not handle expert-parallel weights"):
            plan_report(
                moe, ParallelDims(dp=2, ep=2, world_size=2), softmax_strategy="ring", data_parallel=mode, **common
            )
    with pytest.raises(ValueError, match=r"unknown data-parallel mode 'zero3'; choose one of \('reduce', 'ddp'"):
        plan_report(cfg, sp8, softmax_strategy="ring", data_parallel="zero3", **common)
    with pytest.raises(ValueError, match=r"param_bytes must be 2 \(bf16/fp16\), 4 \(fp32\) or 8 \(fp64\), got 1"):
        plan_report(cfg, sp8, softmax_strategy="ring", param_bytes=1, **common)
    with pytest.raises(ValueError, match=r"softmax layers take one of .*, got 'lasp2'"):
        plan_report(cfg, sp8, softmax_strategy="lasp2", **common)
    with pytest.raises(ValueError, match=r"dtype_bytes must be 2 \(bf16/fp16\), 4 \(fp32\) or 8 \(fp64\), got 3"):
        plan_report(cfg, sp8, softmax_strategy="ring", dtype_bytes=3, **common)
    with pytest.warns(UserWarning, match=r"ulysses_degree=2 has no effect with softmax_strategy='ring'"):
        plan_report(cfg, sp8, softmax_strategy="ring", ulysses_degree=2, **common)
    # A strategy whose head check fails only matters when its layer kind is present.
    linear_only = ModelConfig(num_heads=4, num_kv_heads=2, layer_pattern="LL")
    plan_report(linear_only, sp8, softmax_strategy="ulysses", **common)
    # Mamba2 and gated DeltaNet layers run on the linear strategy.
    for pattern in ("MA", "GA"):
        with pytest.raises(ValueError, match=r"ulysses \(linear\) needs heads per tp rank divisible by sp"):
            plan_report(ModelConfig(layer_pattern=pattern), sp8, softmax_strategy="ring", **(common | {
                "linear_strategy": "ulysses"}))  # fmt: skip
    with pytest.raises(ValueError, match=r"linear_strategy='lasp1' has none: use one of \[.*'lasp2'.*'ulysses'\]"):
        plan_report(ModelConfig(layer_pattern="GA"), sp8, softmax_strategy="ring", **(common | {
            "linear_strategy": "lasp1"}))  # fmt: skip
    plan_report(
        ModelConfig(layer_pattern="MA"), sp8, softmax_strategy="ring", **(common | {"linear_strategy": "lasp1"})
    )
    with pytest.raises(ValueError, match=r"mamba_groups 1 .* or divisible by tp: mamba_groups=2, tp=4"):
        plan_report(ModelConfig(layer_pattern="MA", mamba_groups=2, num_kv_heads=4), ParallelDims(tp=4, world_size=4),
                    softmax_strategy="ring", **common)  # fmt: skip


def test_plan_mamba_and_deltanet_by_hand():
    """sp = 4 zigzag (2 chunks per rank), tp = 2 (8 heads per rank), D = 128, bf16."""
    cfg = dataclasses.replace(BIG, layer_pattern="MGLA" * 4, short_conv_size=4, mamba_state_size=64, mamba_groups=2)
    dims = ParallelDims(dp=2, sp=4, tp=2, ep=4, world_size=16)
    settings = dict(seq_len=65536, micro_batch=1, grad_accum=4, softmax_strategy="ring", layout="zigzag", dtype_bytes=2)
    report = plan_report(cfg, dims, linear_strategy="lasp2", **settings)
    entries = {e["kind"]: e for e in report["communication"]["sequence_parallel"]}
    assert list(entries) == [
        "softmax",
        "linear",
        "mamba2",
        "gated deltanet",
        "short conv (linear)",
        "short conv (mamba2)",
        "short conv (gated deltanet)",
    ]
    mamba, deltanet = entries["mamba2"], entries["gated deltanet"]
    # Mamba2 on LASP-2: fp32 states of N x D = 64 x 128 plus one log-decay, per chunk and head.
    assert mamba["layers"] == 4 and mamba["strategy"] == "lasp2"
    assert mamba["per_layer"]["fwd_sent"] == 3 * 2 * 8 * (64 * 128 + 1) * 4
    assert mamba["per_layer"]["bwd_sent"] == 3 * 2 * 8 * 64 * 128 * 4
    # Gated DeltaNet: the summaries M (D x D) and N (D x D), fp32, all-gathered forward, reduce-scattered back.
    assert deltanet["per_layer"]["fwd_sent"] == deltanet["per_layer"]["bwd_sent"] == 3 * 2 * 8 * 128 * 256 * 4
    assert "reduce_scatter" in deltanet["primitive"]
    # Halos, one tail of 3 tokens per boundary between ranks (the busiest zigzag rank sends 2): Mamba2 x (8 heads x
    # 128) plus B and C of its one group per tp rank (64 each).
    assert entries["short conv (mamba2)"]["per_layer"]["fwd_sent"] == 2 * 3 * (8 * 128 + 2 * 64) * 2
    assert entries["short conv (gated deltanet)"]["per_layer"]["fwd_sent"] == 2 * 3 * 3 * 8 * 128 * 2
    # One group whole on every tp rank: its B and C channels are all there.
    whole = plan_report(dataclasses.replace(cfg, mamba_groups=1), dims, linear_strategy="lasp2", **settings)
    conv = {e["kind"]: e for e in whole["communication"]["sequence_parallel"]}["short conv (mamba2)"]
    assert conv["per_layer"]["fwd_sent"] == 2 * 3 * (8 * 128 + 2 * 64) * 2
    # On Ulysses: q, k, v, beta (bf16) and the gate (fp32) there, the output back; n = 16384, 3/4 of it leaves.
    ulysses = plan_report(cfg, dims, linear_strategy="ulysses", **settings)
    entry = {e["kind"]: e for e in ulysses["communication"]["sequence_parallel"]}["gated deltanet"]
    assert entry["per_layer"]["fwd_sent"] == 3 * 16384 * 8 * ((4 * 128 + 1) * 2 + 4) // 4
    # Tensor parallel: o_proj forward; z, x, B, C, dt (Mamba2) and q, k, v, gate, beta, output gate (DeltaNet)
    # input gradients backward.
    items = report["communication"]["tensor_parallel"]["items"]
    hidden = 2 * 1 * math.ceil(16384 * 2048 / 2) * 2
    mamba_tp = next(v for k, v in items.items() if k.startswith("Mamba2"))
    deltanet_tp = next(v for k, v in items.items() if k.startswith("gated DeltaNet"))
    assert mamba_tp == {"forward": 4 * hidden, "backward": 4 * 5 * hidden}
    assert deltanet_tp == {"forward": 4 * hidden, "backward": 4 * 6 * hidden}


def test_usp_plan_uses_the_ulysses_degree():
    dims = ParallelDims(sp=4, world_size=4)
    report = _big_plan(dims=dims, softmax_strategy="usp", ulysses_degree=2, linear_strategy="ulysses")
    softmax, linear = report["communication"]["sequence_parallel"]
    layout = SequenceLayout("zigzag", 65536, 4, 0)
    assert (
        softmax["per_layer"]
        == softmax_layer_bytes(
            "usp", layout, batch=1, heads=16, kv_heads=4, head_dim=128, elem_bytes=2, ulysses_degree=2
        )._asdict()
    )
    assert (
        linear["per_layer"]
        == linear_layer_bytes(
            "ulysses", layout, batch=1, heads=16, key_dim=128, value_dim=128, elem_bytes=2, gate=True
        )._asdict()
    )


def test_format_plan_has_the_key_lines():
    text = format_plan(_big_plan())
    for needle in (
        "layout: world_size=16 dp=2 sp=4 tp=2 ep=4 edp=2 (zigzag sequence layout)",
        "  sp groups: [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]",
        "tokens: 16,384 per rank per sequence, 524,288 per step",
        "parameters: ",
        "memory per rank (estimate; 2-byte activations, 2-byte params, adamw, reduce): params ",
        "  softmax x4: ring [send_recv",
        "forward 50,331,648 B",
        "  linear x12: lasp2 [all_gather (chunk states)] per layer per micro-batch forward 3,145,920 B",
        "  tensor parallel [all_reduce over tp]",
        "  expert parallel [",
        "expected (dropless, uniform routing",
        "  gradients [reduce: gradients summed once per step",
        "ring all-reduce 2 (P-1) ceil(e/P) s",
        "  total per step: ",
    ):
        assert needle in text, (needle, text)


def test_plan_mixed_precision_params_and_gradients():
    # bf16 activations over fp32 weights (autocast): params, grads and their reduction in 4 bytes, no master copy.
    dims = ParallelDims(dp=2, sp=2, world_size=4)
    pure = _big_plan(dims=dims, data_parallel="ddp")
    autocast = _big_plan(dims=dims, data_parallel="ddp", param_bytes=4)
    weights = pure["params"]["per_rank"]
    assert autocast["memory"]["params"] == 4 * weights and autocast["memory"]["master_weights"] == 0
    assert pure["memory"]["master_weights"] == 4 * weights
    assert autocast["memory"]["total"] - autocast["memory"]["activations"] == 16 * weights
    assert pure["memory"]["total"] - pure["memory"]["activations"] == 16 * weights
    grads = autocast["communication"]["gradients"]
    totals = 2 * 3 * 8 + 2 * 3 * 4  # the step's token count (int64) and two losses (fp32) over dp_sp = 4
    assert grads["per_step"] == 2 * 3 * math.ceil(weights / 4) * 4 + totals  # dp_sp = 4, fp32
    assert autocast["communication"]["sequence_parallel"] == pure["communication"]["sequence_parallel"]


def test_plan_fsdp_shards_state_and_gathers_parameters():
    dims = ParallelDims(dp=2, sp=2, world_size=4)
    report = _big_plan(dims=dims, data_parallel="fsdp", param_bytes=4, grad_accum=3)
    weights, memory = report["params"]["per_rank"], report["memory"]
    assert memory["params"] == math.ceil(4 * weights / 4) and memory["optimizer"] == math.ceil(8 * weights / 4)
    assert memory["fsdp_unsharded"] == 2 * (4 * weights - math.ceil(4 * weights / 4))
    shard = 3 * math.ceil(weights / 4) * 4
    items = report["communication"]["gradients"]["items"]
    assert items["all_gather of the parameters over dp_sp (every micro-batch)"] == 3 * shard
    assert items["reduce_scatter of the gradients over dp_sp (last micro-batch)"] == shard


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_plan_deepspeed_zero_stages_shard_over_dp_sp(stage):
    dims = ParallelDims(dp=2, sp=2, world_size=4)
    report = _big_plan(dims=dims, data_parallel="deepspeed", zero_stage=stage, param_bytes=4, grad_accum=3)
    weights, memory = report["params"]["per_rank"], report["memory"]
    # Stage 1 shards the optimizer state over dp x sp = 4, stage 2 also the gradients, stage 3 also the parameters.
    whole = {"optimizer": 8 * weights, "grads": 4 * weights, "params": 4 * weights}
    for shards_from, key in enumerate(whole, start=1):
        want = math.ceil(whole[key] / 4) if stage >= shards_from else whole[key]
        assert memory[key] == want, (stage, key)
    assert memory["master_weights"] == memory["fsdp_unsharded"] == 0
    if stage == 3:  # sharded as FSDP2 shards, without its whole unit during the step
        fsdp = _big_plan(dims=dims, data_parallel="fsdp", param_bytes=4, grad_accum=3)["memory"]
        assert all(memory[key] == fsdp[key] for key in whole)
    shard, items = 3 * math.ceil(weights / 4) * 4, report["communication"]["gradients"]["items"]
    per_step = {0: 2 * shard, 1: 2 * shard, 2: 3 * shard + shard, 3: 2 * 3 * shard + 3 * shard}[stage]
    per_step += 2 * 3 * 8 + 2 * 3 * 4  # the step's token count (int64) and two losses (fp32) over dp_sp = 4
    assert sum(items.values()) == report["communication"]["gradients"]["per_step"] == per_step, items
    assert f"deepspeed ZeRO-{stage}" in format_plan(report)


def test_plan_deepspeed_errors():
    common = dict(seq_len=64, micro_batch=1, grad_accum=1, softmax_strategy="ring", linear_strategy="lasp2")
    cfg, dims = ModelConfig(layer_pattern="LA"), ParallelDims(dp=2, sp=2, world_size=4)
    with pytest.raises(ValueError, match=r"data_parallel='deepspeed' needs zero_stage 0, 1, 2 or 3, got None"):
        plan_report(cfg, dims, layout="zigzag", data_parallel="deepspeed", **common)
    with pytest.raises(ValueError, match=r"data_parallel='deepspeed' needs tp=1, got tp=2"):
        tp2 = ParallelDims(sp=2, tp=2, world_size=4)
        plan_report(cfg, tp2, layout="zigzag", data_parallel="deepspeed", zero_stage=1, **common)
    with pytest.warns(UserWarning, match=r"zero_stage=2 has no effect with data_parallel='reduce'"):
        plan_report(cfg, dims, layout="zigzag", zero_stage=2, **common)


def test_plan_activation_checkpointing():
    dims = ParallelDims(sp=4, tp=2, world_size=8)
    plain = _big_plan(dims=dims, grad_accum=1)
    ckpt = _big_plan(dims=dims, grad_accum=1, activation_checkpointing=True)
    # Each block's forward runs again in the backward, with its sequence-parallel bytes ...
    layers = zip(plain["communication"]["sequence_parallel"], ckpt["communication"]["sequence_parallel"], strict=True)
    for before, after in layers:
        per, again = before["per_layer"], after["per_layer"]
        assert again["fwd_sent"] == per["fwd_sent"]
        assert again["bwd_sent"] == per["bwd_sent"] + per["fwd_sent"]
    # ... and its o_proj all-reduce (down_proj's, the block's last op, is not recomputed: checkpoint stops early).
    hidden = 2 * 1 * math.ceil(16384 * 2048 / 2) * 2
    assert ckpt["communication"]["tensor_parallel"]["backward"] == (
        plain["communication"]["tensor_parallel"]["backward"] + 16 * hidden
    )
    assert ckpt["memory"]["activations"] < plain["memory"]["activations"] / 4
