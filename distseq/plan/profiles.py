"""Device and link profiles for the planner: what one GPU computes and holds, what its links move.

The numbers live in ``profiles.json`` next to this file, each with its source; a profile is named by a cluster
entry there (``h100``, ``h200``, ``a100``, ``b200``, ...) or read from a JSON file of the same shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ClusterProfile", "Link", "load_profile", "profile_names"]

DATA = Path(__file__).with_name("profiles.json")


@dataclass(frozen=True)
class Link:
    gbps: float  # GB/s per GPU and direction
    latency_us: float  # per message (one step of a collective)


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


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def profile_names() -> list[str]:
    return sorted(_read(DATA)["clusters"])


def load_profile(name_or_path: str) -> ClusterProfile:
    """The cluster profile ``name_or_path``: a name in ``profiles.json`` or a JSON file with the same sections."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():  # a file of one's own: its first cluster
        data = _read(path)
        name = next(iter(data["clusters"]))
    else:
        data, name = _read(DATA), name_or_path
    clusters = data["clusters"]
    if name not in clusters:
        raise ValueError(f"unknown profile {name_or_path!r}; choose one of {sorted(clusters)} or a JSON file")
    cluster = clusters[name]
    device = data["devices"][cluster["device"]]
    links = data["links"]
    return ClusterProfile(
        name=name,
        device=cluster["device"],
        peak_tflops={k: float(device[k]) for k in ("bf16", "fp32")},
        memory_bytes=int(device["memory_gib"] * 2**30),
        intra=Link(links[cluster["intra"]]["gbps"], links[cluster["intra"]]["latency_us"]),
        inter=Link(links[cluster["inter"]]["gbps"], links[cluster["inter"]]["latency_us"]),
        efficiency={k: float(v) for k, v in data["efficiency"].items()},
    )
