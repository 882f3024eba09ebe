"""Megatron-Core plugin: models at context_parallel_size = 2 with distseq modules equal the stock models at CP = 1.

References are Megatron's own: the stock ``GPTModel`` (local spec, ``DotProductAttention``) at CP = 1 on the full
sequence (packed batches: on each document alone). The CP model's inputs are split by Megatron's own
``get_batch_on_this_cp_rank`` (bshd); for packed batches the per-document split is written out below from
Megatron's definition (rank r holds chunks r and 2cp-1-r of every document). Gradients of the CP model are summed
over CP before they are compared. Tolerance: 1e-5 of the largest reference value (fp32).
"""

from __future__ import annotations

import re
from itertools import pairwise

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

VOCAB, SEQ, HIDDEN, HEADS = 64, 32, 64, 4
TOL = 1e-5


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _init(cp: int, tp: int = 1):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, 1, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(0)
    return parallel_state


def _config(cp: int, groups: int, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    extra = {"num_layers": 2, **extra}
    return TransformerConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=groups,
        use_cpu_initialization=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        context_parallel_size=cp,
        **extra,
    )


def _gpt(config, spec, position_embedding: str):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(0)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type=position_embedding,
    )


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _cp_summed(grads: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    for g in grads.values():
        dist.all_reduce(g, group=group)
    return grads


def _doc_split(cu: list[int], cp: int, rank: int) -> torch.Tensor:
    """Megatron's thd split: token indices of rank ``rank`` (chunks rank and 2cp-1-rank of every document)."""
    index = []
    for start, end in pairwise(cu):
        size = (end - start) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            index += range(start + c * size, start + (c + 1) * size)
    return torch.tensor(index)


def _packed_case(case: dict) -> tuple[list[int], list[int], torch.Tensor]:
    """(padded document offsets, real lengths, the real tokens' indices in the padded batch)."""
    docs = case["docs"]
    real = case.get("real") or [b - a for a, b in pairwise(docs)]
    keep = torch.cat([torch.arange(a, a + n) for a, n in zip(docs[:-1], real, strict=True)])
    return docs, real, keep


def job_gpt(cases: list[dict]) -> list[dict]:
    """Each case: strategy, query groups, position embedding, mask type, packed documents (padded offsets and
    real lengths, or None). Returns the max relative errors of logits, per-token loss and gradients."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.utils import get_batch_on_this_cp_rank

    from distseq.integrations.megatron import gpt_layer_spec
    from distseq.testing.megatron import megatron_on_cpu

    def with_mask(spec, mask: str):
        spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType[mask]
        return spec

    results = []
    with megatron_on_cpu():
        for case in cases:
            torch.manual_seed(1)
            packed = case.get("docs") is not None
            tokens = torch.randint(0, VOCAB, (1 if packed else 2, SEQ))
            labels = torch.randint(0, VOCAB, tokens.shape)
            if packed:
                docs, real, keep = _packed_case(case)
                positions = torch.cat([torch.arange(b - a) for a, b in pairwise(docs)])[None]
            else:
                keep = torch.arange(SEQ)
                positions = torch.arange(SEQ).expand(tokens.shape)

            # the stock model at CP = 1 (packed: each document's real tokens alone)
            _init(1)
            stock = _gpt(_config(1, case["groups"]), with_mask(get_gpt_layer_local_spec(), case["mask"]), case["pos"])
            if packed:
                pieces = [slice(a, a + n) for a, n in zip(docs[:-1], real, strict=True)]
                want_logits = torch.cat([stock(tokens[:, i], positions[:, i], None) for i in pieces], 1)
                want_loss = torch.cat(
                    [stock(tokens[:, i], positions[:, i], None, labels=labels[:, i]) for i in pieces], 1
                )
            else:
                want_logits = stock(tokens, positions, None)
                want_loss = stock(tokens, positions, None, labels=labels)
            want_loss.sum().backward()
            want_grads = _grads(stock)
            state = stock.state_dict()

            # distseq at CP = 2, Megatron's split
            ps = _init(2)
            cp_group, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
            options = {"ulysses_degree": 2} if case["strategy"] == "usp" else None
            spec = with_mask(gpt_layer_spec(case["strategy"], strategy_options=options), case["mask"])
            model = _gpt(_config(2, case["groups"]), spec, case["pos"])
            model.load_state_dict(state)
            if packed:
                index = _doc_split(docs, 2, cp_rank)
                padded = torch.tensor(docs, dtype=torch.int32)
                cu = torch.tensor([0, *torch.tensor(real).cumsum(0).tolist()], dtype=torch.int32)
                longest = max(b - a for a, b in pairwise(docs))
                params = PackedSeqParams(
                    qkv_format="thd",
                    cu_seqlens_q=cu,
                    cu_seqlens_kv=cu,
                    cu_seqlens_q_padded=padded,
                    cu_seqlens_kv_padded=padded,
                    max_seqlen_q=longest,
                    max_seqlen_kv=longest,
                    cp_group=cp_group,
                )
                local = {"tokens": tokens[:, index], "labels": labels[:, index], "position_ids": positions[:, index]}
                # where this rank's real tokens are, locally and in the reference (the real tokens in order)
                is_real = torch.zeros(SEQ, dtype=torch.bool)
                is_real[keep] = True
                mine = is_real[index]
                rank_of_real = torch.full((SEQ,), -1)
                rank_of_real[keep] = torch.arange(len(keep))
                want = {
                    "logits": want_logits[:, rank_of_real[index[mine]]],
                    "loss": want_loss[:, rank_of_real[index[mine]]],
                }
            else:
                params, mine = None, slice(None)
                local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": positions})
                want = get_batch_on_this_cp_rank({"logits": want_logits, "loss": want_loss})
            logits = model(local["tokens"], local["position_ids"], None, packed_seq_params=params)[:, mine]
            loss = model(local["tokens"], local["position_ids"], None, labels=local["labels"], packed_seq_params=params)
            loss[:, mine].sum().backward()
            grads = _cp_summed(_grads(model), cp_group)
            assert grads.keys() == want_grads.keys(), sorted(set(grads) ^ set(want_grads))
            results.append(
                {
                    "logits": _rel(logits, want["logits"]),
                    "loss": _rel(loss[:, mine], want["loss"]),
                    "grads": max(_rel(grads[n], want_grads[n]) for n in want_grads),
                }
            )
        ps.destroy_model_parallel()
    return results


STRATEGIES = ["ring", "ulysses", "allgather_kv", "token_ring", "usp"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gpt_at_cp2_equals_stock_cp1(worlds, strategy):
    cases = [
        {"strategy": strategy, "groups": HEADS, "pos": "rope", "mask": "causal"},
        {"strategy": strategy, "groups": 2, "pos": "learned_absolute", "mask": "causal"},
        {"strategy": strategy, "groups": 2, "pos": "rope", "mask": "no_mask"},
        {"strategy": strategy, "groups": 2, "pos": "rope", "mask": "causal", "docs": [0, 12, 16, 32]},
        # padded documents (real lengths 10, 4, 13 in slots of 12, 4, 16), as cu_seqlens_q_padded describe them
        {
            "strategy": strategy,
            "groups": 1,
            "pos": "rope",
            "mask": "causal",
            "docs": [0, 12, 16, 32],
            "real": [10, 4, 13],
        },
    ]
    results = worlds(2).run(job_gpt, cases, timeout=240)
    for rank, per_case in enumerate(results):
        for case, errors in zip(cases, per_case, strict=True):
            assert max(errors.values()) <= TOL, (rank, case, errors)


def _recurrence(q, k, v, log_gate):
    """o_t = q_t^T S_t, S_t = exp(g_t) S_{t-1} + k_t v_t^T, per batch and head, fp64 loop. q/k/v [B, T, H, D]."""
    batch, tokens, heads, dim = q.shape
    state = torch.zeros(batch, heads, dim, v.shape[-1], dtype=torch.float64)
    out = []
    for t in range(tokens):
        state = state * log_gate[:, t, :, None, None].exp() + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhd,bhde->bhe", q[:, t], state))
    return torch.stack(out, 1)


def job_mixer(gate: bool, strategy: str, tp: int = 1) -> dict:
    """DistseqLinearMixer at CP = 2 (and TP = ``tp``) on Megatron's split against a loop over the whole sequence,
    written from the mixer's definition with its weights (gathered over TP): forward and the input and weight
    gradients (summed over CP)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from distseq.integrations.megatron import DistseqLinearMixer
    from distseq.testing.megatron import megatron_on_cpu

    heads, dim = 4, 8
    with megatron_on_cpu():
        ps = _init(2, tp)
        config = _config(2, HEADS, num_layers=1, tensor_model_parallel_size=tp)
        torch.manual_seed(0)
        mixer = DistseqLinearMixer(config, HIDDEN, strategy=strategy, num_heads=heads, head_dim=dim, gate=gate)
        torch.manual_seed(2)
        x = torch.randn(2, SEQ, HIDDEN, dtype=torch.float64)
        local = get_batch_on_this_cp_rank({"x": x})["x"].float().transpose(0, 1).requires_grad_()  # [s, b, h]
        out, bias = mixer(local)
        assert bias is None
        out.square().sum().backward()

        # the loop, in fp64 on the full sequence with the full weights
        tp_group, tp_rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()

        def gathered(weight: torch.Tensor, dim: int) -> torch.Tensor:
            parts = [torch.empty_like(weight) for _ in range(tp)]
            dist.all_gather(parts, weight.detach().contiguous(), group=tp_group)
            return torch.cat(parts, dim).double().requires_grad_()

        w_in, w_out = gathered(mixer.in_proj.weight, 0), gathered(mixer.out_proj.weight, 1)
        full = x.clone().requires_grad_()
        mixed = (full @ w_in.T).view(2, SEQ, heads, -1)
        q, k, v = mixed[..., :dim] * dim**-0.5, mixed[..., dim : 2 * dim], mixed[..., 2 * dim : 3 * dim]
        decay = -torch.exp2(-8.0 * torch.arange(1, heads + 1, dtype=torch.float64) / heads)  # lightning slopes
        log_gate = torch.zeros(2, SEQ, heads, dtype=torch.float64) + decay
        if gate:
            log_gate = log_gate + torch.nn.functional.logsigmoid(mixed[..., 3 * dim])
        o = _recurrence(q, k, v, log_gate)
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + config.layernorm_epsilon)
        want = (o * mixer.out_norm.weight.double()).reshape(2, SEQ, -1) @ w_out.T
        want.square().sum().backward()

        grads = {"in_proj": mixer.in_proj.weight.grad, "out_proj": mixer.out_proj.weight.grad}
        for g in grads.values():
            dist.all_reduce(g, group=ps.get_context_parallel_group())
        shard = lambda t: get_batch_on_this_cp_rank({"t": t})["t"]  # noqa: E731
        errors = {
            "out": _rel(out.transpose(0, 1).double(), shard(want.detach())),
            "dx": _rel(local.grad.transpose(0, 1).double(), shard(full.grad)),
            "in_proj": _rel(grads["in_proj"].double(), w_in.grad.chunk(tp, 0)[tp_rank]),
            "out_proj": _rel(grads["out_proj"].double(), w_out.grad.chunk(tp, 1)[tp_rank]),
        }
        ps.destroy_model_parallel()
    return errors


