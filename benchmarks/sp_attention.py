"""distseq's softmax sequence-parallel strategies against the peers a user would otherwise run, side by side.

    python benchmarks/sp_attention.py --seq-lens 2048 4096 --repeats 2 --dtypes float32   # quick check
    python benchmarks/sp_attention.py                    # full: N = 4K..32K, fp32 and bf16, 3 repeats

One spawned world of ``--nproc`` gloo ranks (``--threads-per-rank`` torch threads each) runs, per (N, dtype),
every method on the same causal inputs ``[B, N, H, D]`` (sharded in each method's layout):

* distseq: ``make_strategy(name, comm, layout).attention(q, k, v, causal=True)`` for ring (contiguous and
  zigzag), ulysses (contiguous), allgather_kv, token_ring and usp (ulysses_degree=2) (zigzag);
* DeepSpeed-Ulysses: ``deepspeed.sequence.layer.DistributedAttention`` on ``[B, T, H, D]`` shards
  (scatter_idx=2, gather_idx=1, batch_dim_idx=0) with torch SDPA (is_causal=True) as its local attention;
* torch ring: ``_templated_ring_attention`` / ``_templated_ring_attention_backward`` of
  ``torch.distributed.tensor.experimental._context_parallel._attention`` with the CPU flash op
  ``aten._scaled_dot_product_flash_attention_for_cpu`` (and ``_backward``), on contiguous shards
  (``enable_load_balance=False``) and on zigzag (= torch's head-tail) shards (``enable_load_balance=True``).

Each method first runs once untimed (warm-up, exact bytes, correctness against fp64 SDPA on the full sequence),
then ``--repeats`` timed fwd+bwd steps, the methods interleaved round-robin so machine noise hits all alike,
then one step under the profiler for memory. Figures per (method, N, dtype): the median over repeats of the
slowest rank's fwd+bwd seconds; the ratio to the peer; the peak bytes of tensors the step allocated on each
rank (``_common.peak_tensor_bytes``); the bytes each rank sent and received (distseq: ``Communicator``
stats; peers: their schedules, cross-checked against the torch collectives they call); the max relative
error ``max|x - ref| / max|ref|`` of out, dq, dk, dv. A method that fails is recorded with its error.
Writes ``results/sp_attention_cpu.json`` (after every (N, dtype)) and ``.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import (
    RESULTS,
    ObservedCollectives,
    attempt_on_all_ranks,
    machine_info,
    peak_tensor_bytes,
    without_paths,
    write_json,
)

from distseq import Communicator, SequenceLayout, make_strategy
from distseq.testing import DistributedWorld

TENSORS = ("out", "dq", "dk", "dv")


@dataclass(frozen=True)
class Method:
    implementation: str  # "distseq", "deepspeed" or "torch"
    layout: str
    strategy: str = ""  # distseq strategy name
    options: dict = field(default_factory=dict)
    peers: tuple[str, ...] = ()  # methods this one's time is divided by (the first is plotted)


METHODS = {
    "ring": Method("distseq", "contiguous", "ring", peers=("torch_ring",)),
    "ring_zigzag": Method("distseq", "zigzag", "ring", peers=("torch_ring_zigzag", "torch_ring")),
    "ulysses": Method("distseq", "contiguous", "ulysses", peers=("deepspeed_ulysses",)),
    "allgather_kv": Method("distseq", "zigzag", "allgather_kv", peers=("ring_zigzag",)),
    "token_ring": Method("distseq", "zigzag", "token_ring", peers=("ring_zigzag",)),
    "usp": Method("distseq", "zigzag", "usp", {"ulysses_degree": 2}, peers=("ring_zigzag",)),
    "deepspeed_ulysses": Method("deepspeed", "contiguous"),
    "torch_ring": Method("torch", "contiguous"),
    "torch_ring_zigzag": Method("torch", "zigzag"),
}
PEER_CALLS = {
    "deepspeed": "deepspeed.sequence.layer.DistributedAttention(sdpa, group, scatter_idx=2, gather_idx=1)"
    "(q, k, v, batch_dim_idx=0); sdpa = torch.nn.functional.scaled_dot_product_attention(is_causal=True) on "
    "[B, H/P, N, D]",
    "torch": "torch.distributed.tensor.experimental._context_parallel._attention._templated_ring_attention"
    "(_backward) with aten._scaled_dot_product_flash_attention_for_cpu(_backward), seq_dim=2, [B, H, T, D]; "
    "KV heads repeated to the query heads first (the op has no GQA)",
}


@dataclass
class _Run:
    """One method built on one rank: ``call(q, k, v)`` on ``[B, T_local, H, D]`` shards in its layout."""

    call: Callable[..., torch.Tensor]
    inputs: list[torch.Tensor]  # q, k, v, dout shards
    reference: dict[str, torch.Tensor]  # fp64 shards of out, dq, dk, dv
    strategy: object = None  # a distseq strategy: exact byte statistics

    def leaves(self) -> list[torch.Tensor]:
        return [t.detach().requires_grad_() for t in self.inputs[:3]]

    def step(self) -> float:
        """One fwd+bwd on fresh leaves; its seconds on this rank."""
        q, k, v = self.leaves()
        start = time.perf_counter()
        self.call(q, k, v).backward(self.inputs[3])
        return time.perf_counter() - start


def _deepspeed_ulysses(group: dist.ProcessGroup) -> Callable[..., torch.Tensor]:
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the existing process group

    def sdpa(q, k, v):  # [B, N, H/P, D] after DeepSpeed's all-to-all
        gqa = q.shape[2] != k.shape[2]
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=gqa)
        return out.transpose(1, 2)

    attention = DistributedAttention(sdpa, group, scatter_idx=2, gather_idx=1)
    return lambda q, k, v: attention(q, k, v, 0)


class _TorchRingAttention(torch.autograd.Function):
    """torch's ring attention forward and backward as one autograd op, on ``[B, H, T, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, group, load_balance, rotate):
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        _TorchRingAttention.configure(load_balance, rotate)
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        out, lse = cp._templated_ring_attention(group, 2, op, q, k, v, is_causal=True, dropout_p=0.0, scale=None)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.load_balance, ctx.rotate = group, load_balance, rotate
        return out

    @staticmethod
    def backward(ctx, dout):
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        q, k, v, out, lse = ctx.saved_tensors
        _TorchRingAttention.configure(ctx.load_balance, ctx.rotate)
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
        grads = cp._templated_ring_attention_backward(
            ctx.group,
            2,
            op,
            grad_out=dout,
            grad_out_name="grad_out",
            query=q,
            key=k,
            value=v,
            out=out,
            logsumexp=lse,
            is_causal=True,
            dropout_p=0.0,
            scale=None,
        )
        return *grads[:3], None, None, None

    @staticmethod
    def configure(load_balance: bool, rotate: str) -> None:
        # torch keeps these as module-level options: set them for every call, both directions.
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp

        cp._cp_options.enable_load_balance = load_balance
        cp._cp_options.rotate_method = (
            cp._RotateMethod.ALL_GATHER if rotate == "allgather" else cp._RotateMethod.ALL_TO_ALL
        )


