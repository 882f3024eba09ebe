"""The planner: profiles, one layout's predicted step checked term by term, the ranked search and `distseq plan`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from distseq.cli import main
from distseq.config import RunConfig, load_yaml
from distseq.config.model import ModelConfig
from distseq.parallel.mesh import ParallelDims
from distseq.plan import load_profile, predict_step, profile_names, rank_layouts
from distseq.train.metrics import model_flops_per_sequence
from distseq.train.plan import plan_report

ROOT = Path(__file__).resolve().parents[2]
BIG = ROOT / "configs" / "runs" / "hybrid-moe-long-8gpu.yaml"
MODEL = ModelConfig(
    vocab_size=32768, hidden_size=1024, num_heads=16, num_kv_heads=4, layer_pattern="LLLA" * 4, mlp_pattern="D" * 16
)


def _report(dims, softmax="ring", layout="zigzag", seq_len=65536, **extra):
    settings = dict(micro_batch=1, grad_accum=8 // dims.dp, softmax_strategy=softmax, linear_strategy="lasp2")
    return plan_report(MODEL, dims, seq_len=seq_len, layout=layout, dtype_bytes=2, param_bytes=4, **settings, **extra)


def _predict(report, profile="h100", gpus_per_node=8, seq_len=65536):
    cluster = load_profile(profile) if isinstance(profile, str) else profile
    return predict_step(
        MODEL, report, cluster, gpus_per_node=gpus_per_node, seq_len=seq_len, global_batch=8, checkpointing=False
    )


def test_profiles():
    assert {"h100", "h200", "a100", "b200"} <= set(profile_names())
    h100 = load_profile("h100")
    assert h100.peak_tflops["bf16"] == 989.4 and h100.memory_bytes == 80 * 2**30
    assert h100.intra.gbps > h100.inter.gbps
    with pytest.raises(ValueError, match="unknown profile 'h1000'"):
        load_profile("h1000")


def test_profile_from_a_file(tmp_path):
    data = json.loads((ROOT / "distseq" / "plan" / "profiles.json").read_text())
    data["clusters"] = {"mine": {"device": "A100-SXM", "intra": "nvlink3", "inter": "ib-hdr"}}
    (tmp_path / "mine.json").write_text(json.dumps(data))
    assert load_profile(str(tmp_path / "mine.json")).device == "A100-SXM"


def test_compute_term_by_hand():
    """sp = 8 on one node, zigzag: each kind's FLOPs for 8 sequences over dp = 1, split over 8 ranks, 3 passes."""
    dims = ParallelDims(sp=8, world_size=8)
    # one attention rate for every call, no merges (the kernel-call model is tested in test_plan_calls.py)
    h100 = dataclasses.replace(load_profile("h100"), attention_kernel=None, memory_gbps=None)
    prediction = _predict(_report(dims), profile=h100)
    parts = model_flops_per_sequence(MODEL, 65536)
    attention = parts["softmax_attention"] * 3 * 8 / 8 / (989.4e12 * h100.efficiency["attention"])
    scans = (parts["linear_attention"] + parts["mamba_scan"] + parts["delta_rule"]) * 3 / (989.4e12 * 0.25)
    assert prediction.details["compute_by_kind_s"]["attention"] == pytest.approx(attention)
    assert prediction.details["compute_by_kind_s"]["scan"] == pytest.approx(scans)
    total = parts["total_train"] * 8 / 8
    matmul = prediction.details["compute_by_kind_s"]["matmul"] * 989.4e12 * 0.6
    assert matmul == pytest.approx(total - 3 * parts["softmax_attention"] - 3 * parts["linear_attention"])


def test_overlap_imbalance_and_links():
    dims = ParallelDims(sp=8, world_size=8)
    ring, ulysses = _predict(_report(dims)), _predict(_report(dims, softmax="ulysses"))
    # the ring's hops run behind the block kernels; Ulysses' all-to-alls are in the way
    assert ring.comm_s["sp softmax (ring)"] < ring.details["comm_raw_s"]["softmax"]
    assert ulysses.comm_s["sp softmax (ulysses)"] == ulysses.details["comm_raw_s"]["softmax"] > 0
    # causal attention on the contiguous layout: the slowest rank runs its diagonal block and 7 full ones, 15 half
    # blocks against the mean's 8 (at one rate for every call, without merges)
    flat = dataclasses.replace(load_profile("h100"), attention_kernel=None, memory_gbps=None)
    contiguous = _predict(_report(dims, layout="contiguous"), profile=flat)
    zigzag = _predict(_report(dims), profile=flat)
    ratio = contiguous.details["compute_by_kind_s"]["attention"] / zigzag.details["compute_by_kind_s"]["attention"]
    assert ratio == pytest.approx(15 / 8, rel=1e-3)
    # the same sp group over 2 nodes of 4 GPUs takes the inter-node links
    two_nodes = _predict(_report(dims, softmax="ulysses"), gpus_per_node=4)
    assert two_nodes.details["sp_crosses_nodes"] and two_nodes.step_s > ulysses.step_s


def test_ranked_layouts_are_valid_sorted_and_fit_first():
    cfg = load_yaml(RunConfig, BIG, [])
    ranked = rank_layouts(cfg, load_profile("h100"), nodes=1, gpus_per_node=8)
    assert len(ranked) > 100
    keys = [(not c.prediction.fits, c.prediction.step_s) for c in ranked]
    assert keys == sorted(keys)
    for c in ranked:
        assert c.dp * c.sp * c.tp == 8 and cfg.model.num_heads % c.tp == 0 and cfg.model.num_experts % c.ep == 0
        assert cfg.data.global_batch % (c.dp * cfg.data.micro_batch) == 0
        assert c.report["inputs"]["softmax_strategy"] == c.softmax and c.report["layout"]["sp"] == c.sp
    assert ranked[0].prediction.fits
    # a smaller device: fewer layouts fit, and the ones that do not fit come last
    small = rank_layouts(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=1 << 20)),
        load_profile("a100"),
        nodes=1,
        gpus_per_node=8,
    )
    assert any(not c.prediction.fits for c in small) and small[-1].prediction.binding == "memory"


def test_plan_command(capsys):
    assert main(["plan", "--config", str(BIG), "--nodes", "1", "--gpus-per-node", "8", "--top", "3", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "hybrid-moe-long-8gpu on 1 x 8 H100-SXM (h100)" in out and "docs/planning.md" in out
    assert out.count(" dp=") == 3 and "why #1 (dp=" in out and "compute attention" in out
    assert main(["plan", "--config", str(BIG), "--nodes", "1", "--gpus-per-node", "8", "--profile", "tpu"]) == 2
    assert "unknown profile 'tpu'" in capsys.readouterr().err
