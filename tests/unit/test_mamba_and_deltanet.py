"""The Mamba2 (``M``) and gated DeltaNet (``G``) layers at sp = 1 against references written here: the
recurrences token by token from the layers' own weights in fp64 (the convolution too, one lag at a time, reset at
document starts), output and every gradient; in fp32 to a looser tolerance; bf16 autocast keeps the gates fp32;
G layers refuse a linear strategy without the delta rule; both checkpoint exactly and read nothing back."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distseq.config.model import ModelConfig
from distseq.models.deltanet import GatedDeltaNet
from distseq.models.hybrid import HybridLM
from distseq.models.mamba import Mamba2
from distseq.models.parallelize import check_strategies
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.context import SequenceParallel
from distseq.testing.sync import no_host_sync

TOL_FP64 = 1e-10  # relative to the largest entry
TOL_FP32 = 2e-4  # fp32 sums over every token (grad D cancels most: up to 1e-4 seen)
SEQ_LEN, ROWS = 19, 2
DOCS = [0, 6, 7, 19]  # a one-token document, documents of odd lengths


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, starts: set[int]) -> torch.Tensor:
    """Causal depthwise convolution of ``x`` ``[B, T, C]``, one lag at a time, never reaching before a document
    start; then SiLU."""
    width = weight.shape[1]
    rows = []
    for t in range(x.shape[1]):
        first = max(s for s in starts if s <= t)
        acc = bias.expand(x.shape[0], -1)
        for lag in range(width):
            if t - lag >= first:
                acc = acc + weight[:, width - 1 - lag] * x[:, t - lag]
        rows.append(acc)
    return F.silu(torch.stack(rows, dim=1))


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _mamba_reference(p: dict[str, torch.Tensor], x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Mamba2 token by token: per head ``h`` (group ``g``) a state ``[P, N]``,
    ``h_t = exp(dt A) h_{t-1} + dt x_t B_t^T``, ``y_t = h_t C_t + D x_t``, then ``RMSNorm(y silu(z))`` per head."""
    heads, head_dim, n = cfg.num_heads, cfg.head_dim, cfg.mamba_state_size
    per_group = heads // cfg.mamba_groups
    starts = set(DOCS[:-1])
    z = x @ p["z_proj.weight"].T
    conv_in = torch.cat([x @ p["c_proj.weight"].T, x @ p["b_proj.weight"].T, x @ p["x_proj.weight"].T], dim=-1)
    weight = torch.cat([p["conv.q_weight"], p["conv.k_weight"], p["conv.v_weight"]])
    bias = torch.cat([p["conv.q_bias"], p["conv.k_bias"], p["conv.v_bias"]])
    c, b, xs = _conv(conv_in, weight, bias, starts).split([p["conv.q_bias"].numel()] * 2 + [heads * head_dim], -1)
    dt = F.softplus(x @ p["dt_proj.weight"].T + p["dt_bias"])  # [B, T, H]
    decay_rate = -torch.exp(p["A_log"])
    outputs = []
    for row in range(x.shape[0]):
        states = [torch.zeros(head_dim, n, dtype=x.dtype) for _ in range(heads)]
        for t in range(x.shape[1]):
            for h in range(heads):
                g = h // per_group
                x_th = xs[row, t, h * head_dim : (h + 1) * head_dim]
                b_t, c_t = b[row, t, g * n : (g + 1) * n], c[row, t, g * n : (g + 1) * n]
                kept = 0.0 if t in starts else torch.exp(dt[row, t, h] * decay_rate[h]) * states[h]
                states[h] = kept + dt[row, t, h] * torch.outer(x_th, b_t)
                y = states[h] @ c_t + p["D"][h] * x_th
                y = y * F.silu(z[row, t, h * head_dim : (h + 1) * head_dim])
                outputs.append(_rms(y, cfg.norm_eps) * p["norm_weight"][h * head_dim : (h + 1) * head_dim])
    y = torch.stack(outputs).view(x.shape[0], x.shape[1], heads * head_dim)
    return y @ p["o_proj.weight"].T


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.dot(x) + 1e-6)  # the layer's L2 normalisation (eps 1e-6 inside the root)


