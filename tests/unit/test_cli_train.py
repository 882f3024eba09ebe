"""`distseq train` and `distseq data prepare` as a user runs them: dry-run, config errors, a real run under
torchrun, and a token file made from text files trained on with packed documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distseq.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "runs" / "tiny-hybrid-cpu.yaml"
SHORT = [
    "data.seq_len=64",
    "data.global_batch=4",
    "data.micro_batch=1",
    "data.eval_samples=4",
    "data.synthetic.num_pairs=4",
    "data.synthetic.num_queries=4",
    "checkpoint.every=0",
]


def test_dry_run_prints_layout_memory_and_communication(capsys):
    assert main(["train", "--config", str(TINY), "--dry-run", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "world_size=4 dp=2 sp=2 tp=1 ep=1" in out
    assert "sp groups: [[0, 1], [2, 3]]" in out and "memory per rank" in out
    assert "ring [send_recv" in out and "lasp2 [all_gather" in out and "total per step" in out


def test_dry_run_rejects_a_layout_before_anything_starts(capsys):
    with pytest.raises(ValueError, match=r"world_size=3 is not divisible by sp \* tp = 2"):
        main(["train", "--config", str(TINY), "--dry-run", "--world-size", "3"])


def test_config_errors_exit_2_naming_the_key(capsys, tmp_path):
    assert main(["train", "--config", str(TINY), "parallel.spp=2"]) == 2
    assert "unknown config key parallel.spp" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_under_torchrun_writes_metrics_config_and_a_checkpoint(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "distseq", "train", "--config", str(TINY)]
    out = subprocess.run(
        [*cmd, *SHORT, "train.steps=3", f"output_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stderr.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["checkpoint"].endswith("step_00000003")
    assert "step 3/3" in out.stderr and "eval_accuracy" in summary
    run = tmp_path / "tiny-hybrid-cpu"
    assert (run / "config.yaml").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 3

    # the same run's checkpoint at longer sequences, in the run's layout (sp = 2 over the 2 ranks)
    evaluate = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "distseq", "eval", str(run)]
    out = subprocess.run(
        [*evaluate, "--lengths", "64", "256", "--samples", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run / "eval" / "by_length.json").read_text())
    assert record["trained_seq_len"] == 64 and record["checkpoint"].endswith("step_00000003")
    assert [r["seq_len"] for r in record["rows"]] == [64, 256]
    assert all(0 <= r["eval_accuracy"] <= 1 and r["eval_chance"] == 1 / 16 for r in record["rows"])
    # at the training length it is the run's own final evaluation, on the same held-out samples
    assert record["rows"][0]["eval_accuracy"] == pytest.approx(summary["eval_accuracy"])
    assert (run / "eval" / "by_length.png").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]  # untouched


def test_eval_names_what_is_missing(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--lengths", "64"]) == 2
    assert "config.yaml" in capsys.readouterr().err


def test_prepare_then_train_on_packed_documents(tmp_path, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(12):
        text = f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 1)
        (texts / f"doc{i:02d}.txt").write_text(text)
    assert main(["data", "prepare", str(texts), "--output", str(tmp_path / "corpus")]) == 0
    meta = json.loads((tmp_path / "corpus.json").read_text())
    assert meta["vocab_size"] == 257 and meta["num_tokens"] > 64 * 8
    overrides = [
        *SHORT,
        "data.source=tokens",
        f"data.path={tmp_path / 'corpus'}",
        "data.pack_documents=true",
        "data.eval_samples=0",
        "model.vocab_size=260",
        "parallel.sp=1",
        "train.steps=4",
        f"output_dir={tmp_path / 'runs'}",
    ]
    leaked = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    assert main(["train", "--config", str(TINY), *overrides]) == 0
    after = {name: os.environ.get(name) for name in leaked}
    assert after == leaked, "a one-process run leaves torch.distributed's variables as it found them"
    lines = (tmp_path / "runs" / "tiny-hybrid-cpu" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 4 and losses[-1] < losses[0]
    capsys.readouterr()
    # The tokenizer's vocabulary must fit the model's.
    with pytest.raises(ValueError, match=r"vocab_size=257 > model.vocab_size=96"):
        main(["train", "--config", str(TINY), *overrides[:-2], "model.vocab_size=96", "train.steps=1"])


def test_linear_backend_reaches_the_kernel_and_mfu_over_peak_does_not_stop_a_run(tmp_path, monkeypatch, capsys):
    """parallel.linear_backend is the kernel the linear layers call (a spy stands in for fla, which is not
    installed here); an MFU above 100% (a peak of 1e-9 TFLOP/s) is reported in the rows and the log, not raised."""
    from distseq.kernels.linear_attention import chunk_linear_attention
    from distseq.parallel.sequence import _linear
    from distseq.train import trainer

    calls = []

    def spy(name):
        def kernel(*args, **kwargs):
            calls.append(name)
            return chunk_linear_attention(*args, **kwargs)

        kernel.__name__ = f"spy_{name}"
        return kernel

    monkeypatch.setattr(_linear, "linear_attention_backend", spy)
    monkeypatch.setattr(trainer, "linear_attention_backend", spy)
    overrides = [*SHORT, "parallel.sp=1", "parallel.linear_backend=fla", "train.steps=2", "metrics.peak_tflops=1e-9"]
    assert main(["train", "--config", str(TINY), *overrides, f"output_dir={tmp_path}"]) == 0
    assert calls and set(calls) == {"fla"}
    out = capsys.readouterr().out
    assert "linear layers: lasp2 with spy_fla (parallel.linear_backend=fla)" in out
    assert out.count("warning: MFU above 100%") == 1
    rows = [json.loads(line) for line in (tmp_path / "tiny-hybrid-cpu" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["mfu"] is None and "MFU above 100%" in r["mfu_error"] for r in rows)