def _torch_ring(group: dist.ProcessGroup, load_balance: bool, rotate: str) -> Callable[..., torch.Tensor]:
    def call(q, k, v):
        rep = q.shape[2] // k.shape[2]
        k, v = (t.repeat_interleave(rep, dim=2) if rep > 1 else t for t in (k, v))
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        return _TorchRingAttention.apply(qh, kh, vh, group, load_balance, rotate).transpose(1, 2)

    return call


def _schedule_bytes(method: Method, p: int, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int]:
    """(forward, backward) bytes each rank of a peer sends, and receives, by its schedule (Communicator's
    convention: an all-to-all of n bytes moves (P-1)/P n, an all-gather of n bytes (P-1) n)."""
    q_bytes, kv_bytes = q.numel() * q.element_size(), k.numel() * k.element_size()
    if method.implementation == "deepspeed":  # all-to-all of q, k, v, out; backward: of dout, dq, dk, dv
        one_way = (p - 1) * (2 * q_bytes + 2 * kv_bytes) // p
        return one_way, one_way
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    # K and V with the query's heads: one all-gather (or P-1 rotations) of the pair, forward and backward;
    # backward also rotates the pair's gradients P times, in fp32 when convert_to_f32.
    kv_pair = 2 * q_bytes
    grad_pair = 2 * q.numel() * (4 if cp._cp_options.convert_to_f32 else q.element_size())
    return (p - 1) * kv_pair, (p - 1) * kv_pair + (p * grad_pair if p > 1 else 0)


