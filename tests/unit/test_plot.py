"""The picture of a run (``distseq plot`` and the end-of-run ``metrics.png``), with and without matplotlib."""

from __future__ import annotations

import io
import json
import sys

import pytest

from distseq.cli import main
from distseq.train.plot import MatplotlibMissing, default_output, plot_finished_run, plot_runs

pytestmark = pytest.mark.timeout(60)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(root, name: str, *, resumed_at: int | None = 3, steps: int = 6):
    """A run directory whose metrics.jsonl has steps, evaluations with a chance level and a resume event."""
    run = root / name
    run.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 4.0 / step, "tokens_per_s": 1000.0 + step}
        if step % 2 == 0:
            row.update(eval_loss=3.0 / step, eval_accuracy=0.1 * step, eval_chance=0.0625)
        rows.append(row)
        if step == resumed_at:
            rows.append({"event": "resume", "step": step, "checkpoint": "checkpoints/step_00000003"})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_runs_draws_one_or_several_runs(tmp_path):
    one = _run_dir(tmp_path, "a")
    assert plot_runs([one], one / "metrics.png") == one / "metrics.png"
    assert _is_png(one / "metrics.png")
    other = _run_dir(tmp_path / "elsewhere", "a", resumed_at=None, steps=4)  # same name: labelled parent/name
    out = tmp_path / "pictures" / "both.png"
    plot_runs([one, other], out)
    assert _is_png(out)


def test_cli_plot_default_and_explicit_outputs(tmp_path, capsys, monkeypatch):
    one, two = _run_dir(tmp_path, "a"), _run_dir(tmp_path, "b", resumed_at=None)
    assert main(["plot", str(one)]) == 0
    assert _is_png(one / "metrics.png") and capsys.readouterr().out.strip() == str(one / "metrics.png")
    monkeypatch.chdir(tmp_path)
    assert default_output([one, two]).name == "runs_comparison.png"
    assert main(["plot", str(one), str(two)]) == 0
    assert _is_png(tmp_path / "runs_comparison.png")
    assert main(["plot", str(one), str(two), "--output", str(tmp_path / "cmp.png")]) == 0
    assert _is_png(tmp_path / "cmp.png")


def test_cli_plot_names_a_missing_run_directory_or_file(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert f"run directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty' / 'metrics.jsonl'} does not exist" in capsys.readouterr().err


def test_without_matplotlib_the_cli_exits_1_and_the_end_of_run_plot_only_says_so(tmp_path, capsys, monkeypatch):
    run = _run_dir(tmp_path, "tiny-hybrid-cpu")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(MatplotlibMissing):
        plot_runs([run], run / "metrics.png")
    assert main(["plot", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"distseq plot: matplotlib is not installed; pip install matplotlib to get {run}/metrics.png"
    stream = io.StringIO()
    assert plot_finished_run(run, stream=stream) is None  # never raises: the run it ends stays a success
    assert stream.getvalue() == f"matplotlib is not installed; pip install matplotlib to get {run}/metrics.png\n"
    assert not (run / "metrics.png").exists()


def test_the_end_of_run_plot_reports_other_failures_in_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"event": "resume", "step": 0}\n')  # no step to draw
    stream = io.StringIO()
    assert plot_finished_run(tmp_path / "run", stream=stream) is None
    assert stream.getvalue().startswith(f"could not draw {tmp_path / 'run' / 'metrics.png'}: ValueError: ")
