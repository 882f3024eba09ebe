"""Predicted step time of one parallel layout: compute from FLOPs, communication from the dry-run plan's exact
bytes, on a :class:`ClusterProfile`.

Per rank and optimizer step:

* compute: ``model_flops_per_sequence``'s parts, split by kind (weight matmuls, softmax attention, linear scans),
  for ``global_batch / dp`` sequences split over ``sp x tp`` ranks, each kind at its own fraction of the peak; a
  recomputed forward (activation checkpointing) adds one forward; causal attention on the contiguous layout counts
  its slowest rank (``2P / (P + 1)`` of the mean);
* communication: every category of the plan (each SP strategy's layers, the halos, TP all-reduces, expert
  all-to-alls, the gradient reduction) at the bandwidth of the links its process group crosses (one node:
  intra-node; several: inter-node), plus one latency per message;
* overlap: what a schedule hides behind compute (ring and TokenRing hops behind the block kernels, LASP-2's state
  gather behind the intra-chunk term, All-Scan's pieces, the gradient reduction behind the backward under DDP /
  FSDP / DeepSpeed) costs only what exceeds the compute it overlaps; everything else adds.

The result names the binding resource: compute, or the communication category that costs most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distseq.config.model import ModelConfig
from distseq.plan.calls import AttentionRates, attention_work, shared_device_seconds
from distseq.plan.profiles import ClusterProfile, Link
from distseq.train.metrics import model_flops_per_sequence

__all__ = ["Prediction", "link_seconds", "predict_step", "strategy_key"]

#: sequence-parallel strategies whose exchange runs behind the layer's own compute
_OVERLAPPED = {"ring", "token_ring", "lasp2", "allscan", "usp"}
_ATTENTION = {"softmax_attention"}
_SCANS = {"linear_attention", "mamba_scan", "delta_rule"}


@dataclass
class Prediction:
    step_s: float
    compute_s: float
    comm_s: dict[str, float]  # per category, as exposed after overlap
    memory_bytes: int
    fits: bool
    binding: str
    details: dict[str, Any] = field(default_factory=dict)


def _link(groups: list[list[int]], gpus_per_node: int, profile: ClusterProfile) -> tuple[Link, bool]:
    """The link a process group's traffic takes: inter-node when any group spans nodes."""
    crosses = any(len({r // gpus_per_node for r in group}) > 1 for group in groups)
    return (profile.inter if crosses else profile.intra), crosses


def link_seconds(nbytes: float, messages: float, link: Link, efficiency: float, primitive: str = "") -> float:
    """``nbytes`` over ``link`` at its bandwidth for ``primitive`` times ``efficiency``, plus a latency per message."""
    return nbytes / (link.bandwidth(primitive) * 1e9 * efficiency) + messages * link.latency_us * 1e-6


def _softmax_seconds(cfg: ModelConfig, report: dict[str, Any], profile: ClusterProfile, dtype: str) -> float:
    """Forward + backward seconds of every softmax layer's kernels for one sequence on the slowest SP rank: the
    kernel calls of the strategy's own block plans (:mod:`distseq.plan.calls`), on a shared device as
    :func:`~distseq.plan.calls.shared_device_seconds` says. (The step's communication is priced apart, per
    category, with the overlap the strategy allows.)"""
    layers = cfg.layer_pattern.count("A")
    if not layers:
        return 0.0
    inputs, layout = report["inputs"], report["layout"]
    heads = cfg.num_heads // layout["tp"]
    per_rank = attention_work(
        inputs["softmax_strategy"], inputs["layout"], inputs["seq_len"], layout["sp"], heads, inputs["ulysses_degree"]
    )
    rates = AttentionRates.of(profile, dtype)
    times = [sum(w.seconds(cfg.head_dim, rates) for w in steps) for steps in per_rank]
    return layers * shared_device_seconds(times, profile.ranks_per_device)


def strategy_key(kind: str, strategy: str, layout: str, ulysses_degree: int | None = None) -> str:
    """The key of a layer kind's strategy in a profile's ``strategy_overhead_us``."""
    name = f"usp{ulysses_degree}" if strategy == "usp" else strategy
    return f"{kind}/{name}/{layout}"


def _strategy_overhead(report: dict[str, Any], profile: ClusterProfile) -> float:
    """Seconds per step of what a measured profile found each softmax and linear layer's strategy costs beyond the
    model: a fixed cost per layer and micro-batch (forward + backward), measured at one small size by ``distseq
    check --profile`` (the steps' synchronisation, dispatch and copies the model does not see)."""
    if not profile.strategy_overhead_us:
        return 0.0
    inputs = report["inputs"]
    seconds = 0.0
    for entry in report["communication"]["sequence_parallel"]:
        if entry["kind"] in ("softmax", "linear"):
            key = strategy_key(entry["kind"], entry["strategy"], inputs["layout"], inputs["ulysses_degree"])
            seconds += entry["layers"] * inputs["grad_accum"] * profile.strategy_overhead_us.get(key, 0.0) * 1e-6
    return seconds


def predict_step(
    cfg: ModelConfig,
    report: dict[str, Any],
    profile: ClusterProfile,
    *,
    gpus_per_node: int,
    seq_len: int,
    global_batch: int,
    checkpointing: bool,
    dtype: str = "bf16",
) -> Prediction:
    """The predicted step of ``report`` (``distseq.train.plan.plan_report`` for the same config and layout)."""
    layout = report["layout"]
    dp, sp, tp = layout["dp"], layout["sp"], layout["tp"]
    grad_accum = report["inputs"]["grad_accum"]
    eff = profile.efficiency
    peak = profile.peak_tflops[dtype] * 1e12

    parts = model_flops_per_sequence(cfg, seq_len)
    sequences = global_batch / dp  # per dp rank, split over its sp x tp ranks
    share = sequences / (sp * tp)
    forward_passes = 3 + int(checkpointing)  # backward = 2 forwards; checkpointing recomputes one
    kinds = {"matmul": 0.0, "attention": 0.0, "scan": 0.0}
    for name, flops in parts.items():
        if name in ("weight_matmuls", "total_forward", "total_train") or name in _ATTENTION:
            continue
        kind = "scan" if name in _SCANS else "matmul"
        kinds[kind] += flops * forward_passes * share
    compute = {k: v / (peak * eff[k]) for k, v in kinds.items()}
    compute["attention"] = _softmax_seconds(cfg, report, profile, dtype) * sequences
    compute["attention"] *= forward_passes / 3
    compute["strategy overhead"] = _strategy_overhead(report, profile)
    compute_s = sum(compute.values())

    groups = layout["groups"]
    comm = report["communication"]
    exposed: dict[str, float] = {}
    raw: dict[str, float] = {}
    link, crosses = _link(groups["sp"], gpus_per_node, profile)
    layer_compute = compute_s / max(cfg.num_layers, 1)
    for entry in comm["sequence_parallel"]:
        calls = entry["layers"] * grad_accum * 2  # forward and backward
        seconds = link_seconds(entry["per_step_sent"], calls * max(sp - 1, 1), link, eff["link"], entry["primitive"])
        raw[entry["kind"]] = seconds
        hidden = entry["layers"] * layer_compute * profile.overlap if entry["strategy"] in _OVERLAPPED else 0.0
        exposed[f"sp {entry['kind']} ({entry['strategy']})"] = max(0.0, seconds - hidden)
    for name, axis in (("tensor_parallel", "tp"), ("expert_parallel", "ep")):
        nbytes = comm[name]["per_step"]
        if nbytes:
            axis_link, _ = _link(groups[axis], gpus_per_node, profile)
            seconds = link_seconds(
                nbytes, cfg.num_layers * grad_accum * 2, axis_link, eff["link"], comm[name]["primitive"]
            )
            raw[name] = exposed[name] = seconds
    gradients = comm["gradients"]["per_step"]
    if gradients:
        grad_link, _ = _link(groups["dp_sp"], gpus_per_node, profile)
        seconds = link_seconds(gradients, 2 * max(layout["dp_sp"] - 1, 1), grad_link, eff["link"], "all_reduce")
        overlapped = report["inputs"]["data_parallel"] in ("ddp", "fsdp", "deepspeed")
        raw["gradients"] = seconds
        hidden = (2 / 3) * compute_s * profile.overlap if overlapped else 0.0
        exposed["gradients"] = max(0.0, seconds - hidden)
    step_s = compute_s + sum(exposed.values())
    memory = report["memory"]["total"]
    fits = memory <= profile.memory_bytes
    worst = max(exposed.items(), key=lambda kv: kv[1], default=("", 0.0))
    binding = "memory" if not fits else ("compute" if compute_s >= worst[1] else worst[0])
    return Prediction(
        step_s=step_s,
        compute_s=compute_s,
        comm_s=exposed,
        memory_bytes=memory,
        fits=fits,
        binding=binding,
        details={"compute_by_kind_s": compute, "comm_raw_s": raw, "sp_crosses_nodes": crosses},
    )
