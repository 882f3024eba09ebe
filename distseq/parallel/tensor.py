"""Megatron-style tensor parallelism over one Communicator: column/row-parallel linears, vocab-parallel
embedding and cross-entropy, and a glob plan that swaps them into a model built without parallelism.

Column-parallel: the weight's output rows are split; the input is replicated (identity forward, all-reduce
of its gradient backward). Row-parallel: the weight's input columns are split; the partial outputs are
all-reduced forward (identity backward). A column layer followed by a row layer costs one all-reduce each way.

Every rank builds the full model with the same seed and keeps its shard (rank ``r`` of ``tp`` keeps part
``r`` of the split dimension), so the parallel model computes the same function as the full one.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distseq.parallel.comm import Communicator

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "STYLES",
    "TP_SHARD_DIM_ATTR",
    "VocabParallelEmbedding",
    "copy_to_tp",
    "gather_from_tp",
    "parallelize_module",
    "reduce_from_tp",
    "shard_parameter",
    "tp_slice",
    "vocab_parallel_argmax",
    "vocab_parallel_cross_entropy",
]

#: set on a parameter split over tp: the dim of the full tensor it is a slice of (rank r holds part r);
#: checkpoints use it to save and load the full logical tensor under any tp
TP_SHARD_DIM_ATTR = "distseq_tp_shard_dim"


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_reduce(grad.contiguous()), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        return comm.all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The gathered tensor is used identically on every rank, so each rank's gradient of it is already
        # complete: keep the own part, no communication.
        comm = ctx.comm
        return grad.chunk(comm.size, dim=ctx.dim)[comm.rank].contiguous(), None, None


def copy_to_tp(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (enter a tensor-parallel region)."""
    return _CopyToTP.apply(x, comm)