@pytest.mark.parametrize("strategy", ["lasp2", "lasp1"])
@pytest.mark.parametrize("gate", [False, True])
def test_linear_mixer_equals_recurrence(worlds, strategy, gate):
    for rank, errors in enumerate(worlds(2).run(job_mixer, gate, strategy, timeout=240)):
        assert max(errors.values()) <= TOL, (rank, errors)


def test_linear_mixer_with_tensor_parallel_heads(worlds):
    """TP = 2 x CP = 2: each TP rank's heads, their decays and the row-parallel sum back."""
    for rank, errors in enumerate(worlds(4).run(job_mixer, True, "lasp2", 2, timeout=240)):
        assert max(errors.values()) <= TOL, (rank, errors)


def job_hybrid(softmax: str, pattern: str) -> list[dict]:
    """A MambaModel of distseq mixers and core attention at CP = 2 against the same model at CP = 1 with
    Megatron's own DotProductAttention in the attention layers."""
    from megatron.core.models.mamba import MambaModel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.utils import get_batch_on_this_cp_rank

    from distseq.integrations.megatron import hybrid_stack_spec
    from distseq.testing.megatron import megatron_on_cpu

    def build(cp: int, stock_attention: bool):
        spec = hybrid_stack_spec(softmax, "lasp2", gate=True)
        if stock_attention:
            spec.submodules.attention_layer.submodules.self_attention.submodules.core_attention = DotProductAttention
        torch.manual_seed(0)
        return MambaModel(
            config=_config(cp, 2, num_layers=len(pattern)),
            mamba_stack_spec=spec,
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            hybrid_override_pattern=pattern,
            position_embedding_type="rope",
        )

    with megatron_on_cpu():
        torch.manual_seed(1)
        tokens = torch.randint(0, VOCAB, (2, SEQ))
        labels = torch.randint(0, VOCAB, tokens.shape)
        positions = torch.arange(SEQ).expand(tokens.shape)
        _init(1)
        stock = build(1, stock_attention=True)
        want_loss = stock(tokens, positions, None, labels=labels)
        want_loss.sum().backward()
        want_grads, state = _grads(stock), stock.state_dict()

        ps = _init(2)
        model = build(2, stock_attention=False)
        model.load_state_dict(state)
        local = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": positions})
        loss = model(local["tokens"], local["position_ids"], None, labels=local["labels"])
        loss.sum().backward()
        grads = _cp_summed(_grads(model), ps.get_context_parallel_group())
        assert grads.keys() == want_grads.keys(), sorted(set(grads) ^ set(want_grads))
        errors = {
            "loss": _rel(loss, get_batch_on_this_cp_rank({"loss": want_loss})["loss"]),
            "grads": max(_rel(grads[n], want_grads[n]) for n in want_grads),
        }
        ps.destroy_model_parallel()
    return errors


