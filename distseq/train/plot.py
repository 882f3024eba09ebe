"""Pictures of training runs: training loss, held-out accuracy and tokens/s against step, from the runs'
``metrics.jsonl`` (``distseq plot``, and ``metrics.png`` at the end of every ``distseq train``).

matplotlib is optional: it is imported only when a picture is drawn, and drawing goes through the Agg canvas
(no display, no pyplot figure registry), so a headless rank 0 draws the same as a laptop.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from distseq.train.metrics import EVENT_KEY, METRICS_FILE, split_metrics

__all__ = ["MatplotlibMissing", "default_output", "plot_eval_lengths", "plot_finished_run", "plot_runs"]

PICTURE_FILE = "metrics.png"
#: ``distseq plot`` with several runs and no ``--output`` writes this, in the current directory.
COMPARISON_FILE = "runs_comparison.png"


class MatplotlibMissing(ImportError):
    """Drawing needs matplotlib, which is not importable here."""

    def __init__(self, output: str | os.PathLike):
        super().__init__(f"matplotlib is not installed; pip install matplotlib to get {output}")


def default_output(run_dirs: Sequence[str | os.PathLike]) -> Path:
    """``<run dir>/metrics.png`` for one run, ``./runs_comparison.png`` for several."""
    return Path(run_dirs[0]) / PICTURE_FILE if len(run_dirs) == 1 else Path(COMPARISON_FILE)


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name; ``parent/name`` where two runs share a name (same config, other outputs)."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def _load(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run directory, or logged no step yet")
    steps, events = split_metrics(path)
    if not steps:
        raise ValueError(f"{path} holds no training step to draw")
    return steps, events


def _matplotlib(output: Path):
    try:
        import matplotlib  # noqa: F401  (first: a cached submodule would hide a blocked package)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MatplotlibMissing(output) from err
    return Figure, FigureCanvasAgg


def plot_runs(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Draw the ``metrics.jsonl`` of each run directory on one figure and save it as a PNG at ``output``.

    Three panels against step: training loss (a dotted line where the run was resumed), held-out accuracy
    (the chance level dashed where the rows carry ``eval_chance``) and global tokens/s; one colour per run,
    labelled with its directory name. Event rows are not steps and are not drawn as such.

    Raises FileNotFoundError naming a missing run directory or ``metrics.jsonl``, ValueError for a file
    without steps, and :class:`MatplotlibMissing` (an ImportError) without matplotlib. Returns ``output``.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    runs = [_load(d) for d in dirs]  # path errors come before the matplotlib one
    output = Path(output)
    figure_cls, canvas_cls = _matplotlib(output)

    figure = figure_cls(figsize=(15, 4.2), layout="constrained")
    canvas_cls(figure)
    loss_ax, eval_ax, speed_ax = figure.subplots(1, 3)
    several = len(runs) > 1
    any_eval = False
    for index, ((steps, events), label) in enumerate(zip(runs, _labels(dirs), strict=True)):
        colour = f"C{index % 10}"
        loss = [(r["step"], r["loss"]) for r in steps if r.get("loss") is not None]
        if loss:
            loss_ax.plot(*zip(*loss, strict=True), color=colour, lw=1, label=label)
        for event in events:
            if event.get(EVENT_KEY) == "resume" and "step" in event:
                loss_ax.axvline(event["step"], color=colour, ls=":", lw=1)
        evals = [(r["step"], r["eval_accuracy"]) for r in steps if r.get("eval_accuracy") is not None]
        if evals:
            any_eval = True
            eval_ax.plot(*zip(*evals, strict=True), color=colour, marker="o", ms=3, lw=1, label=label)
        chance = next((r["eval_chance"] for r in steps if r.get("eval_chance") is not None), None)
        if chance is not None:
            eval_ax.axhline(chance, color=colour, ls="--", lw=1, label=f"{label} chance" if several else "chance")
        speed = [(r["step"], r["tokens_per_s"]) for r in steps if r.get("tokens_per_s") is not None]
        if speed:
            speed_ax.plot(*zip(*speed, strict=True), color=colour, lw=1, label=label)

    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss (dotted: resumed)")
    eval_ax.set(xlabel="step", ylabel="held-out accuracy", title="eval accuracy")
    if not any_eval:
        eval_ax.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=eval_ax.transAxes)
    eval_ax.set_ylim(bottom=0)
    speed_ax.set(xlabel="step", ylabel="tokens/s (global)", title="throughput")
    for ax in (loss_ax, eval_ax, speed_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110, format="png")
    return output


def plot_finished_run(run_dir: str | os.PathLike, *, stream: TextIO | None = None) -> Path | None:
    """``<run_dir>/metrics.png`` at the end of a training run. Never raises: a picture is not worth a failed
    run, so without matplotlib, or if drawing fails, one line on ``stream`` (stderr) says so; None then."""
    stream = stream if stream is not None else sys.stderr
    output = Path(run_dir) / PICTURE_FILE
    try:
        return plot_runs([run_dir], output)
    except MatplotlibMissing as err:
        print(err, file=stream, flush=True)
    except Exception as err:  # anything else drawing can raise (a font cache, a full disk): reported, not fatal
        print(f"could not draw {output}: {type(err).__name__}: {err}", file=stream, flush=True)
    return None


def plot_eval_lengths(rows: Sequence[dict[str, Any]], trained_len: int, output: str | os.PathLike, title: str) -> Path:
    """Held-out accuracy (and chance) against sequence length, log scale, the training length marked: where a
    recurrent state stops holding what the task asks of it (``distseq eval``)."""
    output = Path(output)
    figure_cls, canvas_cls = _matplotlib(output)
    figure = figure_cls(figsize=(6, 4.2), layout="constrained")
    canvas = canvas_cls(figure)
    axes = figure.add_subplot(1, 1, 1)
    lengths = [r["seq_len"] for r in rows]
    axes.plot(lengths, [r["eval_accuracy"] for r in rows], marker="o", label="held-out accuracy")
    if rows and "eval_chance" in rows[0]:
        axes.axhline(rows[0]["eval_chance"], color="grey", linestyle=":", label="chance")
    axes.axvline(trained_len, color="tab:red", linestyle="--", label=f"trained at {trained_len}")
    axes.set_xscale("log", base=2)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel("accuracy")
    axes.set_title(title)
    axes.legend()
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(output))
    return output
