"""Scaling grid: every sequence-parallel strategy at several lengths through the real trainer, measured against
what `distseq plan`'s cost model predicts for the same run, time and bytes.

    python benchmarks/scaling.py [--nproc 4] [--lengths 2048 4096 ...] [--steps N] [--profile measure|NAME|FILE]

Two model families so each strategy's own cost shows: softmax layers only (``AA``: every softmax strategy, both
token layouts, ``usp`` at every Ulysses degree) and linear-attention layers only (``LL``: every linear strategy).
Each grid point is a short `run_training` (the trainer `distseq train` runs) on ``--nproc`` gloo ranks at
``sp = nproc``, one sequence per step; the measured step time is the median of the steps after the first (rank
0's ``step_time_s``: every step ends in the gradient all-reduce, so the ranks finish together), the measured bytes
rank 0's per-category ``comm_bytes_sent`` of one step. The prediction is :func:`distseq.plan.cost.predict_step`
on a profile (by default measured first, on the same ranks, at the grid model's shapes, as `distseq check
--profile` measures; written next to the results) for the same config and layout, and the predicted bytes the
dry run's.

Written: ``results/scaling_<profile>.json`` (every point, the per-length rankings and the fraction of strategy
pairs the prediction orders as measured) and ``results/scaling_<profile>.png``. On a cluster, run the same script
from the SLURM template (``launch/slurm/scaling.sbatch``: one array task per length).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, ROOT, machine_info, repo_relative

sys.path.insert(0, str(ROOT))

from distseq.config import RunConfig  # noqa: E402
from distseq.config.loader import apply_overrides, from_dict, parse_overrides  # noqa: E402
from distseq.parallel.mesh import ParallelDims  # noqa: E402
from distseq.plan.cost import predict_step  # noqa: E402
from distseq.plan.profiles import load_profile  # noqa: E402
from distseq.train.plan import plan_report  # noqa: E402

#: the tiny model of every grid point (hidden 64, 4 heads of 16, GQA 4/2); the pattern picks the family
MODEL = {
    "vocab_size": 96,
    "hidden_size": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "qk_norm": False,
    "rope": True,
    "linear_gate": True,
}
FAMILIES = {"softmax": "AA", "linear": "LL"}
SOFTMAX = ["ring", "ulysses", "allgather_kv", "token_ring", "usp"]
LINEAR = ["lasp2", "lasp1", "allscan", "ulysses"]


def grid(lengths: list[int], sp: int, families: list[str]) -> list[dict[str, Any]]:
    """One entry per (family, strategy, layout, Ulysses degree, length)."""
    points = []
    heads = MODEL["num_heads"]
    for n in lengths:
        if "softmax" in families:
            for strategy, layout in itertools.product(SOFTMAX, ("contiguous", "zigzag")):
                degrees = [u for u in range(2, sp) if sp % u == 0 and heads % u == 0] if strategy == "usp" else [None]
                for u in degrees:
                    points.append({"family": "softmax", "strategy": strategy, "layout": layout, "u": u, "seq_len": n})
        if "linear" in families:
            for strategy in LINEAR:
                points.append(
                    {"family": "linear", "strategy": strategy, "layout": "contiguous", "u": None, "seq_len": n}
                )
    return points


def label(point: dict[str, Any]) -> str:
    strategy = f"usp(u={point['u']})" if point["strategy"] == "usp" else point["strategy"]
    return f"{strategy} {point['layout']}"


def run_config(point: dict[str, Any], sp: int, steps: int, out: str, overrides: tuple[str, ...] = ()) -> RunConfig:
    family = point["family"]
    model = {**MODEL, "layer_pattern": FAMILIES[family], "mlp_pattern": "DD"}
    parallel = {"sp": sp, "layout": point["layout"]}
    if family == "softmax":
        parallel |= {"softmax_strategy": point["strategy"], "ulysses_degree": point["u"]}
    else:
        parallel |= {"linear_strategy": point["strategy"]}
    data = {
        "name": f"{family}-{point['strategy']}-{point['u']}-{point['layout']}-{point['seq_len']}",
        "output_dir": out,
        "model": model,
        "parallel": parallel,
        "data": {"seq_len": point["seq_len"], "global_batch": 1, "micro_batch": 1, "eval_samples": 0},
        "optim": {"warmup_steps": 1},
        "train": {"steps": steps, "seed": 0, "eval_every": 0},
        "checkpoint": {"every": 0},
        "metrics": {"print_every": 1000},
    }
    return from_dict(RunConfig, apply_overrides(data, parse_overrides(overrides)))


def predict(cfg: RunConfig, profile) -> dict[str, Any]:
    """The cost model's step time and the dry run's bytes per category for ``cfg`` (rank 0)."""
    p = cfg.parallel
    sp = p.sp
    report = plan_report(
        cfg.model,
        ParallelDims(dp=1, sp=sp, tp=1, ep=1, world_size=sp),
        seq_len=cfg.data.seq_len,
        micro_batch=1,
        grad_accum=1,
        softmax_strategy=p.softmax_strategy,
        linear_strategy=p.linear_strategy,
        layout=p.layout,
        dtype_bytes=4,
        param_bytes=4,
        data_parallel=p.data_parallel,
        ulysses_degree=p.ulysses_degree,
        activation_checkpointing=False,
    )
    prediction = predict_step(
        cfg.model,
        report,
        profile,
        gpus_per_node=sp,
        seq_len=cfg.data.seq_len,
        global_batch=1,
        checkpointing=False,
        dtype="fp32",
    )
    comm = report["communication"]
    nbytes = {}
    for entry in comm["sequence_parallel"]:
        first = entry["per_sp_rank"][0]
        nbytes[f"{entry['kind']}.{entry['strategy']}"] = entry["layers"] * (first["fwd_sent"] + first["bwd_sent"])
    nbytes["dp_sp"] = comm["gradients"]["per_step"]
    return {
        "step_s": prediction.step_s,
        "compute_s": prediction.compute_s,
        "comm_s": prediction.comm_s,
        "bytes": nbytes,
    }


def _measure(point: dict[str, Any], sp: int, steps: int, out: str) -> dict[str, Any] | None:
    """One grid point on this rank (every rank calls it): a short training run; rank 0 returns its rows."""
    import torch.distributed as dist

    from distseq.train.trainer import run_training

    cfg = run_config(point, sp, steps, out)
    run_training(cfg)
    dist.barrier()
    if dist.get_rank():
        return None
    return measured_run(Path(out) / cfg.name)


def measured_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's step time (median of the steps after the first) and rank 0's bytes of its last step."""
    from distseq.train.metrics import METRICS_FILE, read_metrics

    rows = read_metrics(run_dir / METRICS_FILE)
    times = [r["step_time_s"] for r in rows[1:]] or [rows[0]["step_time_s"]]
    return {"step_s": statistics.median(times), "step_times_s": times, "bytes": rows[-1]["comm_bytes_sent"]}


