"""How far beyond its training length a trained model still recalls: the recall task's held-out accuracy against
sequence length for models trained on 64-token sequences, through `distseq eval` as a user runs it.

    python benchmarks/state_capacity.py                                  # both tiny recall models, 4 gloo ranks
    python benchmarks/state_capacity.py --configs configs/runs/tiny-hybrid-cpu.yaml --lengths 64 1024

Each config is trained as its header says (`distseq train` under torchrun), then its last checkpoint is evaluated
with `distseq eval` at every length (the pairs at the start of the sequence, the questions at its end, filler in
between, in the run's own sharded layout). The softmax layers of these models have no position encoding, so a
lookup learned at 64 tokens can work at any distance, as long as the recurrent layers do not wash out what the
softmax layers need. Writes `results/state_capacity_cpu.json` and `.png` (one curve per model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, machine, repo_relative, run_train

CONFIGS = [ROOT / "configs" / "runs" / "tiny-hybrid-cpu.yaml", ROOT / "configs" / "runs" / "tiny-mamba-gdn-cpu.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, nargs="+", default=CONFIGS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384])
    parser.add_argument("--samples", type=int, default=64, help="held-out samples per length")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "state_capacity_cpu.json")
    args = parser.parse_args()
    result = {"machine": machine(), "nproc": args.nproc, "samples": args.samples, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            out = Path(tmp) / config.stem
            rows, train_s = run_train(config, [], out, nproc=args.nproc)
            run_dir = next(p for p in out.iterdir() if p.is_dir())
            torchrun = Path(sys.executable).with_name("torchrun")
            cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(args.nproc), "-m", "distseq", "eval"]
            start = time.perf_counter()
            lengths = [str(n) for n in args.lengths]
            subprocess.run(
                [*cmd, str(run_dir), "--lengths", *lengths, "--samples", str(args.samples)], cwd=ROOT, check=True
            )
            record = json.loads((run_dir / "eval" / "by_length.json").read_text())
            result["models"].append(
                {
                    "config": repo_relative(config),
                    "pattern": _pattern(config),
                    "train_wall_s": round(train_s, 1),
                    "final_train_eval_accuracy": rows[-1].get("eval_accuracy"),
                    "trained_seq_len": record["trained_seq_len"],
                    "eval_wall_s": round(time.perf_counter() - start, 1),
                    "rows": record["rows"],
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, args.out.with_suffix(".png"))
    for model in result["models"]:
        accuracies = ", ".join(f"{r['seq_len']}: {r['eval_accuracy']:.3f}" for r in model["rows"])
        print(f"{model['config']} ({model['pattern']}): {accuracies}")
    print(f"wrote {repo_relative(args.out)} and its .png")


def _pattern(config: Path) -> str:
    from distseq.config import RunConfig, load_yaml

    return load_yaml(RunConfig, config, []).model.layer_pattern


def _plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for model in result["models"]:
        rows = model["rows"]
        label = f"{Path(model['config']).stem} ({model['pattern']})"
        axes.plot([r["seq_len"] for r in rows], [r["eval_accuracy"] for r in rows], marker="o", label=label)
    chance = result["models"][0]["rows"][0].get("eval_chance") if result["models"] else None
    if chance is not None:
        axes.axhline(chance, color="grey", linestyle=":", label="chance")
    trained = result["models"][0]["trained_seq_len"] if result["models"] else None
    if trained:
        axes.axvline(trained, color="tab:red", linestyle="--", label=f"trained at {trained}")
    axes.set_xscale("log", base=2)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel("held-out recall accuracy")
    axes.set_title(f"recall beyond the training length, sp={result['nproc']} gloo; {result['machine']}", fontsize=8)
    axes.legend(fontsize=8)
    figure.savefig(path)


if __name__ == "__main__":
    main()
