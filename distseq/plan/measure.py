"""A cluster profile measured on the machine at hand (``distseq check --profile``), in the shape of
``profiles.json``, so ``distseq plan --profile measured.json`` and ``benchmarks/scaling.py`` predict with what this
machine does rather than with a datasheet.

Every rank measures at the same time (a world of ``P`` ranks on fewer cores shares them, and the profile must say
what one rank gets then); each figure is the median over repeats of the slowest rank's time:

* compute: a weight matmul (``[tokens, hidden] @ [hidden, hidden]``, forward), the local softmax attention
  (distseq's attention on one rank: the kernel the strategies run, causal, forward + backward) and the chunked
  linear attention (gated, forward + backward), each as TFLOP/s by the FLOP counts the planner uses;
* memory: an elementwise pass over a large buffer (read + write bytes per second), what merges and copies cost;
* per call: the time of one tiny operator (the dispatch overhead every kernel launch pays);
* links: each collective's bus bandwidth at ``link_bytes`` and a one-element ``send_recv``'s time (latency);
* overlap: a ``send_recv`` started before the attention kernel and waited after it, against the two apart: the
  fraction of the shorter one that hid behind the other (0 on a CPU whose cores are all busy computing).

The shapes default to a small model's; ``hidden``, ``heads``, ``head_dim`` and ``tokens`` follow a run config when
one is given, so the profile describes the kernels that run will call.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from distseq.parallel.comm import Communicator

__all__ = ["ProfileShapes", "measure_profile"]


@dataclass(frozen=True)
class ProfileShapes:
    """What the profile is measured at: the kernels at ``tokens`` per rank, each sequence-parallel strategy's
    layer at ``calibration_tokens`` per rank (default half of ``tokens``), collectives at ``link_bytes``."""

    hidden: int = 256
    heads: int = 4
    head_dim: int = 64
    tokens: int = 2048
    link_bytes: int = 1 << 22
    repeats: int = 5
    kv_heads: int | None = None  # default: heads
    calibration_tokens: int | None = None


def slowest_seconds(comm: Communicator, fn: Callable[[], Any]) -> float:
    """Seconds of one ``fn()`` on the slowest rank of ``comm``, the ranks started together."""
    comm.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    if comm.size > 1:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=comm.group)
    return float(elapsed)


def _slowest_median(comm: Communicator, fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of ``fn()``: per repeat the slowest rank's (ranks start together), median over repeats."""
    fn()  # warm-up: allocations, dispatch caches
    return statistics.median(slowest_seconds(comm, fn) for _ in range(repeats))


def _attention_step(
    shapes: ProfileShapes, dtype: torch.dtype, device: torch.device, *, causal: bool
) -> Callable[[], None]:
    """One forward + backward of the local attention kernel over this rank's tokens (what the strategies call)."""
    from distseq.kernels.attention import BlockKind
    from distseq.kernels.attention.backends import attention_backend

    backend = attention_backend("auto", device, dtype, shapes.head_dim)
    kind = BlockKind.CAUSAL if causal else BlockKind.FULL
    shape = (1, shapes.tokens, shapes.heads, shapes.head_dim)
    q, k, v, dout = (torch.randn(shape, dtype=dtype, device=device) for _ in range(4))
    scale = shapes.head_dim**-0.5

    def step() -> None:
        out, lse = backend.forward(q, k, v, kind, scale)
        backend.backward(dout, q, k, v, out, lse, kind, scale)

    return step


def _attention_rates(shapes, dtype, device, timed) -> tuple[float, float]:
    """(FLOP/s, seconds per query row and head of a causal call): a full call of ``T x T`` is its FLOPs at the
    kernel's rate; a causal one adds the cost of its diagonal band, linear in ``T`` (partly masked tiles)."""
    full = timed(_attention_step(shapes, dtype, device, causal=False))
    causal = timed(_attention_step(shapes, dtype, device, causal=True))
    t, h = shapes.tokens, shapes.heads
    rate = 3 * 4 * shapes.head_dim * h * t * t / full
    band = causal - _train_flops(shapes, "A") / rate
    return rate, max(band, 0.0) / (h * t)


def _train_flops(shapes: ProfileShapes, layer: str) -> float:
    """Forward + backward FLOPs of one ``layer`` ("A" softmax, "L" linear) as the planner counts them
    (``model_flops_per_sequence``: backward = 2 forwards), so the measured rate is in the planner's units."""
    from distseq.config.model import ModelConfig
    from distseq.train.metrics import model_flops_per_sequence

    cfg = ModelConfig(
        hidden_size=shapes.heads * shapes.head_dim,
        num_heads=shapes.heads,
        num_kv_heads=shapes.heads,
        layer_pattern=layer,
        mlp_pattern="D",
    )
    part = "softmax_attention" if layer == "A" else "linear_attention"
    return 3 * model_flops_per_sequence(cfg, shapes.tokens)[part]


