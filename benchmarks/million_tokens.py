"""Forward + backward of a stack of gated linear-attention layers on one 1,048,576-token sequence, sharded
over 4 gloo ranks on CPU with LASP-2 on the zigzag layout.

    python benchmarks/million_tokens.py                  # 2 layers, hidden 128, 4 ranks
    python benchmarks/million_tokens.py --layers 4 --no-checkpoint

Each layer: RMSNorm -> q, k, v projections (``hidden = heads * head_dim``) and a per-head log-gate ->
LASP-2 linear attention -> output projection -> residual. Layers are activation-checkpointed by default (a
rank keeps only each layer's input between forward and backward). Gradients of the replicated weights are
all-reduced over the SP group, as training would. Prints and writes (``benchmarks/results/``) the wall time
of the step and the peak memory (max RSS) of every rank.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _common import RESULTS, machine, write_json
from torch import nn
from torch.utils.checkpoint import checkpoint

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy


class GatedLinearAttentionLayer(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.norm = nn.RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.gate = nn.Linear(hidden, heads)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, strategy) -> torch.Tensor:
        batch, tokens, _ = x.shape
        h = self.norm(x)
        q, k, v = self.qkv(h).view(batch, tokens, 3, self.heads, self.head_dim).unbind(2)
        log_gate = nn.functional.logsigmoid(self.gate(h) + 4.0)  # [B, n, H], decays near 1 at init
        o = strategy.linear_attention(q * self.head_dim**-0.5, k, v, gate=log_gate)
        return x + self.out(o.reshape(batch, tokens, -1))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def job(seq_len: int, layers: int, hidden: int, heads: int, chunk_size: int, use_checkpoint: bool) -> dict:
    torch.manual_seed(0)
    comm = Communicator()
    layout = SequenceLayout("zigzag", seq_len, comm.size, comm.rank)
    strategy = make_strategy("lasp2", comm, layout, chunk_size=chunk_size)
    model = nn.ModuleList(GatedLinearAttentionLayer(hidden, heads) for _ in range(layers))
    g = torch.Generator().manual_seed(1 + comm.rank)
    x = torch.randn(1, layout.local_len, hidden, generator=g)
    rss_before = _peak_rss_mib()

    dist.barrier()
    start = time.perf_counter()
    h = x
    for layer in model:
        h = checkpoint(layer, h, strategy, use_reentrant=False) if use_checkpoint else layer(h, strategy)
    loss = h.float().pow(2).mean()
    forward_s = time.perf_counter() - start
    loss.backward()
    for p in model.parameters():  # weights are replicated over SP: sum their gradients
        comm.all_reduce(p.grad, inplace=True)
    dist.barrier()
    total_s = time.perf_counter() - start
    return {
        "rank": comm.rank,
        "local_tokens": layout.local_len,
        "forward_s": forward_s,
        "fwd_bwd_s": total_s,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_before_step_mib": rss_before,
        "loss": loss.item(),
        "all_gather_bytes_sent": comm.stats["all_gather"].bytes_sent,
        "grad_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--no-checkpoint", dest="checkpoint", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS / "million_tokens_cpu.json")
    args = parser.parse_args(argv)

    from distseq.testing import DistributedWorld

    with DistributedWorld(args.nproc, timeout=3600, collective_timeout=1800) as world:
        per_rank = world.run(job, args.seq_len, args.layers, args.hidden, args.heads, args.chunk_size, args.checkpoint)
    write_json(args.out, vars(args), per_rank)
    print(
        f"{args.seq_len} tokens, {args.layers} gated linear-attention layers (hidden {args.hidden}, {args.heads} "
        f"heads), LASP-2 zigzag over {args.nproc} gloo ranks; {machine()}"
    )
    print(f"{'rank':>4}{'tokens':>9}{'fwd s':>8}{'fwd+bwd s':>11}{'peak RSS MiB':>14}{'grads finite':>14}")
    for r in per_rank:
        print(
            f"{r['rank']:>4}{r['local_tokens']:>9}{r['forward_s']:>8.1f}{r['fwd_bwd_s']:>11.1f}"
            f"{r['peak_rss_mib']:>14.0f}{str(r['grad_finite']):>14}"
        )
    print(f"wrote {args.out}")
    return 0 if all(r["grad_finite"] for r in per_rank) else 1


if __name__ == "__main__":
    sys.exit(main())
