"""Two launch-time choices on gloo ranks: ``parallel.*: auto`` (the planner's layout, the same on every rank,
saved resolved and kept by a resume) and ``parallel.softmax_strategy_per_batch`` (each micro-batch's softmax layers
on the strategy predicted fastest for its documents: the losses of a fixed strategy, both strategies used, one per
step when the loader groups samples by length)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from distseq.config import RunConfig, load_yaml
from distseq.data import TokenFileWriter
from distseq.train.metrics import read_metrics
from distseq.train.trainer import run_training
from distseq.train.validate import launch_plan
from tests.distributed.test_training import LOSS_RTOL, SMALL, TINY, _assert_close

AUTO = [f"parallel.{key}=auto" for key in ("dp", "softmax_strategy", "ulysses_degree", "linear_strategy", "layout")]


def job_auto(out: str, overrides: list[str], resume: bool) -> dict:
    cfg = load_yaml(RunConfig, TINY, [*SMALL, f"output_dir={out}", *overrides])
    resolved, _ = launch_plan(cfg, dist.get_world_size(), resume=resume)
    result = run_training(cfg, resume=resume)
    return {"parallel": repr(resolved.parallel), "losses": result.losses, "start": result.start_step}


@pytest.mark.timeout(200)
def test_auto_keys_train_with_the_resolved_layout_and_resume_with_it(worlds, tmp_path):
    overrides = ["parallel.sp=2", *AUTO, "train.steps=2"]
    ranks = worlds(2).run(job_auto, str(tmp_path), overrides, False, timeout=120)
    assert all(r == ranks[0] for r in ranks), "every rank resolves the same layout and reports the same losses"
    want, _ = launch_plan(load_yaml(RunConfig, TINY, [*SMALL, *overrides]), 2, gpus_per_node=2)
    assert ranks[0]["parallel"] == repr(want.parallel) and len(ranks[0]["losses"]) == 2
    run = tmp_path / "tiny-hybrid-cpu"
    saved = load_yaml(RunConfig, run / "config.yaml")
    assert not saved.parallel.auto_keys() and repr(saved.parallel) == repr(want.parallel)
    (event,) = read_metrics(run / "metrics.jsonl", events=True)
    assert event["event"] == "parallel_auto" and event["predicted_step_s"] > 0
    assert event["choice"] == {key: getattr(want.parallel, key) for key in event["choice"]}

    resumed = worlds(2).run(job_auto, str(tmp_path), [*overrides[:-1], "train.steps=3"], True, timeout=120)
    assert resumed[0]["start"] == 2 and resumed[0]["parallel"] == repr(want.parallel)
    kept = read_metrics(run / "metrics.jsonl", events=True)[-1]
    assert kept["event"] == "parallel_auto" and kept["kept_from"].endswith("step_00000002")


SEQ = 64
#: a profile on which one 64-token document runs faster on ring and eight of 8 tokens on Ulysses (tiny model, sp = 2,
#: contiguous, fp32): a pair costs 40 bytes' time; ring 62 vs Ulysses 66 us for one document, 39 vs 30 us for eight
FLIP_PROFILE = {
    "devices": {"dev": {"bf16": 0.0192, "fp32": 0.0192, "memory_gib": 4}},
    "links": {"link": {"gbps": 1.0, "latency_us": 0.0}},
    "efficiency": {"matmul": 1.0, "attention": 1.0, "scan": 1.0, "link": 1.0},
    "clusters": {"flip": {"device": "dev", "intra": "link", "inter": "link"}},
}


def _mixed_documents(path: Path) -> None:
    """16 samples of 64 tokens, alternately one document and eight of 8 tokens, each half of them in every 8."""
    with TokenFileWriter(path, vocab_size=96, tokenizer="test", eos_id=None) as writer:
        for sample in range(16):
            pieces = 1 if sample % 2 == 0 else 8
            for piece in range(pieces):
                writer.append([(7 * sample + 3 * piece + i) % 96 for i in range(SEQ // pieces)])
                writer.end_document()


def job_rows(out: str, overrides: list[str]) -> list[dict]:
    cfg = load_yaml(RunConfig, TINY, [*SMALL, f"output_dir={out}", *overrides])
    run_training(cfg)
    return read_metrics(Path(cfg.run_dir) / "metrics.jsonl") if dist.get_rank() == 0 else []


@pytest.mark.timeout(200)
def test_per_batch_softmax_choice_keeps_the_losses_of_a_fixed_strategy(worlds, tmp_path):
    _mixed_documents(tmp_path / "mixed")
    (tmp_path / "flip.json").write_text(json.dumps(FLIP_PROFILE))
    tokens = [
        "data.source=tokens",
        f"data.path={tmp_path / 'mixed'}",
        "data.pack_documents=true",
        "data.group_by_length=true",
        "data.group_window=8",
        "data.eval_samples=0",
        "parallel.sp=2",
        "train.steps=2",
    ]
    fixed = worlds(2).run(job_rows, str(tmp_path / "fixed"), [*tokens, "parallel.softmax_strategy=ring"], timeout=120)
    per_batch = [
        *tokens,
        "parallel.softmax_strategy_per_batch=[ring,ulysses]",
        f"parallel.profile={tmp_path}/flip.json",
    ]
    chosen = worlds(2).run(job_rows, str(tmp_path / "chosen"), per_batch, timeout=120)
    fixed, chosen = fixed[0], chosen[0]
    _assert_close([r["loss"] for r in chosen], [r["loss"] for r in fixed], rtol=LOSS_RTOL)
    _assert_close([r["grad_norm"] for r in chosen], [r["grad_norm"] for r in fixed], rtol=1e-4)
    # Grouped by length, each step's four micro-batches are all one document or all eight: one strategy per step.
    counts = sorted(tuple(sorted(r["softmax_batches"].items())) for r in chosen)
    assert counts == [(("ring", 0), ("ulysses", 4)), (("ring", 4), ("ulysses", 0))], counts
    for row in chosen:
        used = {name for name, n in row["softmax_batches"].items() if n}
        assert {k for k, v in row["comm_bytes_sent"].items() if k.startswith("softmax.") and v} == {
            f"softmax.{n}" for n in used
        }
    assert "softmax_batches" not in fixed[0]