def measure_profile(
    comm: Communicator,
    shapes: ProfileShapes = ProfileShapes(),
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    name: str = "measured",
) -> dict[str, Any]:
    """Measure this machine (every rank of ``comm`` calls it); the profile as a dict in ``profiles.json``'s shape."""
    device = torch.device(device)
    p = comm.size
    reps = shapes.repeats
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn: Callable[[], Any]) -> float:
        return _slowest_median(comm, lambda: (fn(), sync()), reps)

    n, h = shapes.tokens, shapes.hidden
    a, w = torch.randn(n, h, dtype=dtype, device=device), torch.randn(h, h, dtype=dtype, device=device)
    matmul = 2 * n * h * h / timed(lambda: a @ w) / 1e12
    attention_rate, row_s = _attention_rates(shapes, dtype, device, timed)
    attention = attention_rate / 1e12
    # the chunked linear attention alone: one LASP-2 layer on a one-rank communicator (nothing to exchange)
    scan_step = _layer_step(Communicator.solo(), "linear", "lasp2", "contiguous", None, n, shapes, dtype, device)
    scan = _train_flops(shapes, "L") / timed(scan_step) / 1e12
    big = torch.randn(1 << 24, dtype=torch.float32, device=device)
    other = torch.randn_like(big)
    memory_gbps = 3 * big.numel() * 4 / timed(lambda: big.add_(other)) / 1e9  # two reads, one write
    tiny = torch.zeros(1, device=device)
    calls = 200
    call_us = timed(lambda: [tiny.add_(1.0) for _ in range(calls)]) / calls * 1e6

    links: dict[str, float] = {}
    latency_us, overlap = 0.0, 0.0
    if p > 1:
        numel = shapes.link_bytes // 4
        x = torch.randn(numel, dtype=torch.float32, device=device)
        rows = x.reshape(p, -1) if numel % p == 0 else x[: numel - numel % p].reshape(p, -1)
        size = x.numel() * 4
        share = (p - 1) / p
        # nccl-tests' bus bandwidth: algorithm bandwidth times the collective's correction factor
        links["all_gather"] = p * size * share / timed(lambda: comm.all_gather(x)) / 1e9
        links["all_to_all"] = rows.numel() * 4 * share / timed(lambda: comm.all_to_all(rows, 0, 0)) / 1e9
        links["all_reduce"] = size * 2 * share / timed(lambda: comm.all_reduce(x.clone())) / 1e9
        links["send_recv"] = size / timed(lambda: comm.send_recv([x], 1).commit().wait()) / 1e9
        one = torch.zeros(1, device=device)
        latency_us = timed(lambda: comm.send_recv([one], 1).commit().wait()) * 1e6
        overlap = _overlap(comm, x, a, w, timed)
    gbps = links.get("send_recv", 0.0)
    cpu = _cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    source = f"distseq check --profile: {p} rank(s) of {cpu}, {str(dtype).removeprefix('torch.')}"
    profile = {
        "_about": (
            f"Measured by `distseq check --profile` ({source}); shapes: hidden {h}, {shapes.heads} heads x "
            f"{shapes.head_dim}, {n} tokens per rank. Peaks are the measured matmul rate (efficiency 1), the "
            "other kernel kinds relative to it; link figures are bus bandwidths per collective."
        ),
        "devices": {
            name: {
                "bf16": matmul,
                "fp32": matmul,
                "memory_gib": _memory_gib(device) / max(p, 1) if device.type == "cpu" else _memory_gib(device),
                "memory_gbps": memory_gbps,
                "call_overhead_us": call_us,
                "attention_row_ns": row_s * 1e9,
                "source": source,
            }
        },
        "links": {
            name: {
                "gbps": gbps,
                "latency_us": latency_us,
                "primitives_gbps": links,
                "source": source,
            }
        },
        "efficiency": {
            "matmul": 1.0,
            "attention": attention / matmul,
            "scan": scan / matmul,
            "link": 1.0,
            "overlap": overlap,
        },
        "clusters": {
            name: {"device": name, "intra": name, "inter": name, "ranks_per_device": _ranks_per_device(p, device)}
        },
    }
    if p > 1:
        overheads = _strategy_overheads(comm, shapes, dtype, device, timed, profile, name)
        profile["devices"][name]["strategy_overhead_us"] = overheads
    return profile


def _calibration_grid(p: int, heads: int, kv_heads: int) -> list[tuple[str, str, str, int | None]]:
    """(layer kind, strategy, layout, Ulysses degree) of every strategy that runs on ``p`` ranks with these heads."""
    from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES

    grid = []
    for layout in ("contiguous", "zigzag"):
        for strategy in SOFTMAX_STRATEGIES:
            if strategy == "usp":
                grid += [("softmax", "usp", layout, u) for u in range(2, p) if p % u == 0 and heads % u == 0]
            elif strategy != "ulysses" or heads % p == 0:
                grid.append(("softmax", strategy, layout, None))
        for strategy in [*LINEAR_STRATEGIES, "ulysses"]:
            if strategy != "ulysses" or heads % p == 0:
                grid.append(("linear", strategy, layout, None))
    return grid


