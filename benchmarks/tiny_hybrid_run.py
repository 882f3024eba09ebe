"""The README's main command, recorded: `configs/runs/tiny-hybrid-cpu.yaml` on 4 gloo ranks (sp=2 x dp=2) and
the same config on one process (sp=1), step by step.

    python benchmarks/tiny_hybrid_run.py [--steps N] [--nproc 4]

Runs both through the real `distseq train` command (torchrun for the 4-rank run), then writes
`results/tiny_hybrid_cpu.json` (both loss curves, evaluations, the per-step relative loss difference, wall
times) and `results/tiny_hybrid_cpu.png`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import RESULTS, ROOT, machine, run_train

CONFIG = ROOT / "configs" / "runs" / "tiny-hybrid-cpu.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args()
    extra = [] if args.steps is None else [f"train.steps={args.steps}"]
    with tempfile.TemporaryDirectory() as tmp:
        ranks, ranks_s = run_train(CONFIG, extra, Path(tmp) / "p", nproc=args.nproc)
        single, single_s = run_train(CONFIG, [*extra, "parallel.sp=1"], Path(tmp) / "s")
    loss_p = [d["loss"] for d in ranks]
    loss_s = [d["loss"] for d in single]
    rel = [abs(a - b) / abs(b) for a, b in zip(loss_p, loss_s, strict=True)]
    evals = lambda rows: [  # noqa: E731
        {k: d[k] for k in ("step", "eval_loss", "eval_accuracy", "eval_chance")} for d in rows if "eval_accuracy" in d
    ]
    result = {
        "machine": machine(),
        "config": str(CONFIG.relative_to(ROOT)),
        "nproc": args.nproc,
        "wall_s": {"4_ranks": round(ranks_s, 1), "single_process": round(single_s, 1)},
        "loss": {"4_ranks": loss_p, "single_process": loss_s},
        "relative_loss_difference": {
            "max_first_10_steps": max(rel[:10]),
            "max_first_100_steps": max(rel[:100]),
            "max_all_steps": max(rel),
            "per_step": rel,
        },
        "eval": {"4_ranks": evals(ranks), "single_process": evals(single)},
        "comm_bytes_sent_step_1_rank_0": ranks[0]["comm_bytes_sent"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tiny_hybrid_cpu.json").write_text(json.dumps(result, indent=1))
    _plot(result)
    print(json.dumps({k: result[k] for k in ("wall_s", "eval")}, indent=1))
    print("max relative loss difference (first 10 / 100 / all steps):", max(rel[:10]), max(rel[:100]), max(rel))


def _plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, losses in result["loss"].items():
        ax.plot(range(1, len(losses) + 1), losses, label=name.replace("_", " "), lw=1)
    ax.set(xlabel="step", ylabel="training loss", title="tiny-hybrid-cpu: loss")
    ax.legend()
    for name, rows in result["eval"].items():
        bx.plot([r["step"] for r in rows], [r["eval_accuracy"] for r in rows], marker="o", label=name.replace("_", " "))
    chance = result["eval"]["4_ranks"][0]["eval_chance"]
    bx.axhline(chance, color="grey", ls="--", label="chance")
    bx.set(xlabel="step", ylabel="held-out recall accuracy", title="answers across SP shards")
    bx.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "tiny_hybrid_cpu.png", dpi=110)


if __name__ == "__main__":
    main()