def _measure_profile(tokens: int) -> dict[str, Any]:
    """The machine's profile at the grid model's shapes (every rank calls it)."""
    from distseq.parallel.comm import Communicator
    from distseq.plan.measure import ProfileShapes, measure_profile

    shapes = ProfileShapes(
        hidden=MODEL["hidden_size"],
        heads=MODEL["num_heads"],
        kv_heads=MODEL["num_kv_heads"],
        head_dim=MODEL["hidden_size"] // MODEL["num_heads"],
        tokens=tokens,
        calibration_tokens=tokens // 2,  # the strategies at half the grid's shortest length: outside the grid
    )
    return measure_profile(Communicator(), shapes)


def measured_bytes(sent: dict[str, int]) -> dict[str, int]:
    """Rank 0's sequence-parallel and gradient bytes of a step, keyed like :func:`predict`."""
    out = {}
    for name, value in sent.items():
        if name.startswith(("softmax.", "linear.")) and value:
            out[name] = value
    out["dp_sp"] = sent.get("dp_sp", 0)
    return out


def pair_agreement(points: list[dict[str, Any]], tie: float) -> dict[str, Any]:
    """Over every pair of strategies of one family at one length, whether the prediction orders them as measured:
    the same order, or both within ``tie`` of each other (relative: two runs of one strategy differ by that much
    here). Also the strict count (the same order, ties broken by noise) and the count over the pairs whose
    measured times differ by more than ``tie``."""
    counts = {"pairs": 0, "agree": 0, "agree_strict": 0, "pairs_beyond_tie": 0, "agree_beyond_tie": 0}
    disagreements = []
    keyed: dict[tuple[str, int], list[dict]] = {}
    for p in points:
        keyed.setdefault((p["family"], p["seq_len"]), []).append(p)
    for (family, n), group in sorted(keyed.items()):
        for a, b in itertools.combinations(group, 2):
            same = (a["measured_s"] < b["measured_s"]) == (a["predicted_s"] < b["predicted_s"])
            gap = abs(a["measured_s"] - b["measured_s"]) / min(a["measured_s"], b["measured_s"])
            predicted_gap = abs(a["predicted_s"] - b["predicted_s"]) / min(a["predicted_s"], b["predicted_s"])
            agree = same or (gap <= tie and predicted_gap <= tie)
            counts["pairs"] += 1
            counts["agree"] += agree
            counts["agree_strict"] += same
            if gap > tie:
                counts["pairs_beyond_tie"] += 1
                counts["agree_beyond_tie"] += same
            if not agree:
                disagreements.append(
                    f"{family} N={n}: {a['label']} vs {b['label']} "
                    f"(measured gap {gap:.1%}, predicted {predicted_gap:.1%})"
                )
    return {
        **counts,
        "tie_threshold": tie,
        "fraction": counts["agree"] / max(counts["pairs"], 1),
        "fraction_strict": counts["agree_strict"] / max(counts["pairs"], 1),
        "fraction_beyond_tie": counts["agree_beyond_tie"] / max(counts["pairs_beyond_tie"], 1),
        "disagreements": disagreements,
    }