def _layer_step(comm, kind, strategy, layout, u, seq_len, shapes, dtype, device) -> Callable[[], None]:
    """One layer of ``strategy`` on every rank of ``comm``, forward + backward (softmax: causal, GQA as the
    shapes say; linear: with a data-dependent gate, as the models run it)."""
    from distseq.parallel.layout import SequenceLayout
    from distseq.parallel.sequence.registry import make_strategy

    options = {"ulysses_degree": u} if u else {}
    sp = make_strategy(strategy, comm, SequenceLayout(layout, seq_len, comm.size, comm.rank), **options)
    n = seq_len // comm.size
    kv_heads = (shapes.kv_heads or shapes.heads) if kind == "softmax" else shapes.heads
    q = torch.randn(1, n, shapes.heads, shapes.head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(1, n, kv_heads, shapes.head_dim, dtype=dtype, device=device) for _ in range(2))
    gate = torch.nn.functional.logsigmoid(torch.randn(1, n, shapes.heads, device=device))
    dout = torch.randn_like(q)

    def step() -> None:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        if kind == "softmax":
            out = sp.attention(*leaves, causal=True)
        else:
            out = sp.linear_attention(*leaves, gate=gate.detach().requires_grad_())
        out.backward(dout)

    return step


def _modelled_layer(kind, strategy, layout, u, seq_len, shapes, profile, p, dtype) -> float:
    """What the cost model charges that one layer: its kernels and its exposed sequence-parallel communication."""
    from distseq.config.model import ModelConfig
    from distseq.parallel.mesh import ParallelDims
    from distseq.plan.cost import predict_step
    from distseq.train.plan import plan_report

    model = ModelConfig(
        hidden_size=shapes.heads * shapes.head_dim,
        num_heads=shapes.heads,
        num_kv_heads=shapes.kv_heads or shapes.heads,
        layer_pattern="A" if kind == "softmax" else "L",
        mlp_pattern="D",
        linear_gate=True,
    )
    report = plan_report(
        model,
        ParallelDims(sp=p, world_size=p),
        seq_len=seq_len,
        micro_batch=1,
        grad_accum=1,
        softmax_strategy=strategy if kind == "softmax" else "ring",
        linear_strategy=strategy if kind == "linear" else "lasp2",
        layout=layout,
        dtype_bytes=dtype.itemsize,
        ulysses_degree=u,
    )
    precision = "fp32" if dtype == torch.float32 else "bf16"
    prediction = predict_step(
        model, report, profile, gpus_per_node=p, seq_len=seq_len, global_batch=1, checkpointing=False, dtype=precision
    )
    compute = prediction.details["compute_by_kind_s"]["attention" if kind == "softmax" else "scan"]
    return compute + prediction.comm_s[f"sp {kind} ({strategy})"]


def _strategy_overheads(comm, shapes, dtype, device, timed, profile: dict, name: str) -> dict[str, float]:
    """Per strategy and layout, the microseconds one layer (forward + backward) takes beyond what the model charges
    it (its kernel calls and exposed communication, on the profile measured so far), at ``calibration_tokens`` per
    rank: the synchronisation of its steps, dispatch and copies the model does not see. The planner adds it as a
    fixed cost per layer at every length, so any other length checks the model's extrapolation."""
    from distseq.plan.cost import strategy_key
    from distseq.plan.profiles import profile_from_data

    p = comm.size
    tokens = shapes.calibration_tokens or max(shapes.tokens // 2, 2)
    tokens -= tokens % 2  # zigzag: two chunks per rank
    seq_len = tokens * p
    partial = profile_from_data(profile, name)
    overheads = {}
    for kind, strategy, layout, u in _calibration_grid(p, shapes.heads, shapes.kv_heads or shapes.heads):
        measured = timed(_layer_step(comm, kind, strategy, layout, u, seq_len, shapes, dtype, device))
        modelled = _modelled_layer(kind, strategy, layout, u, seq_len, shapes, partial, p, dtype)
        overheads[strategy_key(kind, strategy, layout, u)] = (measured - modelled) * 1e6
    return overheads


def _overlap(comm: Communicator, x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, timed) -> float:
    """The fraction of a ``send_recv`` of ``x`` that hides behind matmuls of about the same duration started after
    it: ``(compute + transfer - together) / transfer``, clipped to ``[0, 1]``."""
    transfer = timed(lambda: comm.send_recv([x], 1).commit().wait())
    one = timed(lambda: a @ w)
    repeats = max(1, round(transfer / max(one, 1e-9)))

    def compute() -> None:
        for _ in range(repeats):
            a @ w

    alone = timed(compute)

    def both() -> None:
        exchange = comm.send_recv([x], 1).commit()
        compute()
        exchange.wait()

    together = timed(both)
    return max(0.0, min(1.0, (alone + transfer - together) / min(alone, transfer)))


def _ranks_per_device(world: int, device: torch.device) -> float:
    """Ranks sharing one compute device: on a CPU, this host's ranks over its cores (at least 1)."""
    if device.type != "cpu":
        return 1.0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1.0, local / cores)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0
