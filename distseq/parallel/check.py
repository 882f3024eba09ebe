"""A self-check of every Communicator primitive: values, exact byte counts and bandwidth.

Run on a new cluster before a long job (``torchrun --nproc-per-node N -m distseq check``): each primitive
moves rank-tagged data whose expected result is known in closed form, so a wrong answer, a byte count that
differs from the documented formula, or a hang (the collective timeout fires with the rank, group and
call) shows up in seconds.

Every tensor lives on the communicator's device (CUDA under NCCL), timings synchronise the device, and the
bandwidth is nccl-tests' *bus bandwidth*: ``algbw = S / t`` with ``S`` the collective's size (all_gather: the
gathered output; the others: the input) times ``(n-1)/n`` for all_gather, reduce_scatter and all_to_all,
``2(n-1)/n`` for all_reduce and 1 for send_recv, so figures compare with nccl-tests and across world sizes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from distseq.parallel.comm import Communicator

__all__ = ["PrimitiveCheck", "check_communicator"]


@dataclass
class PrimitiveCheck:
    primitive: str
    numel: int
    dtype: str
    correct: bool
    bytes_sent: int
    expected_bytes_sent: int
    seconds: float
    bus_gbps: float = 0.0  # nccl-tests' bus bandwidth, GB/s

    @property
    def ok(self) -> bool:
        return self.correct and self.bytes_sent == self.expected_bytes_sent

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def _ranked(rank: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rows tagged with the owning rank so every primitive's result is predictable."""
    values = rank * 64 + torch.arange(rows * cols, dtype=torch.float64, device=device).reshape(rows, cols) % 61
    return values.to(dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_communicator(
    comm: Communicator,
    numel: int = 1 << 16,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str = "cpu",
) -> list[PrimitiveCheck]:
    """Run every primitive once on ``numel``-element tensors on ``device`` (the one the communicator's backend
    moves: CUDA for NCCL); every rank must call it."""
    device = torch.device(device)
    p, r = comm.size, comm.rank
    cols = 8
    rows = max(p, math.ceil(numel / cols / p) * p)
    es = dtype.itemsize
    nbytes = rows * cols * es
    x = _ranked(r, rows, cols, dtype, device)
    checks: list[PrimitiveCheck] = []

    def measure(label: str, fn, expected, expected_sent: int, size: int, factor: float) -> None:
        primitive = label.split("(")[0]  # send_recv(shift=+1) is counted under send_recv
        before = comm.stats[primitive].bytes_sent
        comm.barrier()
        _synchronize(device)
        start = time.perf_counter()
        out = fn()
        _synchronize(device)
        seconds = time.perf_counter() - start
        sent = comm.stats[primitive].bytes_sent - before
        correct = bool(torch.equal(out, expected))
        bus = size / seconds * factor / 1e9 if seconds > 0 else 0.0
        checks.append(PrimitiveCheck(label, rows * cols, str(dtype), correct, sent, expected_sent, seconds, bus))

    share = (p - 1) / p
    everyone = [_ranked(j, rows, cols, dtype, device) for j in range(p)]
    measure("all_gather", lambda: comm.all_gather(x, 0), torch.cat(everyone), (p - 1) * nbytes, p * nbytes, share)
    # Reductions sum 0/1 patterns, so the result is exact in every dtype up to thousands of ranks.
    bits = [((torch.arange(rows * cols, device=device) + j) % 2).reshape(rows, cols).to(dtype) for j in range(p)]
    total = torch.stack([b.double() for b in bits]).sum(0).to(dtype)
    sent = (p - 1) * nbytes // p
    measure("reduce_scatter", lambda: comm.reduce_scatter(bits[r], 0), total.chunk(p, 0)[r], sent, nbytes, share)
    sent = 2 * (p - 1) * math.ceil(rows * cols / p) * es
    measure("all_reduce", lambda: comm.all_reduce(bits[r]), total, sent, nbytes, 2 * share)
    measure(
        "all_to_all",
        lambda: comm.all_to_all(x, scatter_dim=0, gather_dim=1),
        torch.cat([e.chunk(p, 0)[r] for e in everyone], dim=1),
        (p - 1) * nbytes // p,
        nbytes,
        share,
    )
    for shift in (1, -1):
        measure(
            f"send_recv(shift={shift:+d})",
            lambda shift=shift: comm.send_recv([x], shift).commit().wait()[0],
            everyone[(r - shift) % p],
            0 if p == 1 else nbytes,
            nbytes,
            1.0 if p > 1 else 0.0,
        )
    return checks