@pytest.mark.parametrize("softmax", ["ring", "ulysses"])
def test_mamba_hybrid_at_cp2_equals_cp1(worlds, softmax):
    for rank, errors in enumerate(worlds(2).run(job_hybrid, softmax, "M*M-", timeout=240)):
        assert max(errors.values()) <= TOL, (rank, errors)


def _attention(config_overrides=None, **kwargs):
    from types import SimpleNamespace

    from megatron.core.transformer.enums import AttnMaskType

    from distseq.integrations.megatron import DistseqCoreAttention

    config = SimpleNamespace(attention_dropout=0.0, num_attention_heads=HEADS, kv_channels=16, hidden_size=HIDDEN)
    vars(config).update(config_overrides or {})
    kwargs.setdefault("attn_mask_type", AttnMaskType.causal)
    return DistseqCoreAttention(config, 1, **kwargs)


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        ({"attention_dropout": 0.1}, {}, "attention_dropout=0.0 (got 0.1"),
        ({}, {"attn_mask_type": "padding"}, "causal and no_mask, got padding"),
        ({}, {"attn_mask_type": "arbitrary"}, "causal and no_mask, got arbitrary"),
        ({}, {"strategy": "lasp2"}, "needs a softmax strategy"),
        ({}, {"strategy": None, "cp_comm_type": "a2a+a2a"}, "unknown cp_comm_type 'a2a+a2a'"),
        ({}, {"attention_type": "cross"}, "self-attention only"),
    ],
)
def test_core_attention_refuses_what_it_cannot_do(config, kwargs, message):
    """Raised at construction, before any process group is touched."""
    with pytest.raises(ValueError, match=re.escape(message)):
        _attention(config, **kwargs)


