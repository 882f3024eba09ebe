"""Shared pieces of the benchmark scripts: timing on all ranks, summaries over ranks, plots, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo"


def time_fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list, dout: torch.Tensor, repeats: int) -> list[float]:
    """Wall time of ``fn(*inputs).backward(dout)`` on this rank per repeat, after one warm-up run.

    Tensors in ``inputs`` are fresh leaves each run (``None`` passes through); ranks start each run together.
    """
    times = []
    for i in range(repeats + 1):
        leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
        dist.barrier()
        start = time.perf_counter()
        fn(*leaves).backward(dout)
        elapsed = time.perf_counter() - start
        dist.barrier()
        if i:
            times.append(elapsed)
    return times


def slowest_median(rows: list[dict]) -> tuple[float, list[float]]:
    """A step is as slow as its slowest rank: max over ranks per repeat, then the median over repeats."""
    slowest = [max(row["times_s"][j] for row in rows) for j in range(len(rows[0]["times_s"]))]
    return statistics.median(slowest), slowest


def plot(summary: list[dict], path: Path, title: str, series_key: Callable[[dict], str]) -> None:
    """Time (left) and bytes per rank (right) against N, one consistently coloured line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, label in enumerate(sorted({series_key(e) for e in summary})):
        style = {"marker": "o", "color": f"C{i}", "label": label}
        pts = sorted((e for e in summary if series_key(e) == label), key=lambda e: e["seq_len"])
        xs = [e["seq_len"] for e in pts]
        ax_t.plot(xs, [e["fwd_bwd_median_s"] for e in pts], **style)
        if "fwd_bytes_sent_per_rank" in pts[0]:
            total = [max(e["fwd_bytes_sent_per_rank"]) + max(e["bwd_bytes_sent_per_rank"]) for e in pts]
            ax_b.plot(xs, [b / 2**20 for b in total], **style)
    for ax, ylabel in ((ax_t, "fwd+bwd seconds (median, slowest rank)"), (ax_b, "MiB sent per rank (fwd+bwd, max)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_json(path: Path, config: dict, results: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()}
    path.write_text(json.dumps({"machine": machine(), "config": config, "results": results}, indent=2) + "\n")