def _plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({p["family"] for p in points})
    fig, axes = plt.subplots(1, len(families) + 1, figsize=(6 * (len(families) + 1), 4.5))
    for ax, family in zip(axes, families, strict=False):
        series = sorted({p["label"] for p in points if p["family"] == family})
        for i, name in enumerate(series):
            pts = sorted(
                (p for p in points if p["family"] == family and p["label"] == name), key=lambda p: p["seq_len"]
            )
            xs = [p["seq_len"] for p in pts]
            ax.plot(xs, [p["measured_s"] for p in pts], "o-", color=f"C{i}", label=f"{name} measured")
            ax.plot(xs, [p["predicted_s"] for p in pts], "x--", color=f"C{i}", alpha=0.7)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="step seconds", title=f"{family} layers")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, title="o measured, x predicted", title_fontsize=7)
    ax = axes[-1]
    for i, family in enumerate(families):
        pts = [p for p in points if p["family"] == family]
        ax.scatter([p["measured_s"] for p in pts], [p["predicted_s"] for p in pts], color=f"C{i}", label=family, s=14)
    lo = min(min(p["measured_s"], p["predicted_s"]) for p in points)
    hi = max(max(p["measured_s"], p["predicted_s"]) for p in points)
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set(
        xscale="log", yscale="log", xlabel="measured step s", ylabel="predicted step s", title="predicted vs measured"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _steps(point: dict[str, Any], steps: int | None) -> int:
    return steps or (4 if point["seq_len"] <= 8192 else 3)


def _row(point: dict[str, Any], cfg: RunConfig, measured: dict[str, Any], profile) -> dict[str, Any]:
    predicted = predict(cfg, profile)
    row = {
        **point,
        "label": label(point),
        "measured_s": measured["step_s"],
        "measured_steps_s": measured["step_times_s"],
        "predicted_s": predicted["step_s"],
        "predicted_compute_s": predicted["compute_s"],
        "predicted_comm_s": predicted["comm_s"],
        "measured_bytes": measured_bytes(measured["bytes"]),
        "predicted_bytes": predicted["bytes"],
    }
    row["bytes_equal"] = row["measured_bytes"] == row["predicted_bytes"]
    print(
        f"{row['family']:8s} {row['label']:28s} N={row['seq_len']:6d} measured {row['measured_s']:8.3f} s "
        f"predicted {row['predicted_s']:8.3f} s bytes {'equal' if row['bytes_equal'] else 'DIFFER'}",
        flush=True,
    )
    return row


def _run_here(args: argparse.Namespace, points: list[dict[str, Any]]) -> tuple[list[dict], Any, str]:
    """Every point on ``--nproc`` spawned gloo ranks of this machine (and the profile measured on them first)."""
    from distseq.testing import DistributedWorld

    results = []
    name = "cpu" if args.profile == "measure" else Path(args.profile).stem
    with tempfile.TemporaryDirectory() as out, DistributedWorld(args.nproc, timeout=args.timeout) as world:
        if args.profile == "measure":
            measured_profile = world.run(_measure_profile, min(args.lengths) // args.nproc)[0]
            profile_path = RESULTS / f"scaling_{name}_profile.json"
            profile_path.write_text(json.dumps(measured_profile, indent=1) + "\n")
            profile = load_profile(str(profile_path))
        else:
            profile = load_profile(args.profile)
        # Per length, the points run round-robin, each round a short run of every point: a slow spell of the
        # shared machine then touches every strategy alike instead of the few that happened to run in it.
        for n in sorted({p["seq_len"] for p in points}):
            group = [p for p in points if p["seq_len"] == n]
            rounds = args.rounds or (3 if n <= 8192 else 2 if n <= 16384 else 1)
            times: dict[int, list[float]] = {i: [] for i in range(len(group))}
            last: dict[int, dict] = {}
            for r in range(rounds):
                for i, point in enumerate(group):
                    steps = _steps(point, args.steps)
                    measured = world.run(_measure, point, args.nproc, steps, f"{out}/round{r}")[0]
                    times[i] += measured["step_times_s"]
                    last[i] = measured
            for i, point in enumerate(group):
                measured = last[i] | {"step_s": statistics.median(times[i]), "step_times_s": times[i]}
                results.append(
                    _row(point, run_config(point, args.nproc, _steps(point, args.steps), out), measured, profile)
                )
    return results, profile, name


def _emit(args: argparse.Namespace, points: list[dict[str, Any]]) -> None:
    """One run config per point under ``DIR/configs`` and ``DIR/grid.json``, for a cluster to run (one array task
    per line of ``DIR/configs.txt``: slurm/scaling.sbatch) and ``--collect DIR`` to read back."""
    from distseq.config.loader import dump_yaml

    root = Path(args.emit).resolve()
    (root / "configs").mkdir(parents=True, exist_ok=True)
    index = []
    for i, point in enumerate(points):
        cfg = run_config(point, args.nproc, _steps(point, args.steps), str(root / "runs"), tuple(args.set))
        path = root / "configs" / f"{i:03d}.yaml"
        dump_yaml(cfg, path)
        index.append({**point, "config": str(path), "run_dir": str(root / "runs" / cfg.name)})
    record = {"nproc": args.nproc, "overrides": args.set, "points": index}
    (root / "grid.json").write_text(json.dumps(record, indent=1) + "\n")
    (root / "configs.txt").write_text("".join(f"{p['config']}\n" for p in index))
    print(
        f"{len(index)} run configs in {root / 'configs'}; submit: sbatch --array=1-{len(index)} ... (slurm/README.md)"
    )


def _collect(args: argparse.Namespace) -> tuple[list[dict], Any, str]:
    """The runs of an ``--emit`` directory, measured against ``--profile``."""
    root = Path(args.collect)
    grid_record = json.loads((root / "grid.json").read_text())
    profile = load_profile(args.profile)
    results = []
    for entry in grid_record["points"]:
        point = {k: entry[k] for k in ("family", "strategy", "layout", "u", "seq_len")}
        cfg = run_config(
            point, grid_record["nproc"], _steps(point, args.steps), str(root / "runs"), tuple(grid_record["overrides"])
        )
        results.append(_row(point, cfg, measured_run(Path(entry["run_dir"])), profile))
    return results, profile, Path(args.profile).stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="sp degree = ranks (here: spawned gloo ranks)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per point and round, the first not timed (default: 4 up to 8K tokens, 3 beyond)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds per length, every point once per round (default: 3 up to 8K tokens, 2 up to 16K, 1 beyond)",
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument(
        "--profile",
        default="measure",
        help="'measure' (default, here only): measure this machine first, as `distseq check --profile` does, at "
        "the grid's shapes; or a profile name / JSON file",
    )
    parser.add_argument("--tie", type=float, default=0.05, help="relative gap under which two timings are a tie")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--emit", metavar="DIR", help="write the grid's run configs for a cluster, run nothing")
    parser.add_argument("--collect", metavar="DIR", help="read the runs of an --emit directory and predict them")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="key=value",
        help="with --emit: overrides of every run config (a bigger model for GPUs, e.g. model.hidden_size=2048)",
    )
    args = parser.parse_args()

    points = grid(args.lengths, args.nproc, args.families)
    if args.emit:
        _emit(args, points)
        return
    if args.collect and args.profile == "measure":
        parser.error("--collect needs --profile: the cluster's profile name or a file `distseq check --profile` wrote")
    started = time.perf_counter()
    results, profile, name = _collect(args) if args.collect else _run_here(args, points)
    agreement = pair_agreement(results, args.tie)
    record = {
        "machine": machine_info(ranks=args.nproc, threads_per_rank=max(1, (os.cpu_count() or 1) // args.nproc))
        if not args.collect
        else {"collected_from": repo_relative(args.collect)},
        "config": {
            "profile": args.profile if not args.profile.endswith(".json") else repo_relative(args.profile),
            "profile_values": dataclasses.asdict(profile),
            "nproc": args.nproc,
            "lengths": args.lengths,
            "steps": args.steps or "4 up to 8K tokens, 3 beyond (the first of each run not timed)",
            "rounds": args.rounds or "3 up to 8K tokens, 2 up to 16K, 1 beyond (points round-robin per length)",
            "model": MODEL,
            "families": {f: FAMILIES[f] for f in args.families},
            "tie": args.tie,
            "wall_s": round(time.perf_counter() - started, 1),
        },
        "ranking": agreement,
        "bytes_equal_everywhere": all(r["bytes_equal"] for r in results),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"scaling_{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    _plot(results, path.with_suffix(".png"), f"{args.nproc} ranks (sp={args.nproc}), predicted on {name}")
    print(json.dumps({k: v for k, v in agreement.items() if k != "disagreements"}, indent=1))
    print("bytes equal everywhere:", record["bytes_equal_everywhere"])


if __name__ == "__main__":
    main()
