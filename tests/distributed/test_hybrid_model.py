"""The hybrid MoE model sharded over data and sequence ranks equals a single-process run of the same model on
the same global batch: loss (<= 1e-5 relative), every parameter's gradient (<= 1e-5 relative to its largest
entry) and the parameters after one optimizer step, fp32, for every softmax strategy with LASP-2 on both token
layouts, with packed documents crossing ranks; short convolutions in every attention layer.

The optimizer step is SGD with momentum and weight decay: Adam's first step divides each gradient by its own
magnitude, which turns the fp32 rounding of gradients near zero (different summation order over ranks) into
differences of order lr, so it cannot be compared at 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distseq.config.model import ModelConfig
from distseq.models.hybrid import IGNORE_INDEX, HybridLM
from distseq.models.parallelize import parallelize_hybrid
from distseq.parallel.data import data_parallel, reduce_gradients
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import MeshAxis, ParallelDims
from distseq.parallel.sequence.context import SequenceParallel
from distseq.parallel.tensor import TP_SHARD_DIM_ATTR
from distseq.train.plan import plan_report

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    num_heads=4,
    num_kv_heads=2,
    layer_pattern="MAGL",  # Mamba2, softmax, gated DeltaNet, linear attention
    mamba_groups=2,  # split over tp = 2 with their heads; whole on every rank at tp = 4 (overridden to 1)
    mlp_pattern="DMDM",
    num_experts=4,
    top_k=2,
    moe_intermediate_size=16,
    intermediate_size=48,
    shared_expert=True,
    qk_norm=True,
    linear_gate=True,
    short_conv_size=4,  # its halos cross ranks (zigzag at sp = 4: chunks of 4 tokens); Mamba2's is 4 too
    short_conv_softmax=True,
    loss_chunk_size=24,
)
SEQ_LEN, ROWS = 32, 2
DOCS = [0, 7, 19, 20, 32]


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (ROWS, SEQ_LEN), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = ids[:, 1:]
    labels[:, torch.tensor(DOCS[1:-1]) - 1] = IGNORE_INDEX  # no target across a document boundary
    return ids, labels


def _model(overrides=None):
    torch.manual_seed(0)
    return HybridLM(ModelConfig(**(CONFIG | (overrides or {}))))


def _optimizer(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)


def _reference(overrides=None, lr=0.1):
    model = _model(overrides)
    ids, labels = _batch()
    seq = SequenceParallel.single(SEQ_LEN).with_documents(DOCS)
    out = model(ids, labels, seq)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _optimizer(model, lr).step()
    return out.loss.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _close(name, got, want, failures, tol=1e-5):
    # Relative to the tensor's largest entry, floored at 1e-2: gradients smaller than that are held to an
    # absolute 1e-7, the fp32 rounding of O(1) sums taken in another order (e.g. vocab-parallel softmax sums).
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-2)).item()
    if not err <= tol:
        failures.append(f"{name}: relative error {err:.3g}")


def job_parity(
    dp: int,
    sp: int,
    softmax: str,
    kind: str,
    overrides: dict | None = None,
    ep: int = 1,
    tp: int = 1,
    linear: str = "lasp2",
) -> None:
    world = dist.get_world_size()
    dims = ParallelDims(dp=dp, sp=sp, tp=tp, ep=ep, world_size=world)
    comms = dims.communicators()
    sp_comm, token_comm = comms[MeshAxis.SP], comms[MeshAxis.DP_SP]
    coords = dims.coords(dist.get_rank())
    model = parallelize_hybrid(_model(overrides), dims, comms)
    layout = SequenceLayout(kind, SEQ_LEN, sp, coords[MeshAxis.SP])
    options = {"ulysses_degree": min(2, sp)} if softmax == "usp" else {}
    seq = SequenceParallel.build(sp_comm, layout, softmax=softmax, linear=linear, softmax_options=options)
    seq = seq.with_documents(DOCS)
    ids, labels = _batch()
    rows = slice(coords[MeshAxis.DP] * ROWS // dp, (coords[MeshAxis.DP] + 1) * ROWS // dp)
    normalizer = float((labels != IGNORE_INDEX).sum())  # the global target count
    out = model(
        layout.shard(ids[rows], 1), layout.shard(labels[rows], 1), seq, loss_normalizer=normalizer, aux_normalizer=ROWS
    )
    out.loss.backward()
    loss = token_comm.all_reduce(out.loss.detach())
    reduce_gradients(model, token_comm, comms[MeshAxis.EDP], comms[MeshAxis.TP])
    ref_loss, ref_grads, ref_params = _reference(overrides)

    params = dict(model.named_parameters())

    def shard(name, full):  # the part of a full reference tensor this rank holds
        if ep > 1 and name.endswith(("w_gate_up", "w_down")):
            local = full.shape[0] // ep
            return full[coords[MeshAxis.EP] * local : (coords[MeshAxis.EP] + 1) * local]
        dim = getattr(params[name], TP_SHARD_DIM_ATTR, None)  # the split the TP plan marked
        return full if tp == 1 or dim is None else full.chunk(tp, dim=dim)[coords[MeshAxis.TP]]

    failures = []
    _close("loss", loss, torch.tensor(ref_loss), failures)
    for name, p in model.named_parameters():
        _close(f"grad {name}", p.grad, shard(name, ref_grads[name]), failures)
    _optimizer(model).step()
    for name, p in model.named_parameters():
        _close(f"param {name}", p.detach(), shard(name, ref_params[name]), failures)
    assert not failures, f"{softmax}+{linear}/{kind} dp={dp} sp={sp} tp={tp} ep={ep}:\n" + "\n".join(failures)


#: the (dp, sp, tp, ep) layouts checked, each with every softmax strategy (and lasp2) on both token layouts
ISSUE_LAYOUTS = [(1, 4, 1, 1), (1, 2, 2, 1), (2, 2, 1, 1), (1, 2, 1, 2), (2, 1, 2, 1)]


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("softmax", ["ring", "ulysses", "allgather_kv", "token_ring", "usp"])
@pytest.mark.parametrize(("dp", "sp", "tp", "ep"), ISSUE_LAYOUTS, ids=lambda d: str(d))
def test_every_layout_every_softmax_strategy_with_lasp2(worlds, dp, sp, tp, ep, softmax, kind):
    worlds(dp * sp * tp).run(job_parity, dp, sp, softmax, kind, None, ep, tp, timeout=300)


@pytest.mark.parametrize("softmax", ["ring", "token_ring"])
def test_dense_model_sp4(worlds, softmax):
    worlds(4).run(job_parity, 1, 4, softmax, "zigzag", {"mlp_pattern": "DDDD"}, timeout=300)


@pytest.mark.parametrize(("dp", "sp", "tp"), [(1, 1, 2), (1, 1, 4)])
@pytest.mark.parametrize("softmax", ["ring", "ulysses"])
def test_tensor_parallel(worlds, dp, sp, tp, softmax):
    overrides = {"num_kv_heads": 4, "mamba_groups": 1} if tp == 4 else None
    worlds(dp * sp * tp).run(job_parity, dp, sp, softmax, "zigzag", overrides, 1, tp, timeout=300)


@pytest.mark.parametrize("linear", ["lasp1", "ulysses", "allscan"])
def test_other_linear_strategies(worlds, linear):
    overrides = {"layer_pattern": "MALA"} if linear == "lasp1" else None  # lasp1 has no delta rule for G layers
    worlds(4).run(job_parity, 1, 4, "ring", "zigzag", overrides, linear=linear, timeout=300)


def job_plan_bytes(sp: int, tp: int, linear: str, kind: str, groups: int) -> None:
    """One forward and backward moves, on this rank, the sequence- and tensor-parallel bytes the dry-run plan
    gives: every linear-strategy layer kind (L, M, G) summed on the linear strategy's communicator, every short
    convolution's halo on the context's, the TP plan's all-reduces (before the gradient reduction) on tp."""
    dims = ParallelDims(sp=sp, tp=tp, world_size=dist.get_world_size())
    comms = dims.communicators()
    coords = dims.coords(dist.get_rank())
    overrides = {"mamba_groups": groups, "num_kv_heads": 4}
    model = parallelize_hybrid(_model(overrides), dims, comms)
    layout = SequenceLayout(kind, SEQ_LEN, sp, coords[MeshAxis.SP])
    seq = SequenceParallel.build(comms[MeshAxis.SP], layout, linear=linear).with_documents(DOCS)
    ids, labels = _batch()
    rows = slice(coords[MeshAxis.DP] * ROWS // dims.dp, (coords[MeshAxis.DP] + 1) * ROWS // dims.dp)
    out = model(layout.shard(ids[rows], 1), layout.shard(labels[rows], 1), seq, aux_normalizer=ROWS)
    out.loss.backward()
    measured = {name: stats.bytes_sent for name, stats in seq.comm_stats().items()}
    measured["tp"] = comms[MeshAxis.TP].stats.bytes_sent

    plan = plan_report(
        model.config,
        dims,
        seq_len=SEQ_LEN,
        micro_batch=ROWS // dims.dp,
        grad_accum=1,
        softmax_strategy="ring",
        linear_strategy=linear,
        layout=kind,
        dtype_bytes=4,
    )
    entries = plan["communication"]["sequence_parallel"]

    def planned(kinds):
        return sum(
            e["layers"]
            * (e["per_sp_rank"][coords[MeshAxis.SP]]["fwd_sent"] + e["per_sp_rank"][coords[MeshAxis.SP]]["bwd_sent"])
            for e in entries
            if e["kind"] in kinds or (kinds == "conv" and e["kind"].startswith("short conv"))
        )

    tensor = plan["communication"]["tensor_parallel"]
    expected = {
        "softmax.ring": planned(("softmax",)),
        f"linear.{linear}": planned(("linear", "mamba2", "gated deltanet")),
        "conv": planned("conv"),
        "tp": tensor["forward"] + tensor["backward"],
    }
    assert measured == expected, (measured, expected)
    assert all(sent > 0 for name, sent in measured.items() if name != "tp" or tp > 1), measured


#: (sp, tp, linear strategy, layout, mamba_groups): B and C split over tp and whole on every tp rank
PLAN_CASES = [(2, 2, "lasp2", "contiguous", 2), (2, 2, "lasp2", "zigzag", 1), (4, 1, "ulysses", "zigzag", 2)]
PLAN_CASES += [(4, 1, "allscan", "zigzag", 1)]


@pytest.mark.parametrize(("sp", "tp", "linear", "kind", "groups"), PLAN_CASES, ids=lambda c: str(c))
def test_measured_bytes_are_the_plans(worlds, sp, tp, linear, kind, groups):
    worlds(4).run(job_plan_bytes, sp, tp, linear, kind, groups, timeout=300)


def job_invalid_combinations() -> None:
    world = dist.get_world_size()
    model = _model()
    dims = ParallelDims(tp=4, world_size=world)
    with pytest.raises(ValueError, match=r"tp=4 must divide \{'num_kv_heads': 2\}"):
        parallelize_hybrid(model, dims, {})
    with pytest.raises(ValueError, match=r"mamba_groups 1 .* or divisible by tp: mamba_groups=2, tp=4"):
        parallelize_hybrid(_model({"num_kv_heads": 4}), dims, {})
    dims = ParallelDims(sp=4, ep=4, world_size=world)
    with pytest.raises(ValueError, match=r"ep must divide num_experts: num_experts=3, ep=4"):
        parallelize_hybrid(_model({"num_experts": 3}), dims, {})
    with pytest.raises(ValueError, match=r"dp=2 \* sp=4 \* tp=1 = 8, world_size=4"):
        ParallelDims(dp=2, sp=4, world_size=world)
    with pytest.raises(ValueError, match=r"does not match the initialised world of 4 ranks"):
        ParallelDims(dp=2, world_size=2).communicators()
    dist.barrier()  # every rank still in step: nothing above reached a collective


def test_invalid_combinations_raise_before_any_collective(worlds):
    worlds(4).run(job_invalid_combinations)


@pytest.mark.parametrize(("dp", "sp", "ep"), [(1, 2, 2), (2, 2, 2), (2, 2, 4), (1, 4, 4)])
def test_expert_parallel_folded_over_dp_sp(worlds, dp, sp, ep):
    worlds(dp * sp).run(job_parity, dp, sp, "ring", "zigzag", None, ep, timeout=300)


@pytest.mark.parametrize(("dp", "sp"), [(1, 2), (2, 1)])
def test_data_and_sequence_parallel(worlds, dp, sp):
    worlds(dp * sp).run(job_parity, dp, sp, "ring", "zigzag", timeout=300)


def test_single_process_loss_is_finite_and_chunking_does_not_matter():
    ids, labels = _batch()
    seq = SequenceParallel.single(SEQ_LEN).with_documents(DOCS)
    losses = []
    for chunk in (5, 24, 4096):
        torch.manual_seed(0)
        model = HybridLM(ModelConfig(**(CONFIG | {"loss_chunk_size": chunk})))
        losses.append(model(ids, labels, seq).loss)
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(losses[0], losses[2])


def test_config_errors():
    with pytest.raises(ValueError, match=r"num_heads must divide by num_kv_heads: num_heads=4, num_kv_heads=3"):
        ModelConfig(num_kv_heads=3)
    with pytest.raises(ValueError, match=r"from \['A', 'G', 'L', 'M'\], got 'LXAY' \(bad letters: \['X', 'Y'\]\)"):
        ModelConfig(layer_pattern="LXAY")
    with pytest.raises(ValueError, match=r"num_heads must divide by mamba_groups: num_heads=4, mamba_groups=3"):
        ModelConfig(mamba_groups=3)
    with pytest.raises(ValueError, match=r"mlp_pattern must have one letter .* per layer \(4\), got 'DM'"):
        ModelConfig(mlp_pattern="DM")
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts: top_k=5, num_experts=4"):
        ModelConfig(top_k=5)
    with pytest.raises(ValueError, match=r"short_conv_size=0, short_conv_softmax=True"):
        ModelConfig(short_conv_softmax=True)
    with pytest.raises(ValueError, match=r"short_conv_size=-1"):
        ModelConfig(short_conv_size=-1)


def job_wrapped(mode: str) -> None:
    """DDP / FSDP2 over dp x sp give the same gradients and step as the single-process run (dense model)."""
    overrides = {"mlp_pattern": "DDDD"}
    dims = ParallelDims(dp=2, sp=2, world_size=dist.get_world_size())
    comms = dims.communicators()
    coords = dims.coords(dist.get_rank())
    model = data_parallel(_model(overrides), comms[MeshAxis.DP_SP], mode)
    layout = SequenceLayout("zigzag", SEQ_LEN, 2, coords[MeshAxis.SP])
    seq = SequenceParallel.build(comms[MeshAxis.SP], layout).with_documents(DOCS)
    ids, labels = _batch()
    rows = slice(coords[MeshAxis.DP], coords[MeshAxis.DP] + 1)
    normalizer = float((labels != IGNORE_INDEX).sum())
    out = model(
        layout.shard(ids[rows], 1), layout.shard(labels[rows], 1), seq, loss_normalizer=normalizer, aux_normalizer=ROWS
    )
    out.loss.backward()
    _optimizer(model).step()
    _, ref_grads, ref_params = _reference(overrides)
    failures = []
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        grad, param = p.grad, p.detach()
        if mode == "fsdp":  # sharded DTensors: gather the full tensors to compare
            grad, param = grad.full_tensor(), param.full_tensor()
        _close(f"grad {name}", grad, ref_grads[name], failures)
        _close(f"param {name}", param, ref_params[name], failures)
    assert not failures, f"{mode}:\n" + "\n".join(failures)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ddp_and_fsdp_over_dp_sp(worlds, mode):
    worlds(4).run(job_wrapped, mode, timeout=300)
