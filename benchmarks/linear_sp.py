"""Linear-attention sequence parallelism side by side: LASP-2 vs All-Scan's pipelined chain vs the serial LASP-1
vs Ulysses-style head all-to-all, for linear attention and for the gated delta rule, fwd+bwd time and exact bytes
per rank over N = 8K .. 256K.

    python benchmarks/linear_sp.py                       # sp = 4 gloo ranks on CPU
    python benchmarks/linear_sp.py --seq-lens 8192 65536 --repeats 5

All strategies run on the same inputs (data-dependent gate, so the decay path is exercised; L2-normalised keys
and a beta for the delta rule) in one spawned world, one after another. LASP-2, All-Scan (``--block`` rows or
columns of the state per piece) and LASP-1 use the zigzag layout a hybrid model's softmax layers want; Ulysses
runs the whole sequence per head group. ``--ops linear delta`` picks the operations. Reported per (op,
strategy, N): the median over repeats of the slowest rank's fwd+bwd time and each rank's bytes sent and
received, forward and backward. Writes JSON and a PNG plot to ``benchmarks/results/``.
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

#: (operation, strategy) pairs; every one on the zigzag layout
STRATEGIES = {
    "linear": ["lasp2", "allscan", "lasp1", "ulysses"],
    "delta": ["lasp2", "allscan", "ulysses"],
}


def job(ops, seq_lens, batch, heads, key_dim, value_dim, chunk_size, block, repeats):
    torch.manual_seed(0)
    comm = Communicator()
    rows = []
    kind = "zigzag"
    for seq_len in seq_lens:
        for op in ops:
            for name in STRATEGIES[op]:
                layout = SequenceLayout(kind, seq_len, comm.size, comm.rank)
                g = torch.Generator().manual_seed(seq_len)
                n = layout.local_len
                q, k = (torch.randn(batch, n, heads, key_dim, generator=g) * key_dim**-0.5 for _ in range(2))
                v = torch.randn(batch, n, heads, value_dim, generator=g)
                gate = torch.nn.functional.logsigmoid(torch.randn(batch, n, heads, generator=g) + 4)
                beta = torch.rand(batch, n, heads, generator=g)
                dout = torch.randn(batch, n, heads, value_dim, generator=g)
                options = {"block": block} if name == "allscan" else {}
                strategy = make_strategy(name, comm, layout, chunk_size=chunk_size, **options)
                if op == "delta":
                    k = torch.nn.functional.normalize(k, dim=-1)

                    def run(q, k, v, gate, strategy=strategy, beta=beta):
                        return strategy.delta_rule(q, k, v, beta, gate=gate)

                else:

                    def run(q, k, v, gate, strategy=strategy):
                        return strategy.linear_attention(q, k, v, gate=gate)

                times = time_fwd_bwd(run, [q, k, v, gate], dout, repeats)
                strategy.reset_stats()
                out = run(*(t.detach().requires_grad_() for t in (q, k, v, gate)))
                fwd, fwd_received = strategy.bytes_sent(), strategy.bytes_received()
                strategy.reset_stats()
                out.backward(dout)
                rows.append(
                    {
                        "op": op,
                        "strategy": name,
                        "layout": kind,
                        "seq_len": seq_len,
                        "times_s": times,
                        "fwd_bytes_sent": fwd,
                        "bwd_bytes_sent": strategy.bytes_sent(),
                        "fwd_bytes_received": fwd_received,
                        "bwd_bytes_received": strategy.bytes_received(),
                    }
                )
    return rows


def _most_received(entry: dict) -> int:
    """The most bytes any rank received over forward and backward."""
    pairs = zip(entry["fwd_bytes_received_per_rank"], entry["bwd_bytes_received_per_rank"], strict=True)
    return max(f + b for f, b in pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072, 262144])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=32)
    parser.add_argument("--value-dim", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--block", type=int, default=8, help="All-Scan: state rows (columns for delta) per piece")
    parser.add_argument("--ops", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "linear_sp_cpu.json")
    args = parser.parse_args(argv)

    from distseq.testing import DistributedWorld

    with DistributedWorld(args.nproc, timeout=7200, collective_timeout=1800) as world:
        per_rank = world.run(
            job,
            args.ops,
            args.seq_lens,
            args.batch,
            args.heads,
            args.key_dim,
            args.value_dim,
            args.chunk_size,
            args.block,
            args.repeats,
        )
    summary = []
    for i, row in enumerate(per_rank[0]):
        ranks = [rows[i] for rows in per_rank]
        median, slowest = slowest_median(ranks)
        summary.append(
            {
                "op": row["op"],
                "strategy": row["strategy"],
                "layout": row["layout"],
                "seq_len": row["seq_len"],
                "fwd_bwd_median_s": median,
                "fwd_bwd_all_s": slowest,
                "fwd_bytes_sent_per_rank": [rk["fwd_bytes_sent"] for rk in ranks],
                "bwd_bytes_sent_per_rank": [rk["bwd_bytes_sent"] for rk in ranks],
                "fwd_bytes_received_per_rank": [rk["fwd_bytes_received"] for rk in ranks],
                "bwd_bytes_received_per_rank": [rk["bwd_bytes_received"] for rk in ranks],
            }
        )
    for e in summary:
        lasp2 = next(x for x in summary if (x["op"], x["strategy"], x["seq_len"]) == (e["op"], "lasp2", e["seq_len"]))
        e["time_ratio_vs_lasp2"] = e["fwd_bwd_median_s"] / lasp2["fwd_bwd_median_s"]
    write_json(args.out, vars(args), summary)
    title = (
        f"linear-attention SP, sp={args.nproc}, B={args.batch} H={args.heads} dk={args.key_dim} "
        f"dv={args.value_dim}, gated, fp32, allscan block {args.block}; {machine()}"
    )
    plot(summary, args.out.with_suffix(".png"), title, lambda e: f"{e['op']}: {e['strategy']} ({e['layout']})")
    header = f"{'op':<8}{'strategy':<10}{'N':>8}{'fwd+bwd s':>11}{'vs lasp2':>10}{'fwd KiB':>11}{'bwd KiB':>11}"
    print(header + f"{'recv KiB (max rank)':>21}")
    for e in summary:
        print(
            f"{e['op']:<8}{e['strategy']:<10}{e['seq_len']:>8}{e['fwd_bwd_median_s']:>11.3f}{e['time_ratio_vs_lasp2']:>10.2f}"
            f"{max(e['fwd_bytes_sent_per_rank']) / 1024:>11.1f}{max(e['bwd_bytes_sent_per_rank']) / 1024:>11.1f}"
            f"{_most_received(e) / 1024:>21.1f}"
        )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
