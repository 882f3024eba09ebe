"""Softmax sequence-parallel strategies side by side: fwd+bwd time and exact bytes per rank.

    python benchmarks/sp_attention.py                    # sp = 4 gloo ranks on CPU, N = 1K, 2K, 4K
    python benchmarks/sp_attention.py --seq-lens 2048 8192 --repeats 5

Every strategy runs on the same inputs in one spawned world, one after another, so timings are comparable
as ratios even on a noisy shared machine. Reported per (strategy, N): the median over repeats of the
slowest rank's fwd+bwd wall time, and the exact bytes each rank sent (forward and backward) from
``Communicator.stats``. When DeepSpeed is installed its ``DistributedAttention`` (Ulysses) runs on the same
inputs as a peer, on the contiguous layout it supports, with distseq's own single-rank attention (tiled,
hand-written backward) as its local attention, so the two differ only in the sequence-parallel layer; the
table shows distseq-ulysses (contiguous) / DeepSpeed time. Writes JSON and a PNG plot to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy
from distseq.testing import DistributedWorld

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = [
    ("ring", "zigzag", {}),
    ("allgather_kv", "zigzag", {}),
    ("token_ring", "zigzag", {}),
    ("ulysses", "zigzag", {}),
    ("usp", "zigzag", {"ulysses_degree": 2}),
    ("ulysses", "contiguous", {}),  # the like-for-like partner of DeepSpeed-Ulysses
]


def _inputs(layout: SequenceLayout, batch: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    full = [
        torch.randn(batch, layout.seq_len, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads, heads)
    ]
    return [layout.shard(t, 1) for t in full]


def _time_fwd_bwd(fn, q, k, v, dout, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):  # the first run warms up
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        dist.barrier()
        start = time.perf_counter()
        out = fn(ql, kl, vl)
        out.backward(dout)
        elapsed = time.perf_counter() - start
        dist.barrier()
        if i:
            times.append(elapsed)
    return times


def _deepspeed_attention(comm: Communicator):
    try:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError:
        return None
    deepspeed.init_distributed(dist_backend="gloo")

    def local_attention(q, k, v, *args, **kwargs):
        # [B, N, H/P, D] on one rank: distseq's own tiled attention with its hand-written backward (a
        # single-rank ring), so DeepSpeed and distseq-ulysses differ only in their sequence-parallel layer.
        layout = SequenceLayout("contiguous", q.shape[1], 1, 0)
        return make_strategy("ring", Communicator.solo(), layout).attention(q, k, v, causal=True)

    attention = DistributedAttention(local_attention, comm.group, scatter_idx=2, gather_idx=1)
    return lambda q, k, v: attention(q, k, v, 0)


def job(seq_lens, batch, heads, kv_heads, dim, dtype_name, repeats):
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    comm = Communicator()
    p, r = comm.size, comm.rank
    rows = []
    deepspeed_attention = _deepspeed_attention(comm)
    for seq_len in seq_lens:
        entries = list(STRATEGIES) + ([("deepspeed_ulysses", "contiguous", {})] if deepspeed_attention else [])
        for name, kind, options in entries:
            layout = SequenceLayout(kind, seq_len, p, r)
            q, k, v, dout = _inputs(layout, batch, heads, kv_heads, dim, dtype)
            if name == "deepspeed_ulysses":
                fn, stats = deepspeed_attention, None
            else:
                strategy = make_strategy(name, comm, layout, **options)
                fn, stats = (lambda s: lambda q, k, v: s.attention(q, k, v, causal=True))(strategy), strategy
            times = _time_fwd_bwd(fn, q, k, v, dout, repeats)
            row = {"strategy": name, "layout": kind, "seq_len": seq_len, "rank": r, "times_s": times}
            if stats is not None:
                # One more fwd and bwd, measured separately, for the exact byte counts.
                ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
                stats.reset_stats()
                out = fn(ql, kl, vl)
                row["fwd_bytes_sent"] = stats.bytes_sent()
                stats.reset_stats()
                out.backward(dout)
                row["bwd_bytes_sent"] = stats.bytes_sent()
            rows.append(row)
    return rows


def summarise(per_rank: list[list[dict]]) -> list[dict]:
    summary = []
    for i, row in enumerate(per_rank[0]):
        ranks = [rows[i] for rows in per_rank]
        # A step is as slow as its slowest rank: take the max over ranks per repeat, then the median.
        slowest = [max(rk["times_s"][j] for rk in ranks) for j in range(len(row["times_s"]))]
        entry = {
            "strategy": row["strategy"],
            "layout": row["layout"],
            "seq_len": row["seq_len"],
            "fwd_bwd_median_s": statistics.median(slowest),
            "fwd_bwd_all_s": slowest,
        }
        if "fwd_bytes_sent" in row:
            entry["fwd_bytes_sent_per_rank"] = [rk["fwd_bytes_sent"] for rk in ranks]
            entry["bwd_bytes_sent_per_rank"] = [rk["bwd_bytes_sent"] for rk in ranks]
        summary.append(entry)
    for entry in summary:
        if entry["strategy"] == "deepspeed_ulysses":
            ours = next(
                e
                for e in summary
                if e["strategy"] == "ulysses" and e["layout"] == "contiguous" and e["seq_len"] == entry["seq_len"]
            )
            ours["time_ratio_vs_deepspeed"] = ours["fwd_bwd_median_s"] / entry["fwd_bwd_median_s"]
    return summary


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = sorted({(e["strategy"], e["layout"]) for e in summary})
    for i, (strategy, layout) in enumerate(labels):
        style = {"marker": "o", "color": f"C{i}", "label": f"{strategy} ({layout})"}
        pts = sorted(
            ((e["seq_len"], e) for e in summary if (e["strategy"], e["layout"]) == (strategy, layout)),
            key=lambda pt: pt[0],
        )
        xs = [n for n, _ in pts]
        ax_t.plot(xs, [e["fwd_bwd_median_s"] for _, e in pts], **style)
        if "fwd_bytes_sent_per_rank" in pts[0][1]:
            total = [max(e["fwd_bytes_sent_per_rank"]) + max(e["bwd_bytes_sent_per_rank"]) for _, e in pts]
            ax_b.plot(xs, [b / 2**20 for b in total], **style)
    for ax, ylabel in ((ax_t, "fwd+bwd seconds (median, slowest rank)"), (ax_b, "MiB sent per rank (fwd+bwd, max)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_b.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "sp_attention_cpu.json")
    args = parser.parse_args(argv)

    with DistributedWorld(args.nproc, timeout=3600, collective_timeout=600) as world:
        per_rank = world.run(
            job, args.seq_lens, args.batch, args.heads, args.kv_heads, args.head_dim, args.dtype, args.repeats
        )
    summary = summarise(per_rank)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "config": config, "results": summary}, indent=2) + "\n")
    title = (
        f"softmax SP strategies, sp={args.nproc}, B={args.batch} H={args.heads} Hkv={args.kv_heads} "
        f"D={args.head_dim} {args.dtype}, causal; {machine}"
    )
    plot(summary, args.out.with_suffix(".png"), title)

    print(f"{'strategy':<18}{'layout':<12}{'N':>7}{'fwd+bwd s':>11}{'fwd MiB':>9}{'bwd MiB':>9}{'vs DS':>7}")
    for e in summary:
        # DeepSpeed's traffic does not pass through a distseq Communicator: its bytes are not measured.
        mib = [
            f"{max(e[key]) / 2**20:>9.2f}" if key in e else f"{'n/a':>9}"
            for key in ("fwd_bytes_sent_per_rank", "bwd_bytes_sent_per_rank")
        ]
        ratio = f"{e['time_ratio_vs_deepspeed']:.2f}" if "time_ratio_vs_deepspeed" in e else ""
        print(
            f"{e['strategy']:<18}{e['layout']:<12}{e['seq_len']:>7}{e['fwd_bwd_median_s']:>11.3f}{''.join(mib)}{ratio:>7}"
        )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
