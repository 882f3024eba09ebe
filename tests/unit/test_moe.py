"""MoE layer against a slow token-by-token reference, forward and backward; capacity dropping; aux loss;
argument errors; the expert-parallel plan on a single rank (no process group)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from distseq.models.moe import MoE
from distseq.parallel.comm import Communicator
from distseq.parallel.expert import apply_expert_parallel

TOL = 1e-10  # fp64 throughout


def _swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _reference(moe: MoE, x: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time, one chosen expert at a time; the same parameters as ``moe``."""
    inter = moe.w_down.shape[1]
    tokens = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(tokens @ moe.router.weight.t(), dim=-1)
    rows = []
    taken = [0] * moe.num_experts
    chosen = []
    for t in range(tokens.shape[0]):
        row = torch.zeros_like(tokens[t])
        weights, experts = probs[t].topk(moe.top_k)
        if moe.normalize_top_k:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts.tolist(), strict=True):
            chosen.append(e)
            if capacity is not None:
                if taken[e] >= capacity:
                    continue
                taken[e] += 1
            w_gate, w_up = moe.w_gate_up[e][:, :inter], moe.w_gate_up[e][:, inter:]
            row = row + w * _swiglu(tokens[t], w_gate, w_up, moe.w_down[e])
        if moe.shared is not None:
            s = moe.shared
            row = row + _swiglu(tokens[t], s.gate_proj.weight.t(), s.up_proj.weight.t(), s.down_proj.weight.t())
        rows.append(row)
    out = torch.stack(rows).reshape(x.shape)
    # The sequence-wise balance loss, summed over the sequences (rows of x).
    sequences = x.shape[0] if x.dim() == 3 else 1
    per_sequence = torch.tensor(chosen).view(sequences, -1)
    aux = 0.0
    for s, seq_probs in enumerate(probs.view(sequences, -1, moe.num_experts)):
        fraction = torch.bincount(per_sequence[s], minlength=moe.num_experts).double() / per_sequence.shape[1]
        aux = aux + moe.aux_loss_coef * moe.num_experts * (fraction * seq_probs.mean(0)).sum()
    return out, aux


def _grads(moe: MoE, x: torch.Tensor, out: torch.Tensor, aux: torch.Tensor, upstream: torch.Tensor) -> list:
    moe.zero_grad()
    x.grad = None
    ((out * upstream).sum() + 10 * aux).backward()
    return [x.grad.clone()] + [p.grad.clone() for p in moe.parameters()]


def _check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    ("top_k", "shared", "normalize", "capacity_factor"),
    [
        (1, False, True, None),
        (1, True, True, None),
        (2, False, True, None),
        (2, True, True, None),
        (2, True, False, None),
        (3, False, True, None),
        (2, True, True, 0.5),  # capacity binds: some assignments dropped
    ],
)
def test_matches_reference_forward_and_backward(top_k, shared, normalize, capacity_factor):
    torch.manual_seed(0)
    moe = MoE(
        8,
        6,
        4,
        top_k,
        shared_intermediate_size=5 if shared else None,
        capacity_factor=capacity_factor,
        normalize_top_k=normalize,
    ).double()
    if capacity_factor is not None:
        with torch.no_grad():
            moe.router.weight[0] += 2.0  # crowd expert 0 so its capacity binds
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 7, 8, dtype=torch.float64)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * 14 * top_k / 4)

    y, aux = moe(x)
    got = _grads(moe, x, y, aux, upstream)
    ref_y, ref_aux = _reference(moe, x, capacity)
    want = _grads(moe, x, ref_y, ref_aux, upstream)

    _check("output", y, ref_y)
    _check("aux", aux, ref_aux)
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for name, g, w in zip(names, got, want, strict=True):
        _check(f"grad {name}", g, w)
    if capacity is not None:
        experts = torch.softmax(moe.router(x.reshape(-1, 8)), -1).topk(top_k).indices
        assert (torch.bincount(experts.reshape(-1), minlength=4) > capacity).any(), "capacity must bind"


def test_dropped_tokens_get_only_the_shared_expert():
    torch.manual_seed(1)
    num_tokens, num_experts, capacity_factor = 12, 4, 1.0
    moe = MoE(8, 6, num_experts, 1, shared_intermediate_size=5, capacity_factor=capacity_factor).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.randn(1, num_tokens, 8, dtype=torch.float64)
    x[..., 0] = 10.0 + torch.rand(num_tokens, dtype=torch.float64)  # every token routes to expert 0
    capacity = math.ceil(capacity_factor * num_tokens * 1 / num_experts)  # 3
    y, _ = moe(x)
    shared_only = moe.shared(x)
    kept, dropped = slice(0, capacity), slice(capacity, None)  # first come, first served in token order
    torch.testing.assert_close(y[:, dropped], shared_only[:, dropped], rtol=0, atol=0)
    assert (y[:, kept] - shared_only[:, kept]).abs().amin(-1).gt(0).all()
    ref, _ = _reference(moe, x, capacity)
    _check("output", y, ref)
    moe.capacity_factor = None  # dropless: every token gets its expert
    dropless, _ = moe(x)
    _check("dropless kept rows", dropless[:, kept], y[:, kept])
    assert (dropless[:, dropped] - y[:, dropped]).abs().amax() > 1e-3


