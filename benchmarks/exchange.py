"""Ulysses' head exchanges packed into one all-to-all or one all-to-all per tensor, on the backend at hand.

    python benchmarks/exchange.py                      # 4 gloo ranks, N = 4K, 8K, 16K
    python benchmarks/exchange.py --seq-lens 8192 --repeats 50

``Communicator.packs_messages`` decides how Ulysses (and USP's Ulysses groups) move q, k, v and the output: packed
into one buffer and one all-to-all (one strided copy per tensor into the buffer), or each tensor in its own
all-to-all, all in flight before the first is awaited (a B = 1 kernel output is sent without a copy). NCCL packs;
gloo does not, because of what this script measures. Per N it times, with the two modes interleaved, the exchanges
of one Ulysses layer on the real code (``seq_to_heads`` / ``heads_to_seq``, B = 1, H = 8, D = 64, fp32):

* forward: q, k, v to head shards, then the attention output ``[B, N, H/P, D]`` back;
* backward: dout to head shards, then dq, dk, dv back;

and, for the exchange alone, one all-to-all of the packed size against three of a third each (no copies). Figures:
the median over repeats of the slowest rank's milliseconds. Writes ``results/exchange_<backend>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import RESULTS, machine_info, write_json

from distseq.parallel.comm import Communicator
from distseq.parallel.sequence.ulysses import heads_to_seq, seq_to_heads
from distseq.plan.measure import slowest_seconds
from distseq.testing import DistributedWorld

HEADS, DIM = 8, 64


def _exchanges(comm: Communicator, seq_len: int) -> dict[str, Callable[[], None]]:
    """name -> call for one sequence length; each call moves its tensors as ``comm.packs_messages`` says."""
    p = comm.size
    n = seq_len // p
    q, k, v, dout = (torch.randn(1, n, HEADS, DIM) for _ in range(4))
    head_shard = [torch.randn(1, seq_len, HEADS // p, DIM) for _ in range(3)]  # kernel outputs (token-major)

    def forward():
        seq_to_heads(comm, q, k, v)
        heads_to_seq(comm, [head_shard[0]])

    def backward():
        seq_to_heads(comm, dout)
        heads_to_seq(comm, list(head_shard))

    def exchange_only():  # the packed size in one message, or three of a third; no copies
        if comm.packs_messages:
            comm.all_to_all_stacked(torch.empty(p, 1, n, 3 * HEADS // p, DIM))
            return
        shape = (p, 1, n, HEADS // p, DIM)
        handles = [comm.all_to_all_stacked(torch.empty(shape), async_op=True) for _ in range(3)]
        for handle in handles:
            handle.wait()

    return {"forward": forward, "backward": backward, "exchange_only": exchange_only}


def job(seq_lens: list[int], repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    comm = Communicator()
    rows = []
    for seq_len in seq_lens:
        cases = _exchanges(comm, seq_len)
        times: dict[tuple[str, bool], list[float]] = {}
        for repeat in range(repeats + 2):  # the first two are warm-up; the mode that goes first alternates
            for packed in (True, False) if repeat % 2 else (False, True):
                comm.packs_messages = packed
                for name, call in cases.items():
                    seconds = slowest_seconds(comm, call)
                    if repeat >= 2:
                        times.setdefault((name, packed), []).append(seconds)
        for name in cases:
            packed, separate = (statistics.median(times[(name, mode)]) * 1e3 for mode in (True, False))
            rows.append(
                {
                    "seq_len": seq_len,
                    "exchange": name,
                    "packed_ms": packed,
                    "one_per_tensor_ms": separate,
                    "one_per_tensor_over_packed": separate / packed,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "exchange_gloo.json")
    args = parser.parse_args(argv)
    for seq_len in args.seq_lens:
        if seq_len % args.nproc or HEADS % args.nproc:
            parser.error(f"--seq-lens and heads={HEADS} must divide by --nproc={args.nproc}, got {seq_len}")
    threads = 1
    with DistributedWorld(args.nproc, timeout=3600, collective_timeout=600) as world:
        rows = world.run(job, args.seq_lens, args.repeats, threads)[0]
    for row in rows:
        print(
            f"N={row['seq_len']:6d} {row['exchange']:14s} packed {row['packed_ms']:7.2f} ms  one per tensor "
            f"{row['one_per_tensor_ms']:7.2f} ms  ratio {row['one_per_tensor_over_packed']:.3f}"
        )
    out = args.out
    config = {"nproc": args.nproc, "seq_lens": args.seq_lens, "repeats": args.repeats, "heads": HEADS}
    config |= {"head_dim": DIM, "dtype": "float32", "batch": 1, "threads_per_rank": threads, "backend": "gloo"}
    write_json(out, config, rows, machine_info(ranks=args.nproc))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
