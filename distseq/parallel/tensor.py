"""Megatron-style tensor parallelism over one Communicator: column/row-parallel linears, vocab-parallel
embedding and cross-entropy, and a glob plan that swaps them into a model built without parallelism.

Column-parallel: the weight's output rows are split; the input is replicated (identity forward, all-reduce
of its gradient backward). Row-parallel: the weight's input columns are split; the partial outputs are
all-reduced forward (identity backward). A column layer followed by a row layer costs one all-reduce each way.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from distseq.parallel.comm import Communicator

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tp",
    "parallelize_module",
    "reduce_from_tp",
    "vocab_parallel_cross_entropy",
]


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad.contiguous()), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (enter a tensor-parallel region)."""
    return _CopyToTP.apply(x, comm)


def reduce_from_tp(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """All-reduce forward, identity backward (leave a tensor-parallel region)."""
    return _ReduceFromTP.apply(x, comm)


def _split(size: int, comm: Communicator, what: str) -> slice:
    if size % comm.size:
        raise ValueError(f"tensor parallelism needs {what} divisible by tp: {what}={size}, tp={comm.size}")
    part = size // comm.size
    return slice(comm.rank * part, (comm.rank + 1) * part)


class ColumnParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: Communicator):
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: Communicator, name: str = "linear") -> ColumnParallelLinear:
        rows = _split(linear.out_features, comm, f"{name}.out_features")
        bias = None if linear.bias is None else linear.bias.detach()[rows].clone()
        return cls(linear.weight.detach()[rows].clone(), bias, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.comm), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm: Communicator):
        super().__init__()
        self.comm = comm
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: Communicator, name: str = "linear") -> RowParallelLinear:
        cols = _split(linear.in_features, comm, f"{name}.in_features")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.weight.detach()[:, cols].clone(), bias, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tp(F.linear(x, self.weight), self.comm)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, vocab_start: int, comm: Communicator):
        super().__init__()
        self.comm, self.vocab_start = comm, vocab_start
        self.weight = nn.Parameter(weight)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, comm: Communicator, name: str = "embedding") -> VocabParallelEmbedding:
        rows = _split(emb.num_embeddings, comm, f"{name}.num_embeddings")
        return cls(emb.weight.detach()[rows].clone(), rows.start, comm)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.comm)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, comm, vocab_start, ignore_index):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        row_max = logits.max(dim=-1).values
        comm.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, inplace=True)
        shifted = logits - row_max[:, None]
        exp = shifted.exp()
        sum_exp = comm.all_reduce(exp.sum(-1))
        local = labels - vocab_start
        mine = (local >= 0) & (local < logits.shape[-1]) & (labels != ignore_index)
        target = torch.where(mine, shifted.gather(1, local.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0], 0.0)
        target = comm.all_reduce(target)
        valid = labels != ignore_index
        loss = torch.where(valid, sum_exp.log() - target, 0.0)
        ctx.save_for_backward(exp / sum_exp[:, None], local, mine, valid)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine, valid = ctx.saved_tensors
        dlogits = softmax.clone()
        rows = torch.nonzero(mine).flatten()
        dlogits[rows, local[rows]] -= 1.0
        dlogits = dlogits * (grad * valid)[:, None]
        return dlogits, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, comm: Communicator, vocab_start: int, *, ignore_index: int = -100
) -> torch.Tensor:
    """Per-token cross-entropy ``[N]`` (fp32; fp64 for fp64 logits) from this rank's vocabulary shard of the
    logits ``[N, V/tp]`` (columns ``vocab_start ..``); ``ignore_index`` rows give 0. Three small all-reduces
    forward, none backward."""
    return _VocabParallelCrossEntropy.apply(logits, labels, comm, vocab_start, ignore_index)


STYLES = ("colwise", "rowwise", "vocab_embedding")


def parallelize_module(module: nn.Module, comm: Communicator, plan: dict[str, str]) -> nn.Module:
    """Replace the submodules matching each glob of ``plan`` by their ``colwise`` / ``rowwise`` /
    ``vocab_embedding`` parallel versions, built from the full modules (in place; no collective)."""
    unknown = {k: v for k, v in plan.items() if v not in STYLES}
    if unknown:
        raise ValueError(f"unknown tensor-parallel style(s) {unknown}; choose from {list(STYLES)}")
    names = [name for name, _ in module.named_modules() if name]
    replacements = {}
    for pattern, style in plan.items():
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"tensor-parallel plan key {pattern!r} matches no submodule")
        for name in matched:
            replacements[name] = style
    for name, style in replacements.items():  # build every shard first: errors leave the module untouched
        old = module.get_submodule(name)
        if style == "vocab_embedding":
            replacements[name] = VocabParallelEmbedding.from_embedding(old, comm, name)
        else:
            cls = ColumnParallelLinear if style == "colwise" else RowParallelLinear
            replacements[name] = cls.from_linear(old, comm, name)
    for name, new in replacements.items():
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, new)
    return module