def reduce_from_tp(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward (leave a tensor-parallel region from partial sums)."""
    return _ReduceFromTP.apply(x, comm)


def gather_from_tp(x: torch.Tensor, comm: Communicator, dim: int = -1) -> torch.Tensor:
    """All-gather along ``dim`` forward (rank order), own slice of the gradient backward (leave a
    tensor-parallel region from shards). Every rank must use the gathered tensor identically."""
    return _GatherFromTP.apply(x, comm, dim % x.dim())


def tp_slice(size: int, comm: Communicator, what: str) -> slice:
    """This rank's part of a dimension of ``size`` split evenly over tp; ``what`` names it in errors."""
    if size % comm.size:
        raise ValueError(f"tensor parallelism needs {what} divisible by tp: {what}={size}, tp={comm.size}")
    part = size // comm.size
    return slice(comm.rank * part, (comm.rank + 1) * part)


def shard_parameter(t: torch.Tensor, index: tuple[slice, ...] | slice, dim: int | None) -> nn.Parameter:
    """A parameter holding ``t[index]``, marked with the dim it is split on over tp (None: replicated)."""
    p = nn.Parameter(t.detach()[index].clone(), requires_grad=t.requires_grad)
    if dim is not None:
        setattr(p, TP_SHARD_DIM_ATTR, dim)
    return p


class ColumnParallelLinear(nn.Module):
    """``y = x W_r^T + b_r`` with ``W_r`` rows ``[r*out/tp, (r+1)*out/tp)`` of the full weight.

    Input ``[..., in]`` replicated over tp; output ``[..., out/tp]``, or ``[..., out]`` with ``gather_output``.
    """

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Communicator, *, gather_output: bool = False
    ):
        super().__init__()
        self.comm, self.gather_output = comm, gather_output
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, comm: Communicator, *, gather_output: bool = False, name: str = "linear"
    ) -> ColumnParallelLinear:
        """This rank's shard of ``linear``; ``name`` is the module path used in error messages."""
        rows = tp_slice(linear.out_features, comm, f"{name}.out_features")
        bias = None if linear.bias is None else shard_parameter(linear.bias, rows, 0)
        return cls(shard_parameter(linear.weight, rows, 0), bias, comm, gather_output=gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(copy_to_tp(x, self.comm), self.weight, self.bias)
        return gather_from_tp(out, self.comm, dim=-1) if self.gather_output else out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} per rank, tp={self.comm.size}, "
            f"bias={self.bias is not None}, gather_output={self.gather_output}"
        )


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r W_r^T) + b`` with ``W_r`` columns ``[r*in/tp, (r+1)*in/tp)`` of the full weight.

    Input ``[..., in/tp]`` (already split on its last dim, e.g. a column-parallel output); output ``[..., out]``
    replicated over tp. The bias is replicated and added once, after the reduction.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Communicator):
        super().__init__()
        self.comm = comm
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm: Communicator, *, name: str = "linear") -> RowParallelLinear:
        """This rank's shard of ``linear``; ``name`` is the module path used in error messages."""
        cols = tp_slice(linear.in_features, comm, f"{name}.in_features")
        bias = None if linear.bias is None else shard_parameter(linear.bias, slice(None), None)
        return cls(shard_parameter(linear.weight, (slice(None), cols), 1), bias, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tp(F.linear(x, self.weight), self.comm)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} per rank, out_features={self.out_features}, tp={self.comm.size}, "
            f"bias={self.bias is not None}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows ``[vocab_start, vocab_start + V/tp)`` live on this rank.

    Ids ``[...]`` (full vocabulary, replicated over tp) -> ``[..., D]`` replicated: ids outside the local
    range are looked up as row 0 and zeroed, then the partial embeddings are all-reduced.
    """

    def __init__(self, weight: nn.Parameter, vocab_start: int, comm: Communicator, *, padding_idx: int | None = None):
        super().__init__()
        self.comm, self.vocab_start, self.padding_idx = comm, vocab_start, padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = weight

    @classmethod
    def from_embedding(
        cls, emb: nn.Embedding, comm: Communicator, *, name: str = "embedding"
    ) -> VocabParallelEmbedding:
        """This rank's shard of ``emb``; ``name`` is the module path used in error messages."""
        unsupported = {k: getattr(emb, k) for k in ("max_norm", "scale_grad_by_freq", "sparse") if getattr(emb, k)}
        if unsupported:
            raise ValueError(f"vocab-parallel embedding does not support {unsupported} (module {name!r})")
        rows = tp_slice(emb.num_embeddings, comm, f"{name}.num_embeddings")
        padding_idx = emb.padding_idx
        if padding_idx is not None:
            padding_idx = padding_idx - rows.start if rows.start <= padding_idx < rows.stop else None
        return cls(shard_parameter(emb.weight, rows, 0), rows.start, comm, padding_idx=padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight, self.padding_idx)
        return reduce_from_tp(out.masked_fill(outside[..., None], 0.0), self.comm)

    def extra_repr(self) -> str:
        return (
            f"rows [{self.vocab_start}, {self.vocab_start + self.num_embeddings}) of the vocabulary, "
            f"embedding_dim={self.embedding_dim}, tp={self.comm.size}"
        )


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, comm, vocab_start, ignore_index):
        ctx.logits_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [N, V/tp]
        local_vocab = logits.shape[-1]
        row_max = logits.detach().amax(dim=-1)
        comm.all_reduce(row_max, op=dist.ReduceOp.MAX, inplace=True)
        shifted = logits - row_max[:, None]  # a new tensor: the in-place ops below leave the input alone

        valid = targets != ignore_index
        local_target = (targets - vocab_start).clamp(0, local_vocab - 1)
        mine = valid & (targets >= vocab_start) & (targets < vocab_start + local_vocab)
        target_logit = shifted.gather(1, local_target[:, None])[:, 0].masked_fill_(~mine, 0.0)
        comm.all_reduce(target_logit, inplace=True)

        exp = shifted.exp_()
        sum_exp = comm.all_reduce(exp.sum(dim=-1))
        loss = (sum_exp.log() - target_logit).masked_fill_(~valid, 0.0)
        softmax = exp.div_(sum_exp[:, None]).masked_fill_(~valid[:, None], 0.0)
        ctx.save_for_backward(softmax, local_target, mine)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_target, mine = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target), on this shard only; ignored rows are zero already.
        grad = softmax * grad_loss[:, None]
        grad.scatter_add_(1, local_target[:, None], (-grad_loss * mine)[:, None])
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    comm: Communicator,
    vocab_start: int | None = None,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-token cross-entropy from this rank's vocabulary shard of the logits.

    Args:
        logits: ``[N, V/tp]`` (or ``[..., V/tp]``), the columns ``vocab_start ..`` of the full logits, e.g. the
            output of a column-parallel LM head without ``gather_output``.
        targets: ``[N]`` (or ``[...]``) ids in the full vocabulary, replicated over tp.
        comm: the tensor-parallel communicator.
        vocab_start: first vocabulary id of this shard; defaults to ``comm.rank * V/tp`` (an even split).
        ignore_index: targets with this value give loss 0 and gradient 0.

    Returns:
        ``[N]`` losses in fp32 (fp64 for fp64 logits). Three small all-reduces forward (row max, exp-sum,
        target logit), none backward. Targets outside ``[0, V)`` are not checked: they give ``log sum exp``.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"vocab_parallel_cross_entropy needs targets shaped like logits without the vocab dim: "
            f"logits={tuple(logits.shape)}, targets={tuple(targets.shape)}"
        )
    if vocab_start is None:
        vocab_start = comm.rank * logits.shape[-1]
    loss = _VocabParallelCrossEntropy.apply(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), comm, vocab_start, ignore_index
    )
    return loss.view(targets.shape)


