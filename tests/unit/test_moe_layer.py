"""MoE layer against a slow token-by-token reference, forward and backward; capacity dropping; aux loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distseq.models.moe import MoE


def _reference(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(tokens @ moe.router.weight.t(), dim=-1)
    out = torch.zeros_like(tokens)
    taken = [0] * moe.num_experts
    for t in range(tokens.shape[0]):
        weights, experts = probs[t].topk(moe.top_k)
        weights = weights / weights.sum()
        for w, e in zip(weights, experts.tolist(), strict=True):
            if capacity is not None:
                if taken[e] >= capacity:
                    continue
                taken[e] += 1
            gate, up = (tokens[t] @ moe.w_gate_up[e]).chunk(2)
            out[t] = out[t] + w * ((F.silu(gate) * up) @ moe.w_down[e])
        if moe.shared is not None:
            out[t] = out[t] + moe.shared(tokens[t])
    chosen = probs.topk(moe.top_k, dim=-1).indices.reshape(-1)
    fraction = torch.bincount(chosen, minlength=moe.num_experts).double() / chosen.numel()
    aux = moe.aux_loss_coef * moe.num_experts * (fraction * probs.mean(0)).sum()
    return out.reshape(x.shape), aux


@pytest.mark.parametrize(("top_k", "shared"), [(1, False), (2, True), (2, False)])
def test_matches_reference_forward_and_backward(top_k, shared):
    torch.manual_seed(0)
    moe = MoE(8, 6, 4, top_k, shared_intermediate_size=5 if shared else None).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    y, aux = moe(x)
    (y.square().sum() + aux).backward()
    got = [x.grad] + [p.grad for p in moe.parameters()]
    x.grad = None
    moe.zero_grad()
    ref_y, ref_aux = _reference(moe, x)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-10, atol=1e-10)
    (ref_y.square().sum() + ref_aux).backward()
    for g, p in zip(got, [x] + list(moe.parameters()), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-10)


def test_capacity_drops_assignments_in_token_order():
    torch.manual_seed(1)
    moe = MoE(8, 6, 4, 2, shared_intermediate_size=5, capacity_factor=0.5).double()
    with torch.no_grad():
        moe.router.weight[0] += 3.0  # most tokens prefer expert 0, so its capacity binds
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    capacity = 4  # ceil(0.5 * 16 * 2 / 4)
    y, _ = moe(x)
    ref, _ = _reference(moe, x, capacity)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    dropless, _ = MoE.forward(_without_capacity(moe), x)
    assert not torch.allclose(y, dropless)


def _without_capacity(moe: MoE) -> MoE:
    moe.capacity_factor = None
    return moe


def test_argument_errors():
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts: top_k=5, num_experts=4"):
        MoE(8, 6, 4, 5)
    with pytest.raises(ValueError, match=r"capacity_factor must be positive or None, got 0"):
        MoE(8, 6, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match=r"MoE sizes must be positive"):
        MoE(8, 0, 4, 2)
