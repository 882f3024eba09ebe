"""A self-check of every Communicator primitive: values, exact byte counts and bandwidth.

Run on a new cluster before a long job (``torchrun --nproc-per-node N -m distseq check``): each primitive
moves rank-tagged data whose expected result is known in closed form, so a wrong answer, a byte count that
differs from the documented formula, or a hang (the collective timeout fires with the rank, group and
call) shows up in seconds.
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

    @property
    def ok(self) -> bool:
        return self.correct and self.bytes_sent == self.expected_bytes_sent

    def as_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def _ranked(rank: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows tagged with the owning rank so every primitive's result is predictable."""
    return (rank * 64 + torch.arange(rows * cols, dtype=torch.float64).reshape(rows, cols) % 61).to(dtype)


def check_communicator(
    comm: Communicator, numel: int = 1 << 16, dtype: torch.dtype = torch.float32
) -> list[PrimitiveCheck]:
    """Run every primitive once on ``numel``-element tensors; every rank must call it."""
    p, r = comm.size, comm.rank
    cols = 8
    rows = max(p, math.ceil(numel / cols / p) * p)
    es = torch.empty((), dtype=dtype).element_size()
    nbytes = rows * cols * es
    x = _ranked(r, rows, cols, dtype)
    checks: list[PrimitiveCheck] = []

    def measure(label: str, fn, expected, expected_sent: int) -> None:
        primitive = label.split("(")[0]  # send_recv(shift=+1) is counted under send_recv
        before = comm.stats[primitive].bytes_sent
        comm.barrier()
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        sent = comm.stats[primitive].bytes_sent - before
        correct = bool(torch.equal(out, expected))
        checks.append(PrimitiveCheck(label, rows * cols, str(dtype), correct, sent, expected_sent, seconds))

    everyone = [_ranked(j, rows, cols, dtype) for j in range(p)]
    measure("all_gather", lambda: comm.all_gather(x, 0), torch.cat(everyone), (p - 1) * nbytes)
    # Reductions sum 0/1 patterns, so the result is exact in every dtype up to thousands of ranks.
    bits = [((torch.arange(rows * cols) + j) % 2).reshape(rows, cols).to(dtype) for j in range(p)]
    total = torch.stack([b.double() for b in bits]).sum(0).to(dtype)
    measure("reduce_scatter", lambda: comm.reduce_scatter(bits[r], 0), total.chunk(p, 0)[r], (p - 1) * nbytes // p)
    measure("all_reduce", lambda: comm.all_reduce(bits[r]), total, 2 * (p - 1) * math.ceil(rows * cols / p) * es)
    measure(
        "all_to_all",
        lambda: comm.all_to_all(x, scatter_dim=0, gather_dim=1),
        torch.cat([e.chunk(p, 0)[r] for e in everyone], dim=1),
        (p - 1) * nbytes // p,
    )
    for shift in (1, -1):
        measure(
            f"send_recv(shift={shift:+d})",
            lambda shift=shift: comm.send_recv([x], shift).commit().wait()[0],
            everyone[(r - shift) % p],
            0 if p == 1 else nbytes,
        )
    return checks
