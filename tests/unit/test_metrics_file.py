"""``metrics.jsonl`` as a file: event rows, reading the step series, rewinding to a checkpoint on resume, and the
line that ends a run."""

from __future__ import annotations

import io
import json

import pytest

from distseq.train.metrics import MetricsLogger, dropped_path, read_metrics, rewind_metrics, summary_line

pytestmark = pytest.mark.timeout(30)


def _write(path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_event_rows_go_to_the_file_only_and_readers_skip_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    stream = io.StringIO()
    with MetricsLogger(str(path), rank=0, total_steps=3, stream=stream, print_every=1) as logger:
        logger.log(1, loss=2.0)
        logger.event("resume", step=1, checkpoint="checkpoints/step_00000001", dropped_rows=0)
        logger.log(2, loss=1.0)
    assert json.loads(path.read_text().splitlines()[1]) == {
        "event": "resume",
        "step": 1,
        "checkpoint": "checkpoints/step_00000001",
        "dropped_rows": 0,
    }
    assert stream.getvalue().count("step ") == 2, "an event prints no progress line"
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert [r["event"] for r in read_metrics(path, events=True)] == ["resume"]


def test_read_metrics_ignores_a_torn_last_line_but_not_a_torn_middle_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 1}, {"step": 2}], tail='{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON object"):
        read_metrics(path)


def test_rewind_keeps_the_steps_up_to_the_checkpoint_and_moves_the_rest(tmp_path):
    path = tmp_path / "metrics.jsonl"
    before = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    # A first resume at step 3 after a crash, then steps 4..8 and a second crash; the checkpoint is step 6.
    _write(path, [*before[:3], {"event": "resume", "step": 3}, *[{"step": s} for s in range(4, 9)]], tail='{"st')
    assert rewind_metrics(path, 6) == 3  # steps 7, 8 and the line the kill cut short
    assert _steps(path) == [1, 2, 3, 3, 4, 5, 6]
    assert json.loads(path.read_text().splitlines()[3])["event"] == "resume", "events before the cut are kept"
    assert dropped_path(path) == tmp_path / "metrics.dropped.jsonl"
    assert dropped_path(path).read_text().splitlines() == ['{"step": 7}', '{"step": 8}', '{"st']

    # Appended, not overwritten: a second rewind (an older checkpoint) adds to the dropped rows.
    assert rewind_metrics(path, 2) == 5
    assert _steps(path) == [1, 2]
    assert len(dropped_path(path).read_text().splitlines()) == 8


def test_rewind_drops_everything_after_the_first_cut_row(tmp_path):
    """Rows after the first row past the checkpoint belong to the abandoned trajectory, even with a small step."""
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 1}, {"step": 2}, {"step": 3}, {"note": "no step"}, {"step": 1}])
    assert rewind_metrics(path, 2) == 3
    assert _steps(path) == [1, 2]


def test_rewind_with_nothing_to_cut_leaves_no_dropped_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert rewind_metrics(path, 4) == 0 and not path.exists(), "a resume into a new run directory"
    _write(path, [{"step": 1}, {"step": 2}])
    assert rewind_metrics(path, 2) == 0
    assert _steps(path) == [1, 2] and not dropped_path(path).exists()


def test_summary_line():
    evaluation = {"eval_loss": 0.4, "eval_accuracy": 0.9531, "eval_chance": 0.0625}
    assert (
        summary_line(step=500, start_step=0, seconds=107.31, loss=0.52, evaluation=evaluation)
        == "done: 500 steps in 107.3 s | loss 0.5200 | eval accuracy 0.953 (chance 0.062)"
    )
    assert (
        summary_line(step=20, start_step=10, seconds=3.04, loss=1.5, evaluation=None)
        == "done: 20 steps (resumed at step 10) in 3.0 s | loss 1.5000"
    )
    assert summary_line(step=4, start_step=4, seconds=0.2, loss=None) == "done: 4 steps (resumed at step 4) in 0.2 s"