def job_cp_comm_types() -> dict:
    """Strategy chosen for each cp_comm_type when no strategy is named, and the errors of a forward call."""

    from megatron.core.packed_seq_params import PackedSeqParams

    from distseq.integrations.megatron import CP_COMM_TYPES
    from distseq.testing.megatron import megatron_on_cpu

    out = {}
    with megatron_on_cpu():
        ps = _init(2)
        config = {"num_query_groups": 2, "hierarchical_context_parallel_sizes": None}
        for comm_type in CP_COMM_TYPES:
            out[comm_type] = _attention(config, strategy=None, cp_comm_type=comm_type).strategy.name
        out[None] = _attention(config, strategy=None).strategy.name
        module = _attention(config, attn_mask_type="no_mask")
        q = torch.zeros(8, HEADS, 16)
        padded = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=torch.tensor([0, 6]),
            cu_seqlens_kv=torch.tensor([0, 6]),
            cu_seqlens_q_padded=torch.tensor([0, 16]),
            cu_seqlens_kv_padded=torch.tensor([0, 16]),
        )
        errors = {}
        for name, call in {
            "bias": lambda: module(q[:, None], q[:, None], q[:, None], None, attention_bias=q),
            "padding under no_mask": lambda: module(q, q, q, None, packed_seq_params=padded),
            "odd document": lambda: _attention(config)(
                q,
                q,
                q,
                None,
                packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 6, 16])),
            ),
        }.items():
            try:
                call()
            except ValueError as e:
                errors[name] = str(e)
        out["errors"] = errors
        out["usp default"] = _attention({"num_query_groups": 4}, strategy="usp").strategy.ulysses_degree
        out["usp hierarchical"] = _attention(
            {"num_query_groups": 4, "hierarchical_context_parallel_sizes": [1, 2]}, strategy="usp"
        ).strategy.ulysses_degree
        ps.destroy_model_parallel()
    return out