def _build(key: str, comm: Communicator, layout: SequenceLayout, settings: dict) -> tuple[Callable, object]:
    method = METHODS[key]
    if method.implementation == "distseq":
        options = dict(method.options)
        if settings["attention_backend"] is not None:
            options["attention_backend"] = settings["attention_backend"]
        strategy = make_strategy(method.strategy, comm, layout, **options)
        return (lambda q, k, v: strategy.attention(q, k, v, causal=True)), strategy
    if method.implementation == "deepspeed":
        return _deepspeed_ulysses(dist.group.WORLD), None
    return _torch_ring(dist.group.WORLD, layout.kind.value == "zigzag", settings["torch_ring_rotate"]), None


def _check(run: _Run, comm: Communicator, method: Method, record: dict) -> bool:
    """The untimed first step: bytes forward and backward, and errors against the fp64 reference."""
    q, k, v = run.leaves()
    with ObservedCollectives(comm.size, comm.rank) as seen:
        if run.strategy is not None:
            run.strategy.reset_stats()
        out = run.call(q, k, v)
        fwd = (run.strategy.bytes_sent(), run.strategy.bytes_received()) if run.strategy else seen.take()
        if run.strategy is not None:
            run.strategy.reset_stats()
        out.backward(run.inputs[3])
        bwd = (run.strategy.bytes_sent(), run.strategy.bytes_received()) if run.strategy else seen.take()
    record["bytes"] = {"fwd_sent": fwd[0], "fwd_received": fwd[1], "bwd_sent": bwd[0], "bwd_received": bwd[1]}
    if run.strategy is None:
        sched_fwd, sched_bwd = _schedule_bytes(method, comm.size, run.inputs[0], run.inputs[1])
        record["schedule_matches_observed"] = (sched_fwd, sched_fwd, sched_bwd, sched_bwd) == (*fwd, *bwd)
        record["bytes"] = {
            "fwd_sent": sched_fwd,
            "fwd_received": sched_fwd,
            "bwd_sent": sched_bwd,
            "bwd_received": sched_bwd,
        }
    got = dict(zip(TENSORS, (out, q.grad, k.grad, v.grad), strict=True))
    record["abs_err"] = {n: (got[n].double() - run.reference[n]).abs().max().item() for n in TENSORS}
    record["ref_max"] = {n: run.reference[n].abs().max().item() for n in TENSORS}
    return True


def job(seq_len: int, dtype_name: str, keys: list[str], settings: dict, data_path: str) -> dict:
    torch.set_num_threads(settings["threads_per_rank"])
    dtype = getattr(torch, dtype_name)
    comm = Communicator()
    data = torch.load(data_path, mmap=True)
    layouts = {kind: SequenceLayout(kind, seq_len, comm.size, comm.rank) for kind in ("contiguous", "zigzag")}
    # This rank's shards, one copy per layout shared by the methods: q, k, v, dout in dtype; the fp64 reference.
    inputs = {kind: [lay.shard(data[n].to(dtype), 1) for n in ("q", "k", "v", "dout")] for kind, lay in layouts.items()}
    reference = {kind: {n: lay.shard(data[n], 1) for n in TENSORS} for kind, lay in layouts.items()}
    del data
    records: dict[str, dict] = {key: {} for key in keys}
    runs: dict[str, _Run] = {}
    for key in keys:  # in the same order on every rank: usp creates sub-groups (collective)
        layout = layouts[METHODS[key].layout]
        built = attempt_on_all_ranks(records[key], "build", partial(_build, key, comm, layout, settings))
        if built is not None:
            kind = layout.kind.value
            runs[key] = _Run(built[0], inputs[kind], reference[kind], built[1])
            backend = getattr(built[1], "attention_backend", None)
            records[key]["attention_backend"] = None if backend is None else str(getattr(backend, "value", backend))
    for key, run in list(runs.items()):
        if (
            attempt_on_all_ranks(records[key], "first step", partial(_check, run, comm, METHODS[key], records[key]))
            is None
        ):
            del runs[key]
    order = list(runs)
    for repeat in range(settings["repeats"]):
        shift = repeat % max(len(order), 1)  # round-robin: every method takes every slot in turn
        for key in order[shift:] + order[:shift]:
            if key not in runs:
                continue
            dist.barrier()  # the ranks start each step together
            seconds = attempt_on_all_ranks(records[key], f"timed step {repeat}", runs[key].step)
            if seconds is None:
                del runs[key]
                continue
            records[key].setdefault("times_s", []).append(seconds)
    for key, run in runs.items():
        record = {}
        peak = attempt_on_all_ranks(record, "memory", partial(peak_tensor_bytes, run.step))
        records[key]["peak_tensor_bytes"] = peak
        if "error" in record:
            records[key]["memory_error"] = record["error"]
    return {"threads": torch.get_num_threads(), "records": records}