def test_aux_loss_hand_formula():
    coef = 0.25
    moe = MoE(2, 3, 2, 1, aux_loss_coef=coef).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2, dtype=torch.float64))
    a, c = 0.7, 1.9
    x = torch.tensor([[[a, 0.0], [c, 0.0]]], dtype=torch.float64)  # both tokens prefer expert 0: f = [1, 0]
    _, aux = moe(x)
    p0 = (1 / (1 + math.exp(-a)) + 1 / (1 + math.exp(-c))) / 2  # mean router probability of expert 0
    _check("aux", aux, torch.tensor(coef * 2 * (1.0 * p0 + 0.0 * (1 - p0)), dtype=torch.float64))
    # A uniform router gives P_e = 1/E, hence aux = coef * sum_e f_e = coef per sequence whatever the routing.
    moe = MoE(8, 3, 4, 2, aux_loss_coef=coef).double()
    with torch.no_grad():
        moe.router.weight.zero_()
    _, aux = moe(torch.randn(3, 5, 8, dtype=torch.float64))
    _check("aux uniform", aux, torch.tensor(3 * coef, dtype=torch.float64))


class _SummingComm:
    """Stands in for token_comm: all_reduce adds the statistics of the other shards, precomputed."""

    size = 2

    def __init__(self, others: torch.Tensor):
        self.others = others

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.others


def test_aux_shares_add_up_to_the_global_loss():
    torch.manual_seed(2)
    moe = MoE(8, 6, 4, 2).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    _, whole = moe(x)
    shards = [x[:, :4], x[:, 4:]]  # uneven token counts per rank
    stats = []  # per sequence: expert counts and token count, [B, E + 1]
    for shard in shards:
        experts = torch.softmax(moe.router(shard), -1).topk(2).indices  # [B, T, k]
        counts = torch.stack([torch.bincount(row.reshape(-1), minlength=4) for row in experts])
        stats.append(torch.cat([counts, torch.full((2, 1), shard.shape[1])], dim=1))
    total = 0.0
    for i, shard in enumerate(shards):
        moe.token_comm = _SummingComm(stats[1 - i])
        total = total + moe(shard)[1]
    _check("sum of aux shares", total, whole)


def test_expert_parallel_on_one_rank_is_the_identity():
    torch.manual_seed(3)
    moe = MoE(8, 6, 4, 2, shared_intermediate_size=5).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 8, dtype=torch.float64)
    y, aux = moe(x)
    want = _grads(moe, x, y, aux, upstream)
    comm = Communicator()  # no process group: a single rank
    ep_moe = apply_expert_parallel(copy.deepcopy(moe), comm)
    comm.stats.reset()
    y_ep, aux_ep = ep_moe(x)
    assert comm.stats["all_to_all_v"].calls == 2 and comm.stats["all_to_all"].calls == 1
    got = _grads(ep_moe, x, y_ep, aux_ep, upstream)
    assert comm.stats["all_to_all_v"].calls == 4
    _check("output", y_ep, y)
    _check("aux", aux_ep, aux)
    for name, g, w in zip(["x"] + [n for n, _ in moe.named_parameters()], got, want, strict=True):
        _check(f"grad {name}", g, w)


def test_argument_errors():
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts: top_k=5, num_experts=4"):
        MoE(8, 6, 4, 5)
    with pytest.raises(ValueError, match=r"capacity_factor must be positive or None, got 0"):
        MoE(8, 6, 4, 2, capacity_factor=0)
    with pytest.raises(ValueError, match=r"capacity_factor must be positive or None, got -1.5"):
        MoE(8, 6, 4, 2, capacity_factor=-1.5)
    with pytest.raises(ValueError, match=r"MoE sizes must be positive, got \{'intermediate_size': 0\}"):
        MoE(8, 0, 4, 2)
    with pytest.raises(ValueError, match=r"'num_experts': 0"):
        MoE(8, 6, 0, 0)
    with pytest.raises(ValueError, match=r"'shared_intermediate_size': -2"):
        MoE(8, 6, 4, 2, shared_intermediate_size=-2)
