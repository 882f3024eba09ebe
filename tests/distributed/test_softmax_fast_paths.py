"""The fast paths of the softmax strategies: no host synchronisation, fp32 accumulation under autocast, the
fused backend against the reference inside every strategy, and Ulysses' exchanges (packed or not).

* Zero syncs: forward and backward of every strategy, both layouts, GQA, documents crossing ranks, sp = 2 and
  4, run inside ``no_host_sync`` (fails on any op that reads a device value back to the host).
* Autocast: bf16 inputs under ``torch.autocast("cpu", dtype=torch.bfloat16)`` at sp = 4; the relative error
  (max abs error / max abs value) of out, dq, dk, dv against fp64 on the same inputs is at most 1.25x that of
  torch SDPA over the full sequence under the same autocast.
* Backends: ``attention_backend="sdpa"`` equals ``"reference"`` (fp32, 2e-5 relative) at head_dim 64 and 128
  with documents crossing ranks and odd document lengths.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import SOFTMAX_STRATEGIES, make_strategy
from distseq.testing.sync import no_host_sync


def _options(name, sp, **extra):
    return ({"ulysses_degree": 2 if sp >= 2 else 1} if name == "usp" else {}) | extra


def _inputs(seq_len, heads, kv_heads, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1, seq_len, heads, dim), (1, seq_len, kv_heads, dim), (1, seq_len, kv_heads, dim)]
    q, k, v = (torch.randn(s, generator=g).to(dtype) for s in shapes)
    return q, k, v, torch.randn(1, seq_len, heads, dim, generator=g).to(dtype)


def _run(strategy, layout, q, k, v, dout, **kwargs):
    leaves = [layout.shard(t, 1).detach().requires_grad_() for t in (q, k, v)]
    out = strategy.attention(*leaves, causal=True, **kwargs)
    out.backward(layout.shard(dout, 1))
    return [out.detach(), *(t.grad for t in leaves)]


def job_no_host_sync(names):
    comm = Communicator()
    p = comm.size
    seq_len = 8 * p
    docs = [0, 3, 3 + 2 * p + 1, 5 * p, seq_len]  # a short document, then ones crossing rank boundaries
    for name, kind in itertools.product(names, ["contiguous", "zigzag"]):
        layout = SequenceLayout(kind, seq_len, p, comm.rank)
        strategy = make_strategy(name, comm, layout, **_options(name, p))
        q, k, v, dout = _inputs(seq_len, 4, 2, 16, torch.float32)
        leaves = [layout.shard(t, 1).detach().requires_grad_() for t in (q, k, v)]
        grad = layout.shard(dout, 1)
        for cu in (None, docs):
            with no_host_sync():
                strategy.attention(*leaves, causal=True, cu_seqlens=cu).backward(grad)


@pytest.mark.parametrize("world_size", [2, 4])
def test_no_host_sync_in_any_strategy(worlds, world_size):
    worlds(world_size).run(job_no_host_sync, SOFTMAX_STRATEGIES, timeout=300)


def _relative_errors(got, want):
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True)]


def job_autocast_errors(name, kind):
    """(our errors, SDPA's errors) for out, dq, dk, dv, the worst over this rank's shard."""
    comm = Communicator()
    p, r = comm.size, comm.rank
    seq_len, heads, kv_heads = 512, 8, 2
    q, k, v, dout = _inputs(seq_len, heads, kv_heads, 64, torch.bfloat16, seed=3)
    layout = SequenceLayout(kind, seq_len, p, r)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True, enable_gqa=True)
    exact.transpose(1, 2).backward(dout.double())
    exact = [exact.transpose(1, 2).detach(), *(t.grad for t in leaves)]

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True, enable_gqa=True)
    fused.transpose(1, 2).backward(dout)
    sdpa = _relative_errors([fused.transpose(1, 2).detach(), *(t.grad for t in leaves)], exact)

    strategy = make_strategy(name, comm, layout, **_options(name, p))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(strategy, layout, q, k, v, dout)
    assert all(t.dtype == torch.bfloat16 for t in got), [t.dtype for t in got]
    shard_exact = [layout.shard(t, 1) for t in exact]
    ours = _relative_errors(got, shard_exact)
    # each rank's error relative to the full tensor's magnitude, as for SDPA
    ours = [e * s.abs().max().item() / w.abs().max().item() for e, s, w in zip(ours, shard_exact, exact, strict=True)]
    return ours, sdpa


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name", SOFTMAX_STRATEGIES)
def test_autocast_bf16_error_within_sdpa(worlds, name, kind):
    results = worlds(4).run(job_autocast_errors, name, kind, timeout=300)
    ours = [max(rank[0][i] for rank in results) for i in range(4)]
    sdpa = results[0][1]
    for label, mine, theirs in zip(["out", "dq", "dk", "dv"], ours, sdpa, strict=True):
        assert mine <= 1.25 * theirs, f"{name} {kind} {label}: error {mine:.3g} > 1.25 x SDPA's {theirs:.3g}"


def job_backends_agree(name, dim):
    comm = Communicator()
    p, r = comm.size, comm.rank
    seq_len = 16 * p
    docs = [0, 5, 5 + 4 * p + 3, 11 * p, seq_len]
    failures = []
    for kind in ("contiguous", "zigzag"):
        layout = SequenceLayout(kind, seq_len, p, r)
        q, k, v, dout = _inputs(seq_len, 4, 2, dim, torch.float32, seed=1)
        results = {}
        for backend in ("sdpa", "reference"):
            strategy = make_strategy(name, comm, layout, **_options(name, p, attention_backend=backend))
            assert strategy.resolve_attention_backend(q.device, q.dtype, dim).name == backend
            results[backend] = _run(strategy, layout, q, k, v, dout, cu_seqlens=docs)
        for label, got, want in zip(["out", "dq", "dk", "dv"], results["sdpa"], results["reference"], strict=True):
            err = ((got - want).abs().max() / want.abs().max()).item()
            if not err <= 2e-5:
                failures.append(f"{kind} {label}: {err:.3g}")
    assert not failures, failures


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("name", SOFTMAX_STRATEGIES)
def test_sdpa_backend_equals_reference_backend(worlds, name, dim):
    worlds(4).run(job_backends_agree, name, dim, timeout=300)


def job_ulysses_exchanges(name: str):
    """Ulysses' all-to-alls (USP's inner ones), packed and one per tensor: (forward calls, all calls) of each,
    whether the two moved the same bytes, and whether their results are bit-equal (GQA that replicates the KV
    heads at P = 4, a batch of two)."""
    comm = Communicator()
    p = comm.size
    layout = SequenceLayout("zigzag", 8 * p, p, comm.rank)
    # a batch of 2: the received buffers are copied out (B = 1 gives views)
    first, second = (_inputs(8 * p, 4, 2, 8, torch.float32, seed) for seed in (0, 1))
    q, k, v, dout = (torch.cat(pair) for pair in zip(first, second, strict=True))
    strategy = make_strategy(name, comm, layout, **_options(name, p))
    heads = strategy.inner if name == "usp" else comm
    calls, volume, results = {}, {}, {}
    for packed in (True, False):
        heads.packs_messages = packed
        heads.stats.reset()
        leaves = [layout.shard(t, 1).detach().requires_grad_() for t in (q, k, v)]
        out = strategy.attention(*leaves)
        forward_calls = heads.stats["all_to_all"].calls
        out.backward(layout.shard(dout, 1))
        calls[packed] = (forward_calls, heads.stats["all_to_all"].calls)
        volume[packed] = (heads.stats.bytes_sent, heads.stats.bytes_received)
        results[packed] = [out.detach(), *(t.grad for t in leaves)]
    same = all(torch.equal(a, b) for a, b in zip(results[True], results[False], strict=True))
    return calls, volume[True] == volume[False], same


@pytest.mark.parametrize("name", ["ulysses", "usp"])
def test_ulysses_exchanges_packed_or_one_per_tensor(worlds, name):
    """Packed (NCCL's default): q/k/v there and out back in one all-to-all each, dout there and dq/dk/dv back in
    one each. One per tensor (gloo's default): 3 + 1 and 1 + 3. Same bytes, bit-equal results."""
    for calls, same_bytes, same_results in worlds(4).run(job_ulysses_exchanges, name):
        assert calls == {True: (2, 4), False: (4, 8)}, calls
        assert same_bytes and same_results


def job_default_packing():
    return Communicator().packs_messages, Communicator.solo().packs_messages


def test_gloo_sends_one_message_per_tensor(worlds):
    assert worlds(2).run(job_default_packing) == [(False, True)] * 2


def job_ulysses_kernel_calls(causal: bool, documents: bool):
    """Kernel calls of Ulysses on the zigzag layout: the gathered tokens put in sequence order make the whole
    sequence one call each way (with documents the span plan cuts at their boundaries: several calls)."""
    from distseq.kernels.attention.backends import ATTENTION_BACKENDS

    comm = Communicator()
    p, seq_len = comm.size, 16 * comm.size
    cu = [0, 5, seq_len - 3, seq_len] if documents else None
    layout = SequenceLayout("zigzag", seq_len, p, comm.rank, cu)
    q, k, v, dout = _inputs(seq_len, 4, 2, 8, torch.float32)
    backend = ATTENTION_BACKENDS["sdpa"]
    calls = {"forward": 0, "backward": 0}
    forward, backward = backend.forward, backend.backward

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    backend.forward, backend.backward = count("forward", forward), count("backward", backward)
    try:
        strategy = make_strategy("ulysses", comm, layout, attention_backend="sdpa")
        leaves = [layout.shard(t, 1).detach().requires_grad_() for t in (q, k, v)]
        strategy.attention(*leaves, causal=causal).backward(layout.shard(dout, 1))
    finally:
        backend.forward, backend.backward = forward, backward
    return calls


@pytest.mark.parametrize("causal", [True, False])
def test_ulysses_on_zigzag_is_one_kernel_call_each_way(worlds, causal):
    for calls in worlds(4).run(job_ulysses_kernel_calls, causal, False):
        assert calls == {"forward": 1, "backward": 1}, calls
    for calls in worlds(4).run(job_ulysses_kernel_calls, causal, True):
        assert calls["forward"] > 1, calls
