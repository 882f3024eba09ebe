"""Tensor parallelism on gloo at tp = 1, 2, 4: every parallelized module equals the unparallel one, forward and
backward, in fp64; parameter gradients equal the matching slices of the unparallel gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distseq.parallel.comm import Communicator
from distseq.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_tp,
    parallelize_module,
    vocab_parallel_cross_entropy,
)

WORLD_SIZES = [1, 2, 4]
TOL = 1e-10  # fp64, only the summation order differs


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """GQA causal attention; the head count per rank follows from the (sharded) projection widths."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.head_dim, self.group = head_dim, heads // kv_heads
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=True)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H/tp, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed(ids))


def _tp_comm(tp: int) -> Communicator:
    """The world, or its inner axis of ``tp`` consecutive ranks (so group rank != global rank)."""
    world = Communicator()
    return world if tp == world.size else world.split_grid(tp)[0]


def _part(t: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
    return t.chunk(comm.size, dim=dim)[comm.rank]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")


def _run_both(full: nn.Module, parallel: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    """Output and input gradient of ``full`` and ``parallel`` for the loss ``<module(x), upstream>``."""
    results = []
    for module in (full, parallel):
        xg = x.clone().requires_grad_()
        out = module(xg)
        (out * upstream).sum().backward()
        results.append((out.detach(), xg.grad))
    return results


def job_swiglu(tp: int, bias: bool) -> None:
    comm = _tp_comm(tp)
    torch.manual_seed(0)
    full = SwiGLU(6, 8, bias).double()
    parallel = parallelize_module(
        copy.deepcopy(full), comm, {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
    )
    assert isinstance(parallel.gate_proj, ColumnParallelLinear) and isinstance(parallel.down_proj, RowParallelLinear)
    assert parallel.gate_proj.weight.shape == (8 // tp, 6) and parallel.down_proj.weight.shape == (6, 8 // tp)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    upstream = torch.randn(2, 5, 6, dtype=torch.float64)
    comm.stats.reset()
    (ref_out, ref_dx), (out, dx) = _run_both(full, parallel, x, upstream)
    # One all-reduce forward (down_proj), one backward per column layer (gate_proj, up_proj).
    assert comm.stats["all_reduce"].calls == 3 and comm.stats.calls == 3, comm.stats.as_dict()
    _assert_close(out, ref_out, "output")
    _assert_close(dx, ref_dx, "input grad")
    for name, weight_dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        ref, got = full.get_submodule(name), parallel.get_submodule(name)
        _assert_close(got.weight.grad, _part(ref.weight.grad, comm, weight_dim), f"{name}.weight grad")
        if bias:
            ref_bias_grad = ref.bias.grad if weight_dim == 1 else _part(ref.bias.grad, comm, 0)
            _assert_close(got.bias.grad, ref_bias_grad, f"{name}.bias grad")


def job_attention(tp: int) -> None:
    comm = _tp_comm(tp)
    torch.manual_seed(1)
    full = Attention(dim=10, heads=8, kv_heads=4, head_dim=3).double()
    plan = {"[qkv]_proj": "colwise", "o_proj": "rowwise"}
    parallel = parallelize_module(copy.deepcopy(full), comm, plan)
    x = torch.randn(2, 7, 10, dtype=torch.float64)
    upstream = torch.randn(2, 7, 10, dtype=torch.float64)
    (ref_out, ref_dx), (out, dx) = _run_both(full, parallel, x, upstream)
    _assert_close(out, ref_out, "output")
    _assert_close(dx, ref_dx, "input grad")
    for name in ("q_proj", "k_proj", "v_proj"):
        ref, got = full.get_submodule(name), parallel.get_submodule(name)
        _assert_close(got.weight.grad, _part(ref.weight.grad, comm, 0), f"{name}.weight grad")
    _assert_close(parallel.q_proj.bias.grad, _part(full.q_proj.bias.grad, comm, 0), "q_proj.bias grad")
    _assert_close(parallel.o_proj.weight.grad, _part(full.o_proj.weight.grad, comm, 1), "o_proj.weight grad")
    _assert_close(parallel.o_proj.bias.grad, full.o_proj.bias.grad, "o_proj.bias grad")


def job_colwise_gather(tp: int) -> None:
    comm = _tp_comm(tp)
    torch.manual_seed(2)
    full = nn.Sequential(nn.Linear(5, 8), nn.Tanh()).double()
    parallel = parallelize_module(copy.deepcopy(full), comm, {"0": "colwise_gather"})
    x = torch.randn(3, 5, dtype=torch.float64)
    upstream = torch.randn(3, 8, dtype=torch.float64)
    (ref_out, ref_dx), (out, dx) = _run_both(full, parallel, x, upstream)
    assert out.shape == (3, 8)
    _assert_close(out, ref_out, "output")
    _assert_close(dx, ref_dx, "input grad")
    _assert_close(parallel[0].weight.grad, _part(full[0].weight.grad, comm, 0), "weight grad")
    _assert_close(parallel[0].bias.grad, _part(full[0].bias.grad, comm, 0), "bias grad")
    # gather_from_tp on its own: rank order along any dim, own slice of the gradient back.
    shard = torch.full((2, 3), float(comm.rank), dtype=torch.float64, requires_grad=True)
    gathered = gather_from_tp(shard, comm, dim=0)
    assert gathered[:, 0].tolist() == [float(r) for r in range(comm.size) for _ in range(2)]
    weights = torch.arange(gathered.numel(), dtype=torch.float64).view_as(gathered)
    (gathered * weights).sum().backward()
    _assert_close(shard.grad, _part(weights, comm, 0), "gather_from_tp grad")


def job_embedding_head_cross_entropy(tp: int, ignore_index: int) -> None:
    comm = _tp_comm(tp)
    vocab = 12
    torch.manual_seed(3)
    full = TinyLM(vocab, 5).double()
    parallel = parallelize_module(copy.deepcopy(full), comm, {"embed": "vocab_embedding", "lm_head": "colwise"})
    assert isinstance(parallel.embed, VocabParallelEmbedding) and parallel.embed.weight.shape == (vocab // tp, 5)
    ids = torch.randint(0, vocab, (3, 8))
    ids[0, : min(vocab, 8)] = torch.arange(min(vocab, 8))  # ids from every shard
    targets = torch.randint(0, vocab, (3, 8))
    targets[1, :4] = torch.arange(vocab - 4, vocab)
    targets[2, ::3] = ignore_index

    ref_logits = full.lm_head(full.hidden(ids)).flatten(0, 1)
    ref_losses = F.cross_entropy(ref_logits, targets.flatten(), reduction="none", ignore_index=ignore_index)
    F.cross_entropy(ref_logits, targets.flatten(), reduction="sum", ignore_index=ignore_index).backward()

    logits = parallel.lm_head(parallel.hidden(ids)).flatten(0, 1)  # [N, V/tp], no gather
    assert logits.shape == (24, vocab // tp)
    losses = vocab_parallel_cross_entropy(logits, targets.flatten(), comm, ignore_index=ignore_index)
    assert losses.dtype == torch.float64 and losses.shape == (24,)
    losses.sum().backward()
    _assert_close(losses.detach(), ref_losses.detach(), "per-token losses")
    assert (losses[targets.flatten() == ignore_index] == 0).all()
    _assert_close(parallel.embed.weight.grad, _part(full.embed.weight.grad, comm, 0), "embedding grad")
    _assert_close(parallel.lm_head.weight.grad, _part(full.lm_head.weight.grad, comm, 0), "lm_head grad")

    # Logits grads directly (softmax - onehot, zero on ignored rows), any leading shape, lower precisions.
    for dtype, tol in ((torch.float64, TOL), (torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        full_logits = (10 * torch.randn(2, 6, vocab, dtype=torch.float64)).to(dtype)  # large: needs the max shift
        local = _part(full_logits, comm, -1).clone().requires_grad_()
        losses = vocab_parallel_cross_entropy(local, targets[:2, :6], comm, ignore_index=ignore_index)
        assert losses.dtype == torch.promote_types(dtype, torch.float32) and losses.shape == (2, 6)
        (losses * torch.arange(1.0, 13.0, dtype=torch.float64).view(2, 6)).sum().backward()
        ref = full_logits.to(losses.dtype).requires_grad_()
        ref_losses = F.cross_entropy(ref.transpose(1, 2), targets[:2, :6], reduction="none", ignore_index=ignore_index)
        (ref_losses * torch.arange(1.0, 13.0, dtype=torch.float64).view(2, 6)).sum().backward()
        torch.testing.assert_close(losses.detach(), ref_losses.detach(), rtol=tol, atol=tol)
        assert local.grad.dtype == dtype
        torch.testing.assert_close(local.grad.to(ref.dtype), _part(ref.grad, comm, -1), rtol=tol, atol=tol)


def job_errors(tp: int) -> None:
    comm = _tp_comm(tp)
    mlp = SwiGLU(6, 8, bias=False)
    with pytest.raises(ValueError, match=r"unknown tensor-parallel style\(s\) \{'down_proj': 'diagonal'\}"):
        parallelize_module(mlp, comm, {"gate_proj": "colwise", "down_proj": "diagonal"})
    with pytest.raises(ValueError, match=r"plan key 'blocks\.\*\.mlp' matches no submodule"):
        parallelize_module(mlp, comm, {"gate_proj": "colwise", "blocks.*.mlp": "rowwise"})
    with pytest.raises(ValueError, match=r"'colwise' applies to Linear modules, but 'tok' is a Embedding"):
        parallelize_module(nn.ModuleDict({"tok": nn.Embedding(8, 4)}), comm, {"tok": "colwise"})
    with pytest.raises(
        ValueError, match=r"'vocab_embedding' applies to Embedding modules, but 'gate_proj' is a Linear"
    ):
        parallelize_module(mlp, comm, {"gate_proj": "vocab_embedding"})
    with pytest.raises(ValueError, match=r"gives 'up_proj' two styles: 'colwise' and 'rowwise'"):
        parallelize_module(mlp, comm, {"*_proj": "colwise", "up_proj": "rowwise"})
    with pytest.raises(ValueError, match=r"does not support \{'scale_grad_by_freq': True\} \(module 'tok'\)"):
        parallelize_module(
            nn.ModuleDict({"tok": nn.Embedding(8, 4, scale_grad_by_freq=True)}), comm, {"tok": "vocab_embedding"}
        )
    with pytest.raises(
        ValueError, match=r"targets shaped like logits without the vocab dim: logits=\(4, 3\), targets=\(3,\)"
    ):
        vocab_parallel_cross_entropy(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), comm)
    if tp > 1:
        odd = tp + 1
        with pytest.raises(
            ValueError, match=rf"needs down_proj\.in_features divisible by tp: down_proj\.in_features={odd}, tp={tp}"
        ):
            parallelize_module(SwiGLU(4, odd, bias=False), comm, {"down_proj": "rowwise"})
        with pytest.raises(
            ValueError, match=rf"needs gate_proj\.out_features divisible by tp: gate_proj\.out_features={odd}"
        ):
            parallelize_module(SwiGLU(4, odd, bias=False), comm, {"gate_proj": "colwise"})
        with pytest.raises(
            ValueError, match=rf"needs tok\.num_embeddings divisible by tp: tok\.num_embeddings={odd}, tp={tp}"
        ):
            parallelize_module(nn.ModuleDict({"tok": nn.Embedding(odd, 4)}), comm, {"tok": "vocab_embedding"})
    assert all(type(m) is nn.Linear for m in mlp.children())  # a failed plan leaves the module untouched
    assert comm.stats.calls == 0
    comm.barrier()  # every rank is still in step: nothing above reached a collective


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_mlp(worlds, world_size, bias):
    worlds(world_size).run(job_swiglu, world_size, bias)


def test_swiglu_mlp_on_a_sub_communicator(worlds):
    worlds(4).run(job_swiglu, 2, True)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_attention_projections(worlds, world_size):
    worlds(world_size).run(job_attention, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_colwise_gather(worlds, world_size):
    worlds(world_size).run(job_colwise_gather, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_embedding_head_cross_entropy(worlds, world_size, ignore_index):
    worlds(world_size).run(job_embedding_head_cross_entropy, world_size, ignore_index)


def test_embedding_head_cross_entropy_on_a_sub_communicator(worlds):
    worlds(4).run(job_embedding_head_cross_entropy, 2, -100)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_plan_errors(worlds, world_size):
    worlds(world_size).run(job_errors, world_size)
