"""The one-GPU suite: what a short device loan should measure, in one script (about 5 minutes on an H100 / H200).

    python benchmarks/gpu_suite.py                       # on the GPU machine: results/gpu_<device>.json
    python benchmarks/gpu_suite.py --smoke --out /tmp/s.json   # tiny sizes on CPU: checks the script runs

(a) local softmax attention, causal, bf16, 16 heads x 128, N = 8K..128K, forward + backward TFLOP/s: distseq's
    path (a strategy on one rank: plan, spans and the ``sdpa`` backend; ``flash_attn`` too when installed) against
    torch's ``scaled_dot_product_attention`` (flash). FLOPs: ``2 N^2 H D`` forward (causal), 2.5x that backward.
(b) linear attention with a data-dependent gate, bf16, 16 heads x 128, N = 8K..256K, forward + backward: LASP-2
    on one rank with each local kernel (``torch``, ``triton``, ``fla`` when installed) and fla's
    ``chunk_simple_gla`` itself. FLOPs: ``model_flops_per_sequence``'s chunked convention.
(c) one training step of a 0.9B-parameter hybrid MoE (24 layers LLLA, hidden 1280, 8 experts top-2 on every other layer,
    bf16 autocast, activation checkpointing) at 32K tokens on the one GPU through the real trainer: tokens/s,
    TFLOP/s, MFU (the trainer's own figures).
(d) the longest sequence whose forward + backward of that model fits on the GPU (doubling, then one bisection
    step; a ``torch.OutOfMemoryError`` ends a probe), with its peak memory per token.

Each part is timed with device synchronisation, after a warm-up. A part that fails records its error and the
suite goes on. Writes JSON (device, torch, versions, every figure) after every part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.registry import make_strategy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, device: torch.device, repeats: int) -> float:
    """Median seconds of ``step()`` over ``repeats`` runs after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def attention_part(device, dtype, lengths, heads, head_dim, repeats) -> list[dict]:
    rows = []
    for n in lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, dout = (torch.randn(1, n, heads, head_dim, device=device, generator=g, dtype=dtype) for _ in range(4))
        flops = 3.5 * 2 * n * n * heads * head_dim  # causal forward 2 N^2 H D, backward 2.5x
        methods = {"torch_sdpa": None, "distseq_sdpa": "sdpa"}
        if _installed("flash_attn") and device.type == "cuda":
            methods["distseq_flash_attn"] = "flash_attn"
        for name, backend in methods.items():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            if backend is None:

                def step(leaves=leaves, dout=dout):
                    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves), is_causal=True)
                    out.transpose(1, 2).backward(dout)

            else:
                strategy = make_strategy(
                    "ring", Communicator.solo(), SequenceLayout("contiguous", n, 1, 0), attention_backend=backend
                )

                def step(leaves=leaves, strategy=strategy, dout=dout):
                    strategy.attention(*leaves, causal=True).backward(dout)

            seconds = _time(step, device, repeats)
            rows.append({"method": name, "seq_len": n, "seconds": seconds, "tflops": flops / seconds / 1e12})
    return rows


def linear_part(device, dtype, lengths, heads, head_dim, repeats) -> list[dict]:
    from distseq.config.model import ModelConfig
    from distseq.train.metrics import model_flops_per_sequence

    rows = []
    one_layer = ModelConfig(
        hidden_size=heads * head_dim, num_heads=heads, num_kv_heads=heads, layer_pattern="L", mlp_pattern="D"
    )
    for n in lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, dout = (torch.randn(1, n, heads, head_dim, device=device, generator=g, dtype=dtype) for _ in range(4))
        q, k = q * head_dim**-0.5, k * head_dim**-0.5
        gate = F.logsigmoid(torch.randn(1, n, heads, device=device, generator=g) + 4)
        flops = 3 * model_flops_per_sequence(one_layer, n)["linear_attention"]
        backends = ["torch"] + [b for b in ("triton", "fla") if device.type == "cuda" and _installed(b)]
        for backend in backends:
            strategy = make_strategy(
                "lasp2", Communicator.solo(), SequenceLayout("contiguous", n, 1, 0), backend=backend
            )
            leaves = [t.detach().requires_grad_() for t in (q, k, v, gate)]

            def step(leaves=leaves, strategy=strategy, dout=dout):
                strategy.linear_attention(*leaves[:3], gate=leaves[3]).backward(dout)

            seconds = _time(step, device, repeats)
            rows.append(
                {"method": f"lasp2[{backend}]", "seq_len": n, "seconds": seconds, "tflops": flops / seconds / 1e12}
            )
        if device.type == "cuda" and _installed("fla"):
            from fla.ops.simple_gla import chunk_simple_gla

            leaves = [t.detach().requires_grad_() for t in (q, k, v, gate)]

            def step(leaves=leaves, dout=dout):
                chunk_simple_gla(*leaves[:3], g=leaves[3], scale=1.0)[0].backward(dout)

            seconds = _time(step, device, repeats)
            rows.append(
                {"method": "fla_chunk_simple_gla", "seq_len": n, "seconds": seconds, "tflops": flops / seconds / 1e12}
            )
    return rows