def _deltanet_reference(p: dict[str, torch.Tensor], x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The gated delta rule token by token: per head a state ``[D, D]``,
    ``S_t = a_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T``, ``o_t = S_t^T q_t / sqrt(D)``."""
    heads, head_dim = cfg.num_heads, cfg.head_dim
    starts = set(DOCS[:-1])
    proj = torch.cat([x @ p[f"{name}_proj.weight"].T for name in "qkv"], dim=-1)
    if cfg.short_conv_size:
        weight = torch.cat([p["conv.q_weight"], p["conv.k_weight"], p["conv.v_weight"]])
        bias = torch.cat([p["conv.q_bias"], p["conv.k_bias"], p["conv.v_bias"]])
        mixed = _conv(proj, weight, bias, starts)
    else:
        mixed = F.silu(proj)
    q, k, v = mixed.unflatten(-1, (3, heads, head_dim)).unbind(2)  # [B, T, H, D] each
    beta = torch.sigmoid(x @ p["beta_proj.weight"].T)
    log_decay = -torch.exp(p["A_log"]) * F.softplus(x @ p["gate_proj.weight"].T + p["dt_bias"])
    gate = F.silu(x @ p["out_gate_proj.weight"].T)
    outputs = []
    for row in range(x.shape[0]):
        states = [torch.zeros(head_dim, head_dim, dtype=x.dtype) for _ in range(heads)]
        for t in range(x.shape[1]):
            for h in range(heads):
                q_t, k_t, b_t = _unit(q[row, t, h]) / math.sqrt(head_dim), _unit(k[row, t, h]), beta[row, t, h]
                kept = 0.0 * states[h] if t in starts else torch.exp(log_decay[row, t, h]) * states[h]
                kept = kept - b_t * torch.outer(k_t, k_t @ kept)
                states[h] = kept + b_t * torch.outer(k_t, v[row, t, h])
                o = _rms(states[h].T @ q_t, cfg.norm_eps) * p["out_norm.weight"]
                outputs.append(o * gate[row, t, h * head_dim : (h + 1) * head_dim])
    return torch.stack(outputs).view(x.shape[0], x.shape[1], heads * head_dim) @ p["o_proj.weight"].T


def _config(**overrides) -> ModelConfig:
    base = dict(
        hidden_size=24, num_heads=4, num_kv_heads=2, head_dim=6, mamba_state_size=5, mamba_groups=2, short_conv_size=3
    )
    return ModelConfig(**(base | overrides))


def _compare(layer, reference, cfg, dtype, tol):
    """Run ``layer`` in ``dtype`` and ``reference`` in fp64 on the same input; compare output and gradients."""
    torch.manual_seed(1)
    x = torch.randn(ROWS, SEQ_LEN, cfg.hidden_size, dtype=torch.float64)
    upstream = torch.randn(ROWS, SEQ_LEN, cfg.hidden_size, dtype=torch.float64)
    layer = layer.to(dtype)
    seq = SequenceParallel.single(SEQ_LEN).with_documents(DOCS)
    x_layer = x.to(dtype).clone().requires_grad_()
    out = layer(x_layer, seq)
    (out * upstream.to(dtype)).sum().backward()

    params = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    x_ref = x.clone().requires_grad_()  # x itself never requires grad
    want = reference(params, x_ref, cfg)
    (want * upstream).sum().backward()

    def err(got, ref):
        return ((got.double() - ref).abs().max() / ref.abs().max()).item()

    errors = {"output": err(out.detach(), want.detach()), "grad x": err(x_layer.grad, x_ref.grad)}
    errors |= {f"grad {n}": err(p.grad, params[n].grad) for n, p in layer.named_parameters()}
    assert max(errors.values()) <= tol, {k: f"{v:.2e}" for k, v in errors.items() if v > tol}
    return errors


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, TOL_FP64), (torch.float32, TOL_FP32)])
def test_mamba2_matches_the_recurrence(groups, dtype, tol):
    cfg = _config(mamba_groups=groups)
    torch.manual_seed(0)
    layer = Mamba2(cfg)
    # Away from the init (D = 1, norm weight 1) so that every parameter's role is checked.
    with torch.no_grad():
        for p in (layer.D, layer.norm_weight):
            p.add_(0.3 * torch.randn_like(p))
    errors = _compare(layer, _mamba_reference, cfg, dtype, tol)
    assert len(errors) == len(dict(layer.named_parameters())) + 2


def test_mamba2_init_follows_mamba2():
    torch.manual_seed(0)
    layer = Mamba2(_config(num_heads=64, hidden_size=64, head_dim=2, mamba_groups=1))
    rates = layer.A_log.exp()
    assert rates.min() >= 1 and rates.max() <= 16
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert (layer.D == 1).all() and (layer.norm_weight == 1).all()
    assert layer.conv.size == 4


@pytest.mark.parametrize(("layer_cls", "method"), [(Mamba2, "linear_attention"), (GatedDeltaNet, "delta_rule")])
def test_under_bf16_autocast_the_gates_stay_fp32(layer_cls, method):
    cfg = _config()
    torch.manual_seed(0)
    layer = layer_cls(cfg)
    x = torch.randn(ROWS, SEQ_LEN, cfg.hidden_size)
    seq = SequenceParallel.single(SEQ_LEN).with_documents(DOCS)
    seen = {}
    original = getattr(seq.linear, method)

    def spy(*args, **kwargs):
        seen["gate"] = kwargs["gate"].dtype
        return original(*args, **kwargs)

    object.__setattr__(seq.linear, method, spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x, seq)
    want = layer(x, SequenceParallel.single(SEQ_LEN).with_documents(DOCS))
    assert seen == {"gate": torch.float32}
    assert math.isfinite(got.float().abs().max().item())
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())


@pytest.mark.parametrize("conv", [3, 0])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, TOL_FP64), (torch.float32, TOL_FP32)])
def test_gated_deltanet_matches_the_recurrence(dtype, tol, conv):
    cfg = _config(short_conv_size=conv)
    torch.manual_seed(0)
    layer = GatedDeltaNet(cfg)
    with torch.no_grad():
        layer.out_norm.weight.add_(0.3 * torch.randn_like(layer.out_norm.weight))
    errors = _compare(layer, _deltanet_reference, cfg, dtype, tol)
    assert len(errors) == len(dict(layer.named_parameters())) + 2


def test_gated_deltanet_needs_a_strategy_with_the_delta_rule():
    cfg = _config(layer_pattern="GA")
    check_strategies(cfg, linear="lasp2")
    check_strategies(cfg, linear="ulysses")
    check_strategies(_config(layer_pattern="MLA"), linear="lasp1")  # no G layer: anything goes
    with pytest.raises(ValueError, match=r"need a linear strategy with the delta rule; linear_strategy='lasp1' has"):
        check_strategies(cfg, linear="lasp1")
    # The model says so too, before any layer runs (so before any collective): no block is entered.
    model = HybridLM(cfg)
    entered = []
    model.blocks[0].register_forward_pre_hook(lambda *_: entered.append(True))
    seq = SequenceParallel.build(Communicator.solo(), SequenceLayout("contiguous", 8, 1, 0), linear="lasp1")
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"use one of \[.*'lasp2'.*'ulysses'\]"):
        model(ids, ids, seq)
    assert not entered


def test_model_with_both_layers_checkpoints_and_reads_nothing_back():
    """``HybridLM`` builds both kinds from the pattern; activation checkpointing recomputes them exactly; their
    forward and backward read no device value back to the host."""
    cfg = _config(layer_pattern="MGA", vocab_size=32)
    ids = torch.randint(0, 32, (ROWS, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    seq = SequenceParallel.single(SEQ_LEN).with_documents(DOCS)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = HybridLM(cfg)
        assert [type(block.attn) for block in model.blocks][:2] == [Mamba2, GatedDeltaNet]
        model.activation_checkpointing = checkpointing
        model(ids, ids, seq).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)
    with no_host_sync():
        model.hidden_states(ids, seq)[0].sum().backward()
