"""Training metrics: FLOPs against a hand count and torch's FlopCounterMode on the real model, the peak table,
MFU, rates, memory, communication deltas and the rank-0 logger."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import resource
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from distseq.config.model import ModelConfig
from distseq.models import HybridLM
from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.context import SequenceParallel
from distseq.train import metrics
from distseq.train.metrics import (
    CommMeter,
    MetricsLogger,
    StepTimer,
    comm_bytes_by_name,
    comm_bytes_delta,
    mfu,
    model_flops_per_sequence,
    peak_memory_bytes,
    peak_tflops,
    step_rates,
)

TINY = ModelConfig(
    vocab_size=10,
    hidden_size=4,
    num_heads=2,
    num_kv_heads=1,
    head_dim=2,
    layer_pattern="LA",
    mlp_pattern="DM",
    intermediate_size=6,
    num_experts=3,
    top_k=2,
    moe_intermediate_size=5,
    shared_expert=True,
    linear_gate=True,
    linear_output_gate=True,
)


def test_flops_hand_count():
    # T=5, h=4, H=2, Hkv=1, D=2, V=10, I=6, E=3, k=2, Im=5, linear chunks of 4 tokens: [4, 1].
    flops = model_flops_per_sequence(TINY, 5, linear_chunk_size=4)
    expected = {
        "softmax_projections": 160 + 80 + 80 + 160,  # q [5,4]x[4,4], k and v [5,4]x[4,2], o [5,4]x[4,4]
        "linear_projections": 4 * 160 + 160 + 80,  # q, k, v, o; output gate [4,4]; gate [4,2]
        "dense_mlp": 3 * 240,  # gate, up [5,4]x[4,6]; down [5,6]x[6,4]
        "moe_router": 120,  # [5,4]x[4,3]
        "moe_experts": 2 * 600,  # top_k=2 experts of 3 matmuls of 2*5*4*5
        "moe_shared": 600,
        "lm_head": 400,  # [5,4]x[4,10]
        # 15 causal pairs per head: scores 2*15*2 + values 2*15*2, 2 heads
        "softmax_attention": 2 * (60 + 60),
        # per head: intra pairs 10 + 1 -> scores 44 + values 44; readout 2*5*2*2 = 40; state update 40
        "linear_attention": 2 * (44 + 44 + 40 + 40),
        # no Mamba2 or gated DeltaNet layer
        "mamba_projections": 0,
        "deltanet_projections": 0,
        "mamba_scan": 0,
        "delta_rule": 0,
    }
    expected["weight_matmuls"] = sum(
        v for k, v in expected.items() if k not in ("softmax_attention", "linear_attention", "mamba_scan", "delta_rule")
    )
    assert expected["weight_matmuls"] == 4400
    expected["total_forward"] = 4400 + 240 + 336
    expected["total_train"] = 3 * expected["total_forward"]
    assert flops == expected
    non_causal = model_flops_per_sequence(TINY, 5, causal=False, linear_chunk_size=4)
    assert non_causal["softmax_attention"] == 2 * 4 * 2 * 25
    assert non_causal["total_forward"] == expected["total_forward"] - 240 + 400


def test_flops_of_mamba_and_deltanet_hand_count_and_flop_counter():
    # T=5, h=4, H=2, D=2, N=3, G=1, V=10, I=6, chunks of 4 tokens: [4, 1] -> 11 intra pairs.
    cfg = dataclasses.replace(TINY, layer_pattern="MG", mlp_pattern="DD", mamba_state_size=3, short_conv_size=2)
    flops = model_flops_per_sequence(cfg, 5, linear_chunk_size=4)
    # z, x, o [5,4]x[4,4] each 160; B, C [5,4]x[4,3] each 120; dt [5,4]x[4,2] 80
    assert flops["mamba_projections"] == 3 * 160 + 2 * 120 + 80
    # q, k, v, output gate, o 160 each; decay step and beta 80 each
    assert flops["deltanet_projections"] == 5 * 160 + 2 * 80
    # per head: intra pairs 11 x 2 (N + D) = 110; readout and state update 2 x 2*5*3*2 = 120
    assert flops["mamba_scan"] == 2 * (110 + 120)
    # per head: 11 pairs x (6 D + 4 D) = 220; 3 x 2*5*2*2 = 120
    assert flops["delta_rule"] == 2 * (220 + 120)
    assert flops["total_forward"] == flops["weight_matmuls"] + flops["softmax_attention"] + flops[
        "linear_attention"] + 2 * (110 + 120) + 2 * (220 + 120)  # fmt: skip
    # The projections are the model's matmuls, exactly.
    model = HybridLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with FlopCounterMode(display=False) as counter:
        model(ids, ids, SequenceParallel.single(5))
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) == flops["weight_matmuls"]


def test_flops_bad_input():
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        model_flops_per_sequence(TINY, 0)
    with pytest.raises(ValueError, match="linear_chunk_size must be >= 1, got 0"):
        model_flops_per_sequence(TINY, 8, linear_chunk_size=0)


def _kernel_attention_flops(cfg: ModelConfig, seq_len: int, chunk_size: int) -> int:
    """What the reference kernels compute, to compare with FlopCounterMode: the softmax layer's single block
    (seq_len <= 2048) is the full T x T square; the chunked linear kernel pads to whole chunks and computes each
    chunk's full C x C square, and LASP-2 adds its inter-chunk term, each token's query against the incoming
    state (``2 T dk dv``)."""
    t, heads, d = seq_len, cfg.num_heads, cfg.head_dim
    softmax = cfg.layer_pattern.count("A") * 4 * heads * d * t * t
    chunk = min(chunk_size, t)
    num_chunks = math.ceil(t / chunk)
    padded = num_chunks * chunk
    linear = heads * (num_chunks * 2 * chunk * chunk * 2 * d + 4 * padded * d * d) + 2 * t * d * d * heads
    return softmax + cfg.layer_pattern.count("L") * linear


@pytest.mark.parametrize(
    ("cfg", "seq_len", "chunk_size"),
    [
        (
            ModelConfig(
                vocab_size=96,
                hidden_size=32,
                num_heads=4,
                num_kv_heads=2,
                layer_pattern="LALL",
                mlp_pattern="DMDM",
                num_experts=4,
                top_k=2,
                moe_intermediate_size=24,
                intermediate_size=48,
                shared_expert=True,
                linear_gate=True,
                qk_norm=True,
            ),
            100,
            64,
        ),
        (
            ModelConfig(
                vocab_size=64,
                hidden_size=24,
                num_heads=3,
                num_kv_heads=3,
                layer_pattern="AL",
                linear_output_gate=False,
                tie_embeddings=True,
            ),
            48,
            16,
        ),
        (ModelConfig(layer_pattern="LL", moe_interval=1, num_experts=8, top_k=3), 37, 8),
    ],
)
def test_flops_match_flop_counter_on_the_model(cfg, seq_len, chunk_size):
    torch.manual_seed(0)
    model = HybridLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len))
    # The reference attention kernel: its matmuls are visible to FlopCounterMode (the fused CPU flash op is not).
    seq = SequenceParallel.build(
        Communicator.solo(),
        SequenceLayout("contiguous", seq_len, 1, 0),
        softmax_options={"attention_backend": "reference"},
        linear_options={"chunk_size": chunk_size},
    )
    with FlopCounterMode(display=False) as counter:
        model(ids, ids, seq)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    flops = model_flops_per_sequence(cfg, seq_len, linear_chunk_size=chunk_size)
    # Weight matmuls are exact: [tokens, in] x [in, out] per projection, expert rows = T * top_k (dropless).
    assert counts.get("aten.mm", 0) + counts.get("aten.addmm", 0) == flops["weight_matmuls"]
    # Attention (bmm): exact after replacing the causal-once count by what the kernels compute.
    assert counts.get("aten.bmm", 0) == _kernel_attention_flops(cfg, seq_len, chunk_size)
    assert set(counts) <= {"aten.mm", "aten.addmm", "aten.bmm"}, counts
    # The adjustment only adds the masked work: the kernels never compute less than the convention counts.
    assert flops["softmax_attention"] + flops["linear_attention"] <= counts["aten.bmm"]


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", torch.float16, 835.5),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA GH200 480GB", "bfloat16", 989.4),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100 80GB PCIe", torch.float32, 19.5),
        ("NVIDIA A100-SXM4-40GB", "tf32", 156.0),
        ("NVIDIA L40S", torch.bfloat16, 362.05),
        ("NVIDIA L40", torch.bfloat16, 181.05),
        ("NVIDIA L4", torch.bfloat16, 121.0),
        ("Tesla V100-SXM2-32GB", torch.bfloat16, None),
        ("Tesla V100-SXM2-32GB", torch.float16, 125.0),
        ("NVIDIA B200", "tf32", None),
        ("cpu", torch.bfloat16, None),
        (None, torch.bfloat16, None),
        ("Some Future Accelerator", torch.bfloat16, None),
    ],
)
def test_peak_tflops(name, dtype, expected):
    assert peak_tflops(name, dtype) == expected


def test_peak_tflops_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'int8' for peak_tflops"):
        peak_tflops("NVIDIA H100", "int8")


def test_mfu():
    assert mfu(400.0, None) is None
    assert mfu(494.7, 989.4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"MFU above 100%: achieved 1000.00 TFLOP/s per rank > peak 989.40"):
        mfu(1000.0, 989.4)
    with pytest.raises(ValueError, match=r"achieved=-1.0, peak=312"):
        mfu(-1.0, 312)


def test_step_rates():
    # 8 sequences of 1000 tokens, 3e12 training FLOPs each, 4 ranks, 2 s.
    rates = step_rates(
        2.0, global_tokens=8000, train_flops_per_sequence=3e12, sequences_per_step=8, world_size=4, peak=10.0
    )
    assert rates.tokens_per_s == 4000.0
    assert rates.tflops_per_rank == pytest.approx(3.0)
    assert rates.mfu == pytest.approx(0.3)
    with pytest.raises(ValueError, match="step_time_s must be positive, got 0"):
        step_rates(0, global_tokens=1, train_flops_per_sequence=1, sequences_per_step=1, world_size=1)


def test_step_timer(monkeypatch):
    clock = iter([10.0, 10.5])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    timer = StepTimer(global_tokens=1000, train_flops_per_sequence=2e12, sequences_per_step=2, world_size=2)
    with pytest.raises(RuntimeError, match="stop\\(\\) before start\\(\\)"):
        timer.stop()
    timer.start()
    rates = timer.stop()
    assert rates.step_time_s == 0.5
    assert rates.tokens_per_s == 2000.0
    assert rates.tflops_per_rank == pytest.approx(4.0)
    assert rates.mfu is None


def test_peak_memory_cpu():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = peak_memory_bytes("cpu")
    assert got >= rss * (1 if sys.platform == "darwin" else 1024)
    assert got > 10 * 2**20  # a Python process with torch holds more than 10 MiB
    with pytest.raises(ValueError, match="supports cuda and cpu devices, got meta"):
        peak_memory_bytes("meta")


def test_comm_bytes_and_deltas():
    sp, tp = Communicator.solo("sp"), Communicator.solo("tp")
    sp.stats.record("all_gather", 100, 100)
    comms = {"sp": sp, "tp": tp}
    meter = CommMeter(comms)
    before = comm_bytes_by_name(comms)
    assert before == {
        "sp": {
            "bytes_sent": 100,
            "bytes_received": 100,
            "calls": 1,
            "by_primitive": {"all_gather": {"calls": 1, "bytes_sent": 100, "bytes_received": 100}},
        },
        "tp": {"bytes_sent": 0, "bytes_received": 0, "calls": 0, "by_primitive": {}},
    }
    sp.stats.record("all_gather", 40, 40)
    tp.stats.record("all_reduce", 8, 6)
    step = meter.delta()
    assert step == comm_bytes_delta(before, comm_bytes_by_name(comms))
    assert step["sp"] == {
        "bytes_sent": 40,
        "bytes_received": 40,
        "calls": 1,
        "by_primitive": {"all_gather": {"calls": 1, "bytes_sent": 40, "bytes_received": 40}},
    }
    assert step["tp"]["by_primitive"] == {"all_reduce": {"calls": 1, "bytes_sent": 8, "bytes_received": 6}}
    assert meter.delta()["sp"]["bytes_sent"] == 0  # nothing moved since the last step
    json.dumps(step)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logger_writes_json_lines_and_progress(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    stream = io.StringIO()
    with MetricsLogger(str(path), rank=0, total_steps=5, stream=stream, print_every=2) as logger:
        for step in range(1, 6):
            logger.log(step, loss=torch.tensor(2.0 / step), tokens_per_s=1234.5, comm={"sp": {"bytes_sent": step}})
            assert len(path.read_text().splitlines()) == step  # flushed at once
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": 2.0, "tokens_per_s": 1234.5, "comm": {"sp": {"bytes_sent": 1}}}
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]  # every 2 and the last
    assert "loss 1.0000 | 1,234 tok/s | ETA 0:00:00" in lines[0]


def test_logger_tty_progress_bar():
    stream = _Tty()
    logger = MetricsLogger(None, rank=0, total_steps=4, stream=stream)
    logger.log(1, loss=3.0)
    logger.log(2, loss=2.5)
    assert stream.getvalue().count("\r") == 2 and "\n" not in stream.getvalue()
    assert "[############............] step 2/4 | loss 2.5000" in stream.getvalue()
    logger.close()
    assert stream.getvalue().endswith("\n")


def test_logger_other_ranks_do_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    stream = io.StringIO()
    logger = MetricsLogger(str(path), rank=1, total_steps=2, stream=stream, tensorboard_dir=str(tmp_path / "tb"))
    logger.log(1, loss=1.0)
    logger.log(2, loss=1.0)
    logger.close()
    assert not path.exists() and not (tmp_path / "tb").exists() and stream.getvalue() == ""


def test_eta_format():
    assert metrics._format_duration(3725.4) == "1:02:05"
    assert metrics._format_duration(27 * 3600 + 3 * 60 + 9) == "27:03:09"


def test_tensorboard_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"tensorboard_dir='.*tb' needs the tensorboard package"):
        MetricsLogger(None, rank=0, total_steps=1, tensorboard_dir=str(tmp_path / "tb"))


def test_tensorboard_scalars(monkeypatch, tmp_path):
    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    logger = MetricsLogger(None, rank=0, total_steps=3, stream=io.StringIO(), tensorboard_dir=str(tmp_path))
    logger.log(3, loss=0.5, note="text", finite=True, comm={"sp": {"bytes_sent": 7}})
    logger.close()
    assert written == [("dir", str(tmp_path)), ("loss", 0.5, 3), ("comm/sp/bytes_sent", 7, 3), ("closed",)]