def test_cp_comm_type_mapping_and_call_errors(worlds):
    for got in worlds(2).run(job_cp_comm_types, timeout=120):
        assert {k: got[k] for k in ("p2p", "a2a", "all_gather", "a2a+p2p", None)} == {
            "p2p": "ring",
            "a2a": "ulysses",
            "all_gather": "allgather_kv",
            "a2a+p2p": "usp",
            None: "ring",
        }
        errors = got["errors"]
        assert "attention_bias" in errors["bias"]
        assert "cu_seqlens_q=[0, 6] differs from cu_seqlens_q_padded=[0, 16]" in errors["padding under no_mask"]
        assert "divisible by 2*sp = 4" in errors["odd document"] and "(0, 6)" in errors["odd document"]
        assert (got["usp default"], got["usp hierarchical"]) == (2, 1)


def job_training(strategy: str, steps: int) -> dict:
    """Megatron's own training step (its DDP, get_megatron_optimizer (SGD with momentum: Adam's normalisation
    would blow rounding differences of near-zero gradients up to the learning rate), get_forward_backward_func with
    finalize_model_grads and per-token loss) on a global batch of 2 sequences: CP = 1 (dp = 2, a sequence per
    rank, stock attention) and CP = 2 (dp = 1, distseq attention). Returns the losses and final weights of both."""

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_batch_on_this_cp_rank

    from distseq.integrations.megatron import gpt_layer_spec
    from distseq.testing.megatron import megatron_on_cpu

    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.randint(0, VOCAB, tokens.shape)
    positions = torch.arange(SEQ).expand(tokens.shape)

    def loss_func(output):  # the per-token form: (sum, tokens, report); Megatron normalises over dp x cp
        total = output.float().sum()
        count = torch.tensor(output.numel(), dtype=torch.int)
        return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

    def forward_step(batches, model):
        batch = next(batches)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, loss_func

    def train(cp: int, spec, state) -> tuple[list[float], dict]:
        ps = _init(cp)
        config = _config(cp, 2, calculate_per_token_loss=True)
        model = _gpt(config, spec, "rope")
        if state is not None:
            model.load_state_dict(state)
        initial = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="sgd", lr=0.5, sgd_momentum=0.9, clip_grad=0.0, params_dtype=torch.float32), [ddp]
        )
        config.finalize_model_grads_func = finalize_model_grads
        if cp == 1:  # data parallel: a sequence per rank
            rank = ps.get_data_parallel_rank()
            batch = {"tokens": tokens[rank : rank + 1], "labels": labels[rank : rank + 1]}
            batch["position_ids"] = positions[rank : rank + 1]
        else:
            batch = get_batch_on_this_cp_rank({"tokens": tokens, "labels": labels, "position_ids": positions})
        losses = []
        for _ in range(steps):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            reports = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([batch]),
                model=[ddp],
                num_microbatches=1,
                seq_length=batch["tokens"].shape[1],
                micro_batch_size=batch["tokens"].shape[0],
            )
            total = reports[0]["lm loss"].clone()
            dist.all_reduce(total)  # every rank's (sum, tokens): the global mean loss
            losses.append((total[0] / total[1]).item())
            updated, _, _ = optimizer.step()
            assert updated
        weights = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        ps.destroy_model_parallel()
        return losses, weights, initial

    with megatron_on_cpu():
        want_losses, want_weights, initial = train(1, get_gpt_layer_local_spec(), None)
        losses, weights, _ = train(2, gpt_layer_spec(strategy), initial)
    return {
        "losses": losses,
        "want_losses": want_losses,
        "weights": max(_rel(weights[k], want_weights[k]) for k in want_weights),
        "moved": max((want_weights[k] - initial[k]).abs().max().item() for k in want_weights),
    }