def _model_config(smoke: bool) -> dict:
    if smoke:
        return dict(vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2, layer_pattern="LLLA", moe_interval=2)
    return dict(
        vocab_size=32768,
        hidden_size=1280,
        num_heads=10,
        num_kv_heads=5,
        layer_pattern="LLLA" * 6,
        moe_interval=2,
        intermediate_size=3584,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=1280,
        qk_norm=True,
        linear_gate=True,
        loss_chunk_size=8192,
    )


def train_part(device, seq_len: int, steps: int, smoke: bool) -> dict:
    """A few steps of the real trainer on one rank; its own tokens/s, TFLOP/s and MFU from the last step."""
    from distseq.config import RunConfig, load_yaml
    from distseq.config.loader import dump_yaml
    from distseq.train.metrics import METRICS_FILE, read_metrics
    from distseq.train.trainer import run_training

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "suite.yaml"
        cfg = RunConfig(name="gpu-suite", output_dir=tmp)
        dump_yaml(cfg, base)
        model = [f"model.{k}={v}" for k, v in _model_config(smoke).items()]
        overrides = [
            *model,
            f"data.seq_len={seq_len}",
            "data.global_batch=1",
            "data.micro_batch=1",
            "data.eval_samples=0",
            f"data.synthetic.num_pairs={4 if smoke else 64}",
            f"data.synthetic.num_keys={64 if smoke else 4096}",
            f"data.synthetic.num_values={16 if smoke else 1024}",
            f"train.steps={steps}",
            "train.activation_checkpointing=true",
            "checkpoint.every=0",
            "metrics.print_every=1",
        ]
        cfg = load_yaml(RunConfig, base, overrides)
        run_training(cfg)
        rows = read_metrics(Path(tmp) / "gpu-suite" / METRICS_FILE)
    last = rows[-1]
    keys = ("step_time_s", "tokens_per_s", "tflops_per_rank", "mfu", "mfu_error", "peak_memory_bytes")
    return {"seq_len": seq_len, "steps": steps, **{k: last.get(k) for k in keys}}


def max_length_part(device, start: int, limit: int, smoke: bool) -> dict:
    """The longest N (multiple of 1024) whose forward + backward fits: doubling from ``start`` up to ``limit``,
    then one bisection step between the last fit and the first failure."""
    from distseq.config.model import ModelConfig
    from distseq.models.hybrid import HybridLM
    from distseq.parallel.sequence.context import SequenceParallel

    torch.manual_seed(0)
    model = HybridLM(ModelConfig(**_model_config(smoke))).to(device)
    model.activation_checkpointing = True

    def fits(n: int) -> tuple[bool, int]:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(ids, ids, SequenceParallel.single(n))
            out.loss.backward()
        except torch.OutOfMemoryError:
            return False, 0
        finally:
            model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        return True, peak

    best, best_peak, n, failed = 0, 0, start, None
    while n <= limit:
        ok, peak = fits(n)
        if not ok:
            failed = n
            break
        best, best_peak, n = n, peak, n * 2
    if failed is not None and best:
        middle = (best + failed) // 2 // 1024 * 1024
        if middle > best:
            ok, peak = fits(middle)
            if ok:
                best, best_peak = middle, peak
    return {
        "longest_seq_len": best,
        "first_failure": failed,
        "peak_bytes": best_peak,
        "peak_bytes_per_token": best_peak / max(best, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device: check that the suite runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="default results/gpu_<device>.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: run on the GPU machine, or pass --smoke for a CPU check of the script")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or RESULTS / f"gpu_{name.replace(' ', '_').lower()}.json"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        sizes = {"attention": [256, 512], "linear": [256, 512], "train": 256, "max": (256, 1024), "heads": 4, "dim": 32}
    else:
        sizes = {
            "attention": [8192, 16384, 32768, 65536, 131072],
            "linear": [8192, 32768, 131072, 262144],
            "train": 32768,
            "max": (65536, 4 * 1024 * 1024),
            "heads": 16,
            "dim": 128,
        }
    versions = {m: getattr(__import__(m), "__version__", "?") for m in ("triton", "fla", "flash_attn") if _installed(m)}
    result = {
        "device": name,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "packages": versions,
        "parts": {},
    }
    parts = {
        "attention": lambda: attention_part(
            device, dtype, sizes["attention"], sizes["heads"], sizes["dim"], args.repeats
        ),
        "linear": lambda: linear_part(device, dtype, sizes["linear"], sizes["heads"], sizes["dim"], args.repeats),
        "train_step": lambda: train_part(device, sizes["train"], 2 if args.smoke else 4, args.smoke),
        "max_length": lambda: max_length_part(device, *sizes["max"], args.smoke),
    }
    for part, run in parts.items():
        start = time.perf_counter()
        try:
            result["parts"][part] = {"result": run()}
        except Exception as err:  # noqa: BLE001  (one failing part must not lose the others)
            result["parts"][part] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-3000:],
            }
        result["parts"][part]["wall_s"] = round(time.perf_counter() - start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"{part}: {json.dumps(result['parts'][part], default=str)[:600]}", flush=True)
    failed = [p for p, r in result["parts"].items() if "error" in r]
    print(f"wrote {out}; failed parts: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
