"""Local math of mixture-of-experts layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["expert_swiglu"]


def expert_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: ``(silu(x Wg) * (x Wu)) Wd``; x ``[N, hidden]``, w_gate_up ``[hidden, 2 * inter]``
    (gate then up), w_down ``[inter, hidden]``."""
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down