def test_megatron_training_step_at_cp2_equals_cp1(worlds):
    for got in worlds(2).run(job_training, "ring", 3, timeout=240):
        assert len(got["losses"]) == 3
        for loss, want in zip(got["losses"], got["want_losses"], strict=True):
            assert abs(loss - want) <= TOL * abs(want), got
        assert got["weights"] <= TOL, got
        assert got["moved"] > 1e-3, got  # the optimizer did move the weights


def test_packed_offsets_are_read_once_per_batch(monkeypatch):
    """Every layer gets the same PackedSeqParams: its offsets are read back once, and again only for another batch
    or after an in-place change of its tensors."""
    from types import SimpleNamespace

    from distseq.integrations.megatron import attention

    reads = []
    real = attention._packed_offsets
    monkeypatch.setattr(attention, "_packed_offsets", lambda p, c: reads.append(1) or real(p, c))
    cu = torch.tensor([0, 8, 16])
    params = SimpleNamespace(cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None)
    for _ in range(4):  # four layers
        assert attention._cached_packed_offsets(params, True) == [0, 8, 16]
    assert len(reads) == 1
    cu[1] = 4  # the same tensor changed in place
    assert attention._cached_packed_offsets(params, True) == [0, 4, 16] and len(reads) == 2
    other = torch.tensor([0, 4, 16])  # the next batch, equal values, new tensors
    batch = SimpleNamespace(
        cu_seqlens_q=other, cu_seqlens_kv=other, cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None
    )
    assert attention._cached_packed_offsets(batch, True) == [0, 4, 16] and len(reads) == 3
