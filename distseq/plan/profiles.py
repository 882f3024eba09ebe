"""Device and link profiles for the planner: what one GPU computes and holds, what its links move.

The numbers live in ``profiles.json`` next to this file, each with its source; a profile is named by a cluster
entry there (``h100``, ``h200``, ``a100``, ``b200``, ...) or read from a JSON file of the same shape. A device's
memory bandwidth (``memory_gbps``) and its published attention-kernel rates (``attention_kernels``) are optional.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["AttentionKernel", "ClusterProfile", "Link", "load_profile", "profile_from_data", "profile_names"]

DATA = Path(__file__).with_name("profiles.json")


@dataclass(frozen=True)
class Link:
    gbps: float  # GB/s per GPU and direction
    latency_us: float  # per message (one step of a collective)
    #: measured bus bandwidth per collective (``all_gather``, ``all_to_all``, ``all_reduce``, ``send_recv``), where
    #: a measured profile has them; otherwise every primitive moves at ``gbps``
    primitives_gbps: dict[str, float] = field(default_factory=dict)

    def bandwidth(self, primitive: str) -> float:
        """GB/s of ``primitive`` (a name such as ``all_gather`` or a plan's description starting with one)."""
        for name, gbps in self.primitives_gbps.items():
            if primitive.startswith(name):
                return gbps
        return self.gbps


@dataclass(frozen=True)
class AttentionKernel:
    """Published TFLOP/s of a device's softmax-attention kernel by pass and mask, at long sequences (a causal call
    counts half the pairs of a full one)."""

    fwd_tflops: float
    fwd_causal_tflops: float
    bwd_tflops: float
    bwd_causal_tflops: float
    source: str

    def tflops(self, *, backward: bool, causal: bool) -> float:
        if backward:
            return self.bwd_causal_tflops if causal else self.bwd_tflops
        return self.fwd_causal_tflops if causal else self.fwd_tflops


@dataclass(frozen=True)
class ClusterProfile:
    """One kind of GPU node: the device's peaks (TFLOP/s) and memory, its intra- and inter-node links, and the
    fraction of peak each kind of work reaches (``matmul``, ``attention``, ``scan``, ``link``)."""

    name: str
    device: str
    peak_tflops: dict[str, float]  # "bf16", "fp32"
    memory_bytes: int
    intra: Link
    inter: Link
    efficiency: dict[str, float]
    #: ranks sharing one compute device: 1 on GPUs; on a CPU running more ranks than cores, ranks / cores, and the
    #: cores are shared among the ranks still working (``distseq check --profile`` records it)
    ranks_per_device: float = 1.0
    #: fraction of a transfer that can hide behind compute (1 where DMA engines move the bytes; measured on CPUs)
    overlap: float = 1.0
    #: a softmax kernel call's cost per query or key row and head, forward + backward, on top of its FLOPs (ns)
    attention_row_ns: float = 0.0
    #: HBM bandwidth in GB/s (elementwise passes run at ``efficiency["memory"]`` of it), where the profile has it
    memory_gbps: float | None = None
    #: measured profiles: what one layer of each sequence-parallel strategy takes (forward + backward, us) beyond
    #: the model's kernels and exposed communication, measured at one small size (``distseq check --profile``) and
    #: charged as a fixed cost per layer and micro-batch; keys ``softmax/<strategy>/<layout>`` (``usp<u>`` for
    #: usp) and ``linear/<strategy>/<layout>``
    strategy_overhead_us: dict[str, float] = field(default_factory=dict)
    #: the device's published attention-kernel rates, where ``profiles.json`` has them
    attention_kernel: AttentionKernel | None = None


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def profile_names() -> list[str]:
    return sorted(_read(DATA)["clusters"])


def load_profile(name_or_path: str) -> ClusterProfile:
    """The cluster profile ``name_or_path``: a name in ``profiles.json`` or a JSON file with the same sections."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():  # a file of one's own: its first cluster
        data = _read(path)
        return profile_from_data(data, next(iter(data["clusters"])))
    return profile_from_data(_read(DATA), name_or_path)


def profile_from_data(data: dict[str, Any], name: str) -> ClusterProfile:
    """Cluster ``name`` of ``data``, a dict in ``profiles.json``'s shape."""
    name_or_path = name
    clusters = data["clusters"]
    if name not in clusters:
        raise ValueError(f"unknown profile {name_or_path!r}; choose one of {sorted(clusters)} or a JSON file")
    cluster = clusters[name]
    device = data["devices"][cluster["device"]]
    links = data["links"]
    kernel = data.get("attention_kernels", {}).get(cluster["device"])
    return ClusterProfile(
        name=name,
        device=cluster["device"],
        peak_tflops={k: float(device[k]) for k in ("bf16", "fp32")},
        memory_bytes=int(device["memory_gib"] * 2**30),
        intra=_link(links[cluster["intra"]]),
        inter=_link(links[cluster["inter"]]),
        efficiency={k: float(v) for k, v in data["efficiency"].items() if k != "overlap"},
        ranks_per_device=float(cluster.get("ranks_per_device", 1.0)),
        attention_row_ns=float(device.get("attention_row_ns", 0.0)),
        strategy_overhead_us={k: float(v) for k, v in device.get("strategy_overhead_us", {}).items()},
        overlap=float(data["efficiency"].get("overlap", 1.0)),
        memory_gbps=float(device["memory_gbps"]) if "memory_gbps" in device else None,
        attention_kernel=AttentionKernel(**kernel) if kernel else None,
    )


def _link(entry: dict[str, Any]) -> Link:
    primitives = {k: float(v) for k, v in entry.get("primitives_gbps", {}).items()}
    return Link(float(entry["gbps"]), float(entry["latency_us"]), primitives)
