"""Shared pieces of the benchmark scripts: timing on all ranks, summaries over ranks, plots, JSON output, tensor
memory of a step, failures agreed by all ranks, bytes of collectives called outside distseq."""

from __future__ import annotations

import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_train(config: Path, overrides: list[str], out: Path, *, nproc: int | None = None) -> tuple[list[dict], float]:
    """``distseq train --config config`` into ``out`` (under torchrun with ``nproc`` ranks, else one process), as
    a user runs it; returns its step rows (events skipped) and the wall time in seconds."""
    from distseq.config import RunConfig, load_yaml
    from distseq.train.metrics import METRICS_FILE, read_metrics

    prefix = [sys.executable]
    if nproc is not None:
        prefix = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*prefix, "-m", "distseq", "train", "--config", str(config), f"output_dir={out}", *overrides]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    elapsed = time.perf_counter() - start
    name = load_yaml(RunConfig, config, overrides).name
    return read_metrics(out / name / METRICS_FILE), elapsed


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo"


def machine_info(**extra: object) -> dict:
    """The machine as a JSON-ready dict (no host names or paths); ``extra`` adds fields such as threads per rank."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "arch": platform.machine(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "distributed_backend": "gloo",
        **extra,
    }


def peak_tensor_bytes(step: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated by torch's CPU allocator while ``step()`` runs, above what was live
    when it started (a warm step: what the call itself adds, freed temporaries included at their peak).

    Read from the profiler's allocation events (``profile_memory=True``), which are exact per allocation but
    slow the step down: never time a step through this. Memory outside torch's allocator (gloo's own
    buffers, Python objects) is not counted.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))  # negative: a free
        pending.extend(node.children)
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


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


def repo_relative(path: Path | str) -> str:
    """``path`` relative to the repository root (only its file name when it lies outside), so a result file
    never records where the repository was checked out."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return resolved.name


def write_json(path: Path, config: dict, results: list[dict], machine_record: object = None) -> None:
    """``machine_record`` replaces the one-line ``machine()`` description (e.g. a ``machine_info()`` dict); paths
    in ``config`` are recorded relative to the repository root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (repo_relative(v) if isinstance(v, Path) else v) for k, v in config.items()}
    record = machine() if machine_record is None else machine_record
    path.write_text(json.dumps({"machine": record, "config": config, "results": results}, indent=2) + "\n")


def _agree(ok: bool) -> bool:
    """True when every rank is ok: a method that failed on one rank is dropped on all."""
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def without_paths(text: str) -> str:
    """``text`` with every absolute path cut to its file name (results do not record this machine's paths)."""
    return re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+([\w.+-]+)", r".../\1", text)


def attempt_on_all_ranks(record: dict, label: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` on every rank; on failure anywhere, record the error (this rank's, or 'on another rank')."""
    try:
        value, ok = fn(), True
    except Exception:
        value, ok = None, False
        record["traceback"] = without_paths(traceback.format_exc(limit=6))
        record["error"] = f"{label}: {record['traceback'].strip().splitlines()[-1]}"
    if not _agree(ok):
        record.setdefault("error", f"{label}: failed on another rank")
        return None
    return value


class ObservedCollectives:
    """Per-rank bytes of torch collectives called by code that does not go through a distseq Communicator
    (peer libraries), by Communicator's convention, while the context is open: ``torch.distributed
    .all_to_all_single`` (DeepSpeed-Ulysses) and the functional ``all_gather_single`` / ``permute_tensor``
    (torch's ring attention). Other collectives are not seen. ``p`` and ``rank``: the one group they run on."""

    def __init__(self, p: int, rank: int):
        import torch.distributed._functional_collectives as ft_c

        self.p, self.rank, self.sent, self.received = p, rank, 0, 0
        self._patches = [(dist, "all_to_all_single", self._all_to_all), (ft_c, "all_gather_single", self._all_gather)]
        self._patches.append((ft_c, "permute_tensor", self._permute))
        self._originals: dict[str, Callable] = {}

    def __enter__(self) -> ObservedCollectives:
        for module, name, counter in self._patches:
            original = self._originals[name] = getattr(module, name)
            setattr(module, name, self._wrap(original, counter))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, _ in self._patches:
            setattr(module, name, self._originals[name])

    def take(self) -> tuple[int, int]:
        counts, self.sent, self.received = (self.sent, self.received), 0, 0
        return counts

    def _wrap(self, original: Callable, counter: Callable) -> Callable:
        signature = inspect.signature(original)

        def counted(*args, **kwargs):
            counter(signature.bind(*args, **kwargs).arguments)
            return original(*args, **kwargs)

        return counted

    def _all_to_all(self, a: dict) -> None:
        def moved(t: torch.Tensor, splits) -> int:
            own = t.shape[0] // self.p if not splits else splits[self.rank]
            return (t.shape[0] - own) * (t.numel() // max(t.shape[0], 1)) * t.element_size()

        self.sent += moved(a["input"], a.get("input_split_sizes"))
        self.received += moved(a["output"], a.get("output_split_sizes"))

    def _all_gather(self, a: dict) -> None:
        t = a["self"]
        self.sent += (self.p - 1) * t.numel() * t.element_size()
        self.received += (self.p - 1) * t.numel() * t.element_size()

    def _permute(self, a: dict) -> None:
        t, src_dst = a["self"], a["src_dst"]
        nbytes = t.numel() * t.element_size()
        self.sent += nbytes if src_dst[self.rank] != self.rank else 0
        self.received += sum(nbytes for src, dst in enumerate(src_dst) if dst == self.rank and src != self.rank)
