"""Expert parallelism on gloo: every rank holds different tokens of one global batch; outputs, the summed aux
loss and all gradients equal a single-process MoE on the whole batch (fp64)."""

from __future__ import annotations

import copy

import pytest
import torch

from distseq.models.moe import MoE
from distseq.parallel.comm import Communicator
from distseq.parallel.expert import apply_expert_parallel

TOL = 1e-10
HIDDEN, NUM_EXPERTS = 8, 4


def _model(skewed: bool) -> MoE:
    torch.manual_seed(0)  # the same full model on every rank
    moe = MoE(HIDDEN, 6, NUM_EXPERTS, 2, shared_intermediate_size=5).double()
    if skewed:  # nearly every token picks experts 0 and 1: the other expert ranks receive (almost) nothing
        with torch.no_grad():
            moe.router.weight[:2, 0] += 20.0
    return moe


def _lengths(world: int) -> list[int]:
    return [3 + 2 * r for r in range(world)]  # uneven token counts per rank


def _batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    total = sum(_lengths(world))
    x = torch.randn(2, total, HIDDEN, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, total, HIDDEN, generator=g, dtype=torch.float64)
    return x, upstream


def _check(name: str, got: torch.Tensor, want: torch.Tensor, failures: list[str]) -> None:
    try:
        torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    except AssertionError as err:
        failures.append(f"{name}: {err}")


def job_matches_single_process(ep: int, skewed: bool) -> None:
    world = Communicator()
    p, r = world.size, world.rank
    # ep ranks are consecutive (as ParallelDims folds ep over dp x sp), edp ranks are strided.
    ep_comm, edp_comm = world.split_grid(ep)

    moe = _model(skewed)
    x, upstream = _batch(p)
    x.requires_grad_()
    ref = copy.deepcopy(moe)
    ref_y, ref_aux = ref(x)
    ((ref_y * upstream).sum() + 10 * ref_aux).backward()

    apply_expert_parallel(moe, ep_comm)
    moe.token_comm = world
    start = sum(_lengths(p)[:r])
    rows = slice(start, start + _lengths(p)[r])
    x_local = x.detach()[:, rows].clone().requires_grad_()
    ep_comm.stats.reset()
    y, aux = moe(x_local)
    assert ep_comm.stats["all_to_all_v"].calls == 2, ep_comm.stats.as_dict()
    assert ep_comm.stats["all_to_all"].calls == 1, ep_comm.stats.as_dict()
    ((y * upstream[:, rows]).sum() + 10 * aux).backward()
    assert ep_comm.stats["all_to_all_v"].calls == 4, ep_comm.stats.as_dict()

    failures: list[str] = []
    _check("output", y, ref_y[:, rows], failures)
    _check("summed aux", world.all_reduce(aux.detach()), ref_aux.detach(), failures)
    _check("input grad", x_local.grad, x.grad[:, rows], failures)
    local = NUM_EXPERTS // ep
    experts = slice(ep_comm.rank * local, (ep_comm.rank + 1) * local)
    ref_params = dict(ref.named_parameters())
    for name, param in moe.named_parameters():
        if name in ("w_gate_up", "w_down"):
            assert param.shape[0] == local
            _check(
                f"grad {name} (summed over edp)",
                edp_comm.all_reduce(param.grad),
                ref_params[name].grad[experts],
                failures,
            )
        else:
            _check(
                f"grad {name} (summed over all ranks)", world.all_reduce(param.grad), ref_params[name].grad, failures
            )
    assert not failures, f"rank {r}, ep={ep}, skewed={skewed}:\n" + "\n".join(failures)


def job_errors_before_any_collective() -> None:
    world = Communicator()
    with pytest.raises(ValueError, match=rf"ep must divide num_experts: num_experts=5, ep={world.size}"):
        apply_expert_parallel(MoE(HIDDEN, 6, 5, 2), world)
    moe = apply_expert_parallel(MoE(HIDDEN, 6, NUM_EXPERTS, 2), world)
    with pytest.raises(ValueError, match=rf"holds {NUM_EXPERTS // world.size} of num_experts={NUM_EXPERTS}"):
        apply_expert_parallel(moe, world)
    world.barrier()


@pytest.mark.parametrize(("world_size", "ep"), [(2, 1), (2, 2), (4, 2), (4, 4)])
@pytest.mark.parametrize("skewed", [False, True], ids=["random", "skewed"])
def test_matches_single_process(worlds, world_size, ep, skewed):
    worlds(world_size).run(job_matches_single_process, ep, skewed)


@pytest.mark.parametrize("world_size", [2, 4])
def test_errors_before_any_collective(worlds, world_size):
    worlds(world_size).run(job_errors_before_any_collective)
