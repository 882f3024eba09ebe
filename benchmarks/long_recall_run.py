"""Long-context recall on CPU, recorded: the main job's model (`configs/runs/tiny-hybrid-cpu.yaml`, trained on
64-token sequences) continued on much longer sequences with `configs/runs/long-recall-cpu.yaml`: 8K tokens (and
other lengths) over sp = 4 gloo ranks, the key-value pairs on the first shard, the queries on the last, filler
between.

    python benchmarks/long_recall_run.py                          # 8K (10 steps) and 16K (4 steps)
    python benchmarks/long_recall_run.py --seq-lens 8192 --steps 10 \\
        --checkpoint runs/tiny-hybrid-cpu/checkpoints/step_00000400

Without `--checkpoint` it first runs the main job (4 ranks, as the README does). Every run goes through the real
`distseq train` command under torchrun. Writes `results/long_recall_cpu.json` (per length: held-out accuracy and
loss at each evaluation, training losses, wall time, tokens/s, bytes sent per step by strategy) and
`results/long_recall_cpu.png`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import RESULTS, ROOT, machine, repo_relative, run_train

MAIN = ROOT / "configs" / "runs" / "tiny-hybrid-cpu.yaml"
LONG = ROOT / "configs" / "runs" / "long-recall-cpu.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 4], help="steps per length (one, or one each)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="start from this checkpoint of the main job")
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args()
    steps = args.steps * len(args.seq_lens) if len(args.steps) == 1 else args.steps
    if len(steps) != len(args.seq_lens):
        parser.error(f"--steps takes one value or one per length: {args.steps} for {args.seq_lens}")
    result = {"machine": machine(), "config": str(LONG.relative_to(ROOT)), "nproc": args.nproc, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            rows, seconds = run_train(MAIN, [], Path(tmp) / "main", nproc=args.nproc)
            checkpoint = Path(tmp) / "main" / MAIN.stem / "checkpoints" / f"step_{rows[-1]['step']:08d}"
            result["main_job"] = {"wall_s": round(seconds, 1), "final_eval_accuracy": rows[-1]["eval_accuracy"]}
        result["checkpoint"] = repo_relative(checkpoint)
        for seq_len, n in zip(args.seq_lens, steps, strict=True):
            overrides = [
                f"data.seq_len={seq_len}",
                f"train.steps={n}",
                f"train.eval_every={max(1, n // 2)}",
                f"train.init_from={checkpoint.resolve()}",
            ]
            rows, seconds = run_train(LONG, overrides, Path(tmp) / f"long{seq_len}", nproc=args.nproc)
            evals = [
                {k: r[k] for k in ("step", "eval_loss", "eval_accuracy", "eval_chance")}
                for r in rows
                if "eval_accuracy" in r
            ]
            result["runs"].append(
                {
                    "seq_len": seq_len,
                    "tokens_per_rank": seq_len // 4,
                    "steps": n,
                    "wall_s": round(seconds, 1),
                    "losses": [r["loss"] for r in rows],
                    "tokens_per_s": [r["tokens_per_s"] for r in rows],
                    "eval": evals,
                    "comm_bytes_sent_step_1_rank_0": rows[0]["comm_bytes_sent"],
                }
            )
            print(json.dumps(result["runs"][-1]["eval"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_recall_cpu.json").write_text(json.dumps(result, indent=1))
    _plot(result)


def _plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        label = f"N = {run['seq_len']:,}"
        ax.plot(range(1, len(run["losses"]) + 1), run["losses"], marker=".", label=label)
        bx.plot([e["step"] for e in run["eval"]], [e["eval_accuracy"] for e in run["eval"]], marker="o", label=label)
    ax.set(xlabel="step at length N", ylabel="training loss", title="continued from the 64-token model")
    ax.legend()
    bx.axhline(result["runs"][0]["eval"][0]["eval_chance"], color="grey", ls="--", label="chance")
    bx.set(xlabel="step at length N", ylabel="held-out recall accuracy", ylim=(0, 1.05))
    bx.set_title("pairs on the first of 4 shards, queries on the last")
    bx.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "long_recall_cpu.png", dpi=110)


if __name__ == "__main__":
    main()
