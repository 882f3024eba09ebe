"""A rank killed mid-run, then ``--resume``: ``metrics.jsonl`` holds each step once, with one resume event
(and none of an earlier run in the same directory).

Two gloo ranks train the tiny config of ``test_training.py``. Once rank 0 has logged step 5 (the last
checkpoint is step 3), rank 1 SIGKILLs itself at the start of step 6, while rank 0 waits for it in the step's
first collective: a hard crash with two logged steps the checkpoint does not have. The spawned world notices
the dead rank and tears the other one down. The resumed run starts from the step-3 checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from distseq.testing import RemoteError
from distseq.train.metrics import read_metrics
from distseq.train.trainer import _Run
from tests.distributed.test_training import job_train

OVERRIDES = ["parallel.sp=2", "train.steps=8", "checkpoint.every=3", "checkpoint.keep=0"]
CHECKPOINT_STEP, LOGGED_STEP = 3, 5  # the crash loses steps 4 and 5


def _wait_for_logged_step(metrics: Path, step: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and any(r["step"] == step for r in read_metrics(metrics))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{metrics} did not show step {step} within {timeout:.0f}s")
        time.sleep(0.05)


def _crash_job(out: str, overrides: list[str], logged_step: int) -> dict:
    """Rank 1 dies by SIGKILL at the start of step ``logged_step + 1``, once rank 0 has logged ``logged_step``."""
    if dist.get_rank() != 1:
        return job_train(out, overrides)
    metrics = Path(out) / "tiny-hybrid-cpu" / "metrics.jsonl"
    train_step = _Run._train_step

    def dying_train_step(run: _Run) -> dict:
        if run.step == logged_step:
            _wait_for_logged_step(metrics, logged_step)
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(run)

    _Run._train_step = dying_train_step
    try:
        return job_train(out, overrides)
    finally:  # only reached if the kill never came; the world's rank 1 lives on for later jobs
        _Run._train_step = train_step


def _resume_job(out: str, overrides: list[str]) -> dict:
    """``run_training(resume=True)``; rank 0 also returns what it wrote to stderr."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured) if dist.get_rank() == 0 else contextlib.nullcontext():
        result = job_train(out, overrides, resume=True)
    return {**result, "stderr": captured.getvalue()}


@pytest.mark.timeout(180)
def test_a_killed_rank_then_resume_leaves_each_step_once(worlds, tmp_path):
    run = tmp_path / "tiny-hybrid-cpu"
    # An earlier run in the same directory: the fresh run below starts its own file (these rows move aside).
    run.mkdir()
    earlier = [json.dumps({"step": step, "loss": 9.0}) for step in range(1, 21)]
    (run / "metrics.jsonl").write_text("\n".join(earlier) + "\n")
    with pytest.raises(RemoteError, match=r"rank\(s\) \[[01]\]"):
        worlds(2).run(_crash_job, str(tmp_path), OVERRIDES, LOGGED_STEP, timeout=90)
    crashed = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in crashed] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    assert not (run / "metrics.png").exists(), "a run that did not complete draws no picture"

    resumed = worlds(2).run(_resume_job, str(tmp_path), OVERRIDES, timeout=90)[0]
    assert resumed["start"] == CHECKPOINT_STEP and len(resumed["losses"]) == 8 - CHECKPOINT_STEP

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "event" not in r] == list(range(1, 9)), "every step once, in order"
    events = [(i, r) for i, r in enumerate(rows) if "event" in r]
    assert events == [
        (
            CHECKPOINT_STEP,  # right after the checkpoint's step
            {
                "event": "resume",
                "step": CHECKPOINT_STEP,
                "checkpoint": "checkpoints/step_00000003",
                "dropped_rows": 2,
                "layout": {"dp": 1, "sp": 2, "tp": 1, "ep": 1},
            },
        )
    ]
    assert rows[:CHECKPOINT_STEP] == [json.loads(line) for line in crashed[:CHECKPOINT_STEP]], "kept as they were"
    dropped = (run / "metrics.dropped.jsonl").read_text().splitlines()
    assert dropped == earlier + crashed[CHECKPOINT_STEP:], "the earlier run's rows, then the lost steps, verbatim"
    # Same layout, restored RNG: the resumed run retraces the lost steps bit for bit.
    assert [json.loads(line)["loss"] for line in dropped[len(earlier) :]] == resumed["losses"][:2]

    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = resumed["stderr"].strip().splitlines()[-1]
    match = re.fullmatch(
        r"done: 8 steps \(resumed at step 3\) in [\d.]+ s \| loss (\S+) \| eval accuracy [\d.]+ \(chance ([\d.]+)\)",
        last,
    )
    assert match, last
    assert match[1] == f"{resumed['losses'][-1]:.4f}"
    assert match[2] == f"{resumed['evals'][-1]['eval_chance']:.3f}"
