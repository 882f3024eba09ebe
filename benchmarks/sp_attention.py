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
import sys
from pathlib import Path

import torch
from _common import RESULTS, machine, plot, slowest_median, time_fwd_bwd, write_json

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy
from distseq.testing import DistributedWorld

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
            times = time_fwd_bwd(fn, [q, k, v], dout, repeats)
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
        median, slowest = slowest_median(ranks)
        entry = {
            "strategy": row["strategy"],
            "layout": row["layout"],
            "seq_len": row["seq_len"],
            "fwd_bwd_median_s": median,
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
    write_json(args.out, vars(args), summary)
    title = (
        f"softmax SP strategies, sp={args.nproc}, B={args.batch} H={args.heads} Hkv={args.kv_heads} "
        f"D={args.head_dim} {args.dtype}, causal; {machine()}"
    )
    plot(summary, args.out.with_suffix(".png"), title, lambda e: f"{e['strategy']} ({e['layout']})")

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