def _write_data(seq_len: int, args: argparse.Namespace, dtype: torch.dtype, path: Path) -> float:
    """Save the full-sequence inputs (fp32, seeded) and the fp64 SDPA reference on the dtype-rounded inputs;
    returns the reference's seconds."""
    g = torch.Generator().manual_seed(args.seed)
    shapes = {"q": args.heads, "k": args.kv_heads, "v": args.kv_heads, "dout": args.heads}
    data = {n: torch.randn(args.batch, seq_len, h, args.head_dim, generator=g) for n, h in shapes.items()}
    start = time.perf_counter()
    q, k, v = (data[n].to(dtype).double().requires_grad_() for n in ("q", "k", "v"))
    rep = args.heads // args.kv_heads
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    # The flash kernel keeps memory linear in N (the math one would need H N^2 doubles); fails rather than fall back.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(1, 2)
        out.backward(data["dout"].to(dtype).double())
    data.update(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    torch.save(data, path)
    return time.perf_counter() - start


def _summarise(seq_len: int, dtype_name: str, keys: list[str], per_rank: list[dict] | None, failure: str | None):
    entries = []
    for key in keys:
        method = METHODS[key]
        entry = {
            "method": key,
            "implementation": method.implementation,
            "strategy": method.strategy or None,
            "options": method.options,
            "layout": method.layout,
            "seq_len": seq_len,
            "dtype": dtype_name,
        }
        records = [r["records"][key] for r in per_rank] if per_rank else []
        failed = next((r for r in records if "traceback" in r), None) or next((r for r in records if "error" in r), {})
        error = failure.splitlines()[0] if failure else failed.get("error")
        if error is None:
            slowest = [max(ts) for ts in zip(*(r["times_s"] for r in records), strict=True)]
            entry.update(status="ok", fwd_bwd_median_s=statistics.median(slowest), fwd_bwd_min_s=min(slowest))
            entry["fwd_bwd_slowest_per_repeat_s"] = slowest
        else:
            entry.update(status="error", error=error, traceback=failure or failed.get("traceback"))
        if records and "bytes" in records[0]:
            entry["bytes_per_rank"] = {n: [r["bytes"][n] for r in records] for n in records[0]["bytes"]}
            entry["bytes_source"] = "Communicator stats" if method.implementation == "distseq" else "schedule"
            if "schedule_matches_observed" in records[0]:
                entry["schedule_matches_observed"] = all(r["schedule_matches_observed"] for r in records)
            entry["max_rel_err"] = {
                n: max(r["abs_err"][n] for r in records) / max(max(r["ref_max"][n] for r in records), 1e-300)
                for n in TENSORS
            }
        if records and records[0].get("peak_tensor_bytes") is not None:
            entry["peak_tensor_bytes_per_rank"] = [r["peak_tensor_bytes"] for r in records]
        if records and "memory_error" in records[0]:
            entry["memory_error"] = records[0]["memory_error"]
        if records and method.implementation == "distseq":
            entry["attention_backend"] = records[0].get("attention_backend")
        entries.append(entry)
    by_key = {e["method"]: e for e in entries if e["status"] == "ok"}
    for e in entries:
        if e["status"] == "ok":
            peers = [p for p in METHODS[e["method"]].peers if p in by_key]
            e["ratio_to"] = {p: e["fwd_bwd_median_s"] / by_key[p]["fwd_bwd_median_s"] for p in peers}
    return entries


def _run_case(
    world: DistributedWorld, seq_len: int, dtype_name: str, keys: list[str], settings: dict, path: Path, timeout: float
):
    """All methods in one job; if the job itself fails (a hang, a crash), each method again in a job of its own."""
    try:
        per_rank = world.run(job, seq_len, dtype_name, keys, settings, str(path), timeout=timeout)
        return _summarise(seq_len, dtype_name, keys, per_rank, None), per_rank[0]["threads"]
    except Exception as err:  # TimeoutError or RemoteError: the world restarts on the next run
        if len(keys) == 1:
            return _summarise(seq_len, dtype_name, keys, None, without_paths(f"{type(err).__name__}: {err}")), None
        print(f"N={seq_len} {dtype_name}: the joint job failed ({type(err).__name__}); methods one by one", flush=True)
    entries, threads = [], None
    for key in keys:
        got, reported = _run_case(world, seq_len, dtype_name, [key], settings, path, timeout)
        threads = threads or reported
        for entry in got:
            entry["timed"] = "alone (the joint job failed)"
        entries += got
    return entries, threads


def plot(results: list[dict], path: Path, title: str) -> None:
    """Time against N per method (one panel per dtype; peers dashed) and each method's time over its peer's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [e for e in results if e["status"] == "ok"]
    dtypes = list(dict.fromkeys(e["dtype"] for e in results))
    fig, axes = plt.subplots(1, len(dtypes) + 1, figsize=(5.5 * (len(dtypes) + 1), 4.8), squeeze=False)
    colours = {key: f"C{i}" for i, key in enumerate(METHODS)}
    for ax, dtype in zip(axes[0], dtypes, strict=False):
        for key in METHODS:
            pts = sorted(
                (e["seq_len"], e["fwd_bwd_median_s"]) for e in ok if e["method"] == key and e["dtype"] == dtype
            )
            if pts:
                style = "--" if METHODS[key].implementation != "distseq" else "-"
                ax.plot(*zip(*pts, strict=True), style, marker="o", color=colours[key], label=key)
        ax.set(title=dtype, xlabel="sequence length N", ylabel="fwd+bwd s (median, slowest rank)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax = axes[0][-1]
    for key, method in METHODS.items():
        for j, dtype in enumerate(dtypes):
            pts = sorted(
                (e["seq_len"], e["ratio_to"][method.peers[0]])
                for e in ok
                if e["method"] == key and e["dtype"] == dtype and method.peers and method.peers[0] in e["ratio_to"]
            )
            if pts:
                label = f"{key} / {method.peers[0]} ({dtype})"
                ax.plot(*zip(*pts, strict=True), ["-", ":"][j % 2], marker="o", color=colours[key], label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(title="time ratio (< 1: faster than the peer)", xlabel="sequence length N", ylabel="time / peer time")
    ax.set_xscale("log", base=2)
    for ax in axes[0]:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(results: list[dict]) -> None:
    print(
        f"{'method':<19}{'layout':<11}{'N':>6} {'dtype':<9}{'fwd+bwd s':>10}{'ratio':>7}  {'peer':<18}"
        f"{'MiB sent':>9}{'peak MiB':>9}{'max rel err':>12}"
    )
    for e in results:
        head = f"{e['method']:<19}{e['layout']:<11}{e['seq_len']:>6} {e['dtype']:<9}"
        if e["status"] != "ok":
            print(head + f"  error: {e['error'][:80]}")
            continue
        peer = next(iter(e["ratio_to"]), "")
        ratio = f"{e['ratio_to'][peer]:.2f}" if peer else ""
        sent = max(a + b for a, b in zip(e["bytes_per_rank"]["fwd_sent"], e["bytes_per_rank"]["bwd_sent"], strict=True))
        peak = max(e.get("peak_tensor_bytes_per_rank") or [float("nan")]) / 2**20
        print(
            f"{head}{e['fwd_bwd_median_s']:>10.3f}{ratio:>7}  {peer:<18}{sent / 2**20:>9.1f}{peak:>9.1f}"
            f"{max(e['max_rel_err'].values()):>12.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per method (at least 1)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument(
        "--attention-backend",
        choices=["auto", "sdpa", "reference", "flash_attn"],
        default=None,
        help="passed to the distseq strategies as attention_backend= (default: not passed)",
    )
    parser.add_argument(
        "--torch-ring-rotate",
        choices=["allgather", "alltoall"],
        default="allgather",
        help="torch ring's K/V rotation, _cp_options.rotate_method (torch's default: allgather)",
    )
    parser.add_argument("--threads-per-rank", type=int, default=None, help="default: cpu_count // nproc, at least 1")
    parser.add_argument("--job-timeout", type=float, default=4 * 3600, help="seconds for all methods at one (N, dtype)")
    parser.add_argument("--collective-timeout", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "sp_attention_cpu.json")
    args = parser.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads must be divisible by --kv-heads: heads={args.heads}, kv_heads={args.kv_heads}")
    threads = args.threads_per_rank = args.threads_per_rank or max(1, (os.cpu_count() or 1) // args.nproc)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the ranks (set before they spawn)
    settings = {
        "threads_per_rank": threads,
        "repeats": args.repeats,
        "attention_backend": args.attention_backend,
        "torch_ring_rotate": args.torch_ring_rotate,
    }
    config = {k: v for k, v in vars(args).items() if k != "out"} | {
        "causal": True,
        "methods": {
            k: {
                "implementation": m.implementation,
                "strategy": m.strategy or None,
                "options": m.options,
                "layout": m.layout,
                "peers": list(m.peers),
            }
            for k, m in METHODS.items()
            if k in args.methods
        },
        "peer_calls": PEER_CALLS,
        "reference": "torch.nn.functional.scaled_dot_product_attention(is_causal=True), float64, flash kernel, full "
        "sequence in one process, on the inputs rounded to the dtype; max_rel_err = max|x - ref| / max|ref| over "
        "the full sequence",
        "timing": "per (N, dtype): one untimed step per method (warm-up, bytes, errors), then `repeats` steps with "
        "the methods interleaved round-robin; a step's time is the slowest rank's; fwd_bwd_median_s (ratio_to uses "
        "it) and fwd_bwd_min_s over the repeats",
        "memory": "peak_tensor_bytes_per_rank: peak bytes held by tensors allocated through torch's CPU allocator "
        "during one warm fwd+bwd step, above those live when it started (inputs excluded; output, gradients and "
        "freed temporaries included), from profiler allocation events; not gloo's internal buffers",
        "bytes": "per rank, payload bytes by Communicator's convention; distseq from Communicator stats, peers "
        "from their schedules (schedule_matches_observed: equal to the bytes of the torch collectives they called)",
    }
    machine = machine_info(threads_per_rank=threads, ranks=args.nproc)
    try:
        import deepspeed

        machine["deepspeed"] = deepspeed.__version__
    except ImportError:
        machine["deepspeed"] = None
    results: list[dict] = []
    torch.set_num_threads(os.cpu_count() or 1)  # the reference runs here while the ranks wait
    with (
        tempfile.TemporaryDirectory(prefix="sp_attention_") as tmp,
        # The world's own timeout bounds its start-up; each job has --job-timeout.
        DistributedWorld(args.nproc, timeout=600, collective_timeout=args.collective_timeout) as world,
    ):
        for seq_len in args.seq_lens:
            for dtype_name in args.dtypes:
                path = Path(tmp) / f"{seq_len}_{dtype_name}.pt"
                try:
                    reference_s = _write_data(seq_len, args, getattr(torch, dtype_name), path)
                except Exception as err:  # e.g. out of memory: this (N, dtype) is lost, not the run
                    failure = without_paths(f"reference: {type(err).__name__}: {err}")
                    results += _summarise(seq_len, dtype_name, args.methods, None, failure)
                    write_json(args.out, config, results, machine)
                    continue
                start = time.perf_counter()
                entries, ranks_threads = _run_case(
                    world, seq_len, dtype_name, args.methods, settings, path, args.job_timeout
                )
                took = time.perf_counter() - start
                print(f"N={seq_len} {dtype_name}: reference {reference_s:.1f}s, methods {took:.1f}s", flush=True)
                machine["threads_per_rank_reported"] = ranks_threads or machine.get("threads_per_rank_reported")
                results += entries
                path.unlink()
                write_json(args.out, config, results, machine)
    title = (
        f"causal attention fwd+bwd, sp={args.nproc} gloo ranks x {threads} thread(s), B={args.batch} H={args.heads} "
        f"Hkv={args.kv_heads} D={args.head_dim}; {machine['cpu_count']} CPU cores, torch {torch.__version__}"
    )
    try:
        plot(results, args.out.with_suffix(".png"), title)
    except Exception as err:  # the JSON is the record; a plotting failure must not lose it
        print(f"plot failed: {err}")
    _table(results)
    print(f"wrote {args.out.name} and {args.out.with_suffix('.png').name} in {args.out.parent.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