def vocab_parallel_argmax(logits: torch.Tensor, comm: Communicator, vocab_start: int | None = None) -> torch.Tensor:
    """Greedy token ids ``[...]`` (full vocabulary) from this rank's vocabulary shard ``[..., V/tp]`` of the
    logits: one all-gather of each row's local best (value, id); ties go to the lowest id, as ``argmax``."""
    if vocab_start is None:
        vocab_start = comm.rank * logits.shape[-1]
    value, index = logits.detach().max(dim=-1)
    pair = torch.stack([value.to(torch.float64), (index + vocab_start).to(torch.float64)], dim=-1)
    every = comm.all_gather(pair.unsqueeze(0), dim=0)  # [tp, ..., 2], shards in vocabulary order
    best = every[..., 0].argmax(dim=0, keepdim=True)  # first maximum = lowest vocabulary id
    return every[..., 1].gather(0, best).squeeze(0).to(torch.int64)


#: tensor-parallel style -> the full module type it applies to. ``colwise`` / ``colwise_gather`` make a
#: ColumnParallelLinear (the latter with ``gather_output=True``), ``rowwise`` a RowParallelLinear,
#: ``vocab_embedding`` a VocabParallelEmbedding.
STYLES: dict[str, type[nn.Module]] = {
    "colwise": nn.Linear,
    "colwise_gather": nn.Linear,
    "rowwise": nn.Linear,
    "vocab_embedding": nn.Embedding,
}


def _parallel_version(module: nn.Module, style: str, comm: Communicator, name: str) -> nn.Module:
    expected = STYLES[style]
    if not isinstance(module, expected):
        raise ValueError(
            f"tensor-parallel style {style!r} applies to {expected.__name__} modules, "
            f"but {name!r} is a {type(module).__name__}"
        )
    if style == "vocab_embedding":
        return VocabParallelEmbedding.from_embedding(module, comm, name=name)
    if style == "rowwise":
        return RowParallelLinear.from_linear(module, comm, name=name)
    return ColumnParallelLinear.from_linear(module, comm, gather_output=style == "colwise_gather", name=name)


def parallelize_module(module: nn.Module, comm: Communicator, plan: dict[str, str]) -> nn.Module:
    """Replace the submodules of ``module`` whose dotted names match a glob key of ``plan`` (fnmatch, case
    sensitive) by the parallel version the value names (a key of :data:`STYLES`), built from the full module.

    In place, returns ``module``. Every shard is built before anything is replaced, so a plan error (unknown
    style, key matching nothing, wrong module type, dimension not divisible by tp) raises ``ValueError`` and
    leaves ``module`` untouched. No collective runs here.
    """
    unknown = {k: v for k, v in plan.items() if v not in STYLES}
    if unknown:
        raise ValueError(f"unknown tensor-parallel style(s) {unknown}; choose from {list(STYLES)}")
    names = [name for name, _ in module.named_modules() if name]
    styles: dict[str, str] = {}
    for pattern, style in plan.items():
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"tensor-parallel plan key {pattern!r} matches no submodule")
        for name in matched:
            if styles.setdefault(name, style) != style:
                raise ValueError(f"tensor-parallel plan gives {name!r} two styles: {styles[name]!r} and {style!r}")
    replacements = {
        name: _parallel_version(module.get_submodule(name), style, comm, name) for name, style in styles.items()
    }
    for name, new in replacements.items():
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, new)
    return module
