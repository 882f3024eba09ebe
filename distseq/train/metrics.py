"""Training metrics: model FLOPs, peak TFLOP/s and MFU, throughput, memory, communication bytes, the rank-0
logger (JSON lines, progress line, optional TensorBoard), and reading and rewinding its ``metrics.jsonl``.

FLOP convention (docs/metrics.md): a matmul ``[m, k] x [k, n]`` is ``2 m k n`` FLOPs; causal softmax
attention counts each query-key pair once (the lower triangle, ``T (T + 1) / 2`` pairs), not the square
the kernels may compute; training is 3x the forward; embedding lookups, norms, activations, RoPE, gates'
elementwise work and the loss are not counted.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import torch

from distseq.config.model import ModelConfig

if TYPE_CHECKING:
    from distseq.parallel.comm import Communicator

__all__ = [
    "EVENT_KEY",
    "METRICS_FILE",
    "PEAK_TFLOPS",
    "CommMeter",
    "MetricsLogger",
    "StepRates",
    "StepTimer",
    "comm_bytes_by_name",
    "comm_bytes_delta",
    "dropped_path",
    "mfu",
    "model_flops_per_sequence",
    "peak_memory_bytes",
    "peak_tflops",
    "read_metrics",
    "rewind_metrics",
    "split_metrics",
    "step_rates",
    "summary_line",
]

#: Rank 0's record of a run, in the run directory.
METRICS_FILE = "metrics.jsonl"
#: A ``metrics.jsonl`` row with this key is an event (``"resume"``), not a training step; readers of the step
#: series skip it.
EVENT_KEY = "event"


def _causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def model_flops_per_sequence(
    cfg: ModelConfig, seq_len: int, *, causal: bool = True, linear_chunk_size: int = 64
) -> dict[str, int]:
    """Forward FLOPs of ``HybridLM(cfg)`` on one sequence of ``T = seq_len`` tokens, by part.

    With ``h`` hidden, ``H`` / ``Hkv`` query / KV heads, ``D`` head_dim, ``V`` vocab, ``I`` dense width,
    ``E`` experts, ``k`` top_k, ``Im`` expert width (a matmul ``[m, k] x [k, n]`` = ``2 m k n``):

    * ``softmax_projections``: per softmax layer ``2 T h D (2 H + 2 Hkv)`` (q, k, v, o);
    * ``linear_projections``: per linear layer ``2 T h H D (4 + [output gate])`` (q, k, v, o, out gate)
      ``+ 2 T h H`` with a gate;
    * ``mamba_projections``: per Mamba2 layer ``2 T h (3 H D + 2 G N + H)`` (z, x, o; B and C of ``G`` groups of
      state size ``N``; dt);
    * ``deltanet_projections``: per gated DeltaNet layer ``2 T h (5 H D + 2 H)`` (q, k, v, output gate, o; the
      decay's step and beta);
    * ``dense_mlp``: per dense layer ``6 T h I`` (gate, up, down);
    * ``moe_router``: ``2 T h E``; ``moe_experts``: ``6 T h Im k`` (only the top_k routed experts, dropless);
      ``moe_shared``: ``6 T h Im`` with a shared expert (each per MoE layer);
    * ``lm_head``: ``2 T h V``; embedding lookups count 0;
    * ``softmax_attention``: per layer ``4 H D pairs`` (scores ``q.k`` and ``p v``), ``pairs = T (T + 1) / 2``
      when causal (each query-key pair once), ``T^2`` otherwise;
    * ``linear_attention``: per layer, the chunked form with chunks of ``C = linear_chunk_size`` tokens from the
      start of the sequence (last one shorter), ``dk = dv = D``:
      ``H [2 (dk + dv) sum_c L_c (L_c + 1) / 2 + 2 T dk dv + 2 T dk dv]``: causal intra-chunk pairs (scores and
      values), the readout ``q_t^T S`` and the state update ``S += k_t v_t^T``, every token once;
    * ``mamba_scan``: per Mamba2 layer the same chunked form with ``dk = N`` (B, C) and ``dv = D`` (x);
    * ``delta_rule``: per gated DeltaNet layer the chunked (WY) form, ``dk = dv = D``:
      ``H [(6 dk + 4 dv) sum_c L_c (L_c + 1) / 2 + 6 T dk dv]``: per causal pair of a chunk ``beta k_t . k_s``
      (``2 dk``), the triangular solve for the new values and keys (``2 (dk + dv)``), ``q_t . k_s`` and the
      weighted new value (``2 dk + 2 dv``); per token the state's correction of its value, the readout and the
      state update (``2 dk dv`` each);
    * ``weight_matmuls``: the sum of the projection parts (``2 T x`` active parameters except the embedding);
    * ``total_forward`` and ``total_train = 3 total_forward`` (backward = 2x forward).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if linear_chunk_size < 1:
        raise ValueError(f"linear_chunk_size must be >= 1, got {linear_chunk_size}")
    t, h, d = seq_len, cfg.hidden_size, cfg.head_dim
    heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
    n_softmax = cfg.layer_pattern.count("A")
    n_linear = cfg.layer_pattern.count("L")
    n_mamba, n_deltanet = cfg.layer_pattern.count("M"), cfg.layer_pattern.count("G")
    n_moe = cfg.mlp_kinds().count("M")
    n_dense = cfg.num_layers - n_moe
    state = cfg.mamba_state_size

    linear_proj = 2 * t * h * heads * d * (4 + int(cfg.linear_output_gate)) + 2 * t * h * heads * int(cfg.linear_gate)
    full, rest = divmod(t, linear_chunk_size)
    intra_pairs = full * _causal_pairs(linear_chunk_size) + _causal_pairs(rest)
    expert = 6 * t * h * cfg.moe_intermediate_size
    parts = {
        "softmax_projections": n_softmax * 2 * t * h * d * (2 * heads + 2 * kv_heads),
        "linear_projections": n_linear * linear_proj,
        "mamba_projections": n_mamba * 2 * t * h * (3 * heads * d + 2 * cfg.mamba_groups * state + heads),
        "deltanet_projections": n_deltanet * 2 * t * h * (5 * heads * d + 2 * heads),
        "dense_mlp": n_dense * 6 * t * h * cfg.intermediate_size,
        "moe_router": n_moe * 2 * t * h * cfg.num_experts,
        "moe_experts": n_moe * expert * cfg.top_k,
        "moe_shared": n_moe * expert * int(cfg.shared_expert),
        "lm_head": 2 * t * h * cfg.vocab_size,
    }
    parts["weight_matmuls"] = sum(parts.values())
    pairs = _causal_pairs(t) if causal else t * t
    parts["softmax_attention"] = n_softmax * 4 * heads * d * pairs
    parts["linear_attention"] = n_linear * heads * (4 * d * intra_pairs + 4 * t * d * d)
    parts["mamba_scan"] = n_mamba * heads * (2 * (state + d) * intra_pairs + 4 * t * state * d)
    parts["delta_rule"] = n_deltanet * heads * (10 * d * intra_pairs + 6 * t * d * d)
    parts["total_forward"] = parts["weight_matmuls"] + sum(
        parts[name] for name in ("softmax_attention", "linear_attention", "mamba_scan", "delta_rule")
    )
    parts["total_train"] = 3 * parts["total_forward"]
    return parts


def _hopper(bf16: float, tf32: float, fp32: float) -> dict[str, float]:
    return {"bf16": bf16, "fp16": bf16, "tf32": tf32, "fp32": fp32}


#: Dense (no sparsity) peak TFLOP/s per GPU from the vendor datasheets, by dtype: ``bf16`` / ``fp16`` tensor
#: cores, ``tf32`` tensor cores, ``fp32`` the non-tensor-core rate. Keys are matched as case-insensitive
#: substrings of ``torch.cuda.get_device_name()``, first match wins (so more specific names come first). An
#: H100 without "PCIe" / "NVL" in its name (e.g. "NVIDIA H100 80GB HBM3") is the SXM part.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "GH200": _hopper(989.4, 494.7, 66.9),
    "H200 NVL": _hopper(835.5, 417.5, 60.0),
    "H200": _hopper(989.4, 494.7, 66.9),
    "H100 PCIe": _hopper(756.0, 378.0, 51.2),
    "H100 NVL": _hopper(835.5, 417.5, 60.0),
    "H100": _hopper(989.4, 494.7, 66.9),
    "B200": {"bf16": 2250.0, "fp16": 2250.0},
    "A100": _hopper(312.0, 156.0, 19.5),
    "L40S": _hopper(362.05, 183.0, 91.6),
    "L40": _hopper(181.05, 90.5, 90.5),
    "L4": _hopper(121.0, 60.0, 30.3),
    "V100": {"fp16": 125.0, "fp32": 15.7},  # no bf16 tensor cores
}

_DTYPE_KEYS = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "tf32": "tf32",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}


def peak_tflops(device_name: str | None, dtype: torch.dtype | str = torch.bfloat16) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` (``torch.cuda.get_device_name()``) for ``dtype``: a torch dtype
    or ``"bf16" | "fp16" | "tf32" | "fp32"``. ``torch.float32`` means the non-tensor-core fp32 rate; pass
    ``"tf32"`` when TF32 matmuls are enabled. None for CPU, an unknown device, or a dtype the table lacks."""
    key = _DTYPE_KEYS.get(dtype.lower() if isinstance(dtype, str) else dtype)
    if key is None:
        raise ValueError(f"unknown dtype {dtype!r} for peak_tflops; use one of bf16, fp16, tf32, fp32")
    if not device_name or device_name.lower() == "cpu":
        return None
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in device_name.lower():
            return peaks.get(key)
    return None


def mfu(achieved_tflops: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation ``achieved / peak`` (both TFLOP/s per rank); None when the peak is unknown.

    Above 1.0 is an error (the FLOP count, the timing or the peak table is wrong), never a number to report.
    """
    if peak is None:
        return None
    if peak <= 0 or achieved_tflops < 0:
        raise ValueError(f"mfu needs peak > 0 and achieved >= 0: achieved={achieved_tflops}, peak={peak}")
    ratio = achieved_tflops / peak
    if ratio > 1.0:
        raise ValueError(
            f"MFU above 100%: achieved {achieved_tflops:.2f} TFLOP/s per rank > peak {peak:.2f} TFLOP/s "
            f"({ratio:.1%}); the FLOP count, the step time or the peak table is wrong"
        )
    return ratio


@dataclass(frozen=True)
class StepRates:
    step_time_s: float
    tokens_per_s: float  # global tokens of the step per second
    tflops_per_rank: float  # model TFLOP/s per rank (training FLOPs, the convention of model_flops_per_sequence)
    mfu: float | None  # None without a known peak


def step_rates(
    step_time_s: float,
    *,
    global_tokens: int,
    train_flops_per_sequence: float,
    sequences_per_step: int,
    world_size: int,
    peak: float | None = None,
) -> StepRates:
    """``tokens_per_s = global_tokens / step_time``; ``tflops_per_rank = train_flops_per_sequence *
    sequences_per_step / world_size / step_time / 1e12`` (every rank, tp and sp included, gets an equal
    share); ``mfu`` against ``peak`` TFLOP/s."""
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be positive, got {step_time_s}")
    tflops = train_flops_per_sequence * sequences_per_step / world_size / step_time_s / 1e12
    return StepRates(step_time_s, global_tokens / step_time_s, tflops, mfu(tflops, peak))


class StepTimer:
    """Wall time of one training step and its rates; ``start()`` then ``stop()`` around the step.

    ``device``: a CUDA device is synchronised before each reading, so the time covers the queued kernels.
    """

    def __init__(
        self,
        *,
        global_tokens: int,
        train_flops_per_sequence: float,
        sequences_per_step: int,
        world_size: int,
        peak: float | None = None,
        device: torch.device | str | None = None,
    ):
        self._rates = {
            "global_tokens": global_tokens,
            "train_flops_per_sequence": train_flops_per_sequence,
            "sequences_per_step": sequences_per_step,
            "world_size": world_size,
            "peak": peak,
        }
        self._device = torch.device(device) if device is not None else None
        self._start: float | None = None

    def _sync(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> StepRates:
        if self._start is None:
            raise RuntimeError("StepTimer.stop() before start()")
        self._sync()
        elapsed, self._start = time.perf_counter() - self._start, None
        return step_rates(elapsed, **self._rates)


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory of this process: ``torch.cuda.max_memory_allocated`` on a CUDA device (tensors only), the
    peak resident set size on CPU (whole process; ``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    raise ValueError(f"peak_memory_bytes supports cuda and cpu devices, got {device}")


def comm_bytes_by_name(comms: Mapping[str, Communicator]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes_sent", "bytes_received", "calls", "by_primitive": {primitive: {...}}}}``: each
    communicator's totals since its stats were last reset, plus the per-primitive detail (ready for JSON)."""
    return {
        str(name): {
            "bytes_sent": comm.stats.bytes_sent,
            "bytes_received": comm.stats.bytes_received,
            "calls": comm.stats.calls,
            "by_primitive": comm.stats.as_dict(),
        }
        for name, comm in comms.items()
    }


def _subtract(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _subtract(value, before.get(key, {})) if isinstance(value, Mapping) else value - before.get(key, 0)
        for key, value in after.items()
    }


def comm_bytes_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """``after - before`` for two :func:`comm_bytes_by_name` snapshots, key by key (missing in ``before``: 0).
    Valid only if the stats were not reset in between."""
    return _subtract(after, before)


class CommMeter:
    """Bytes moved per step: ``delta()`` returns what the communicators moved since the previous call (or since
    construction), in the shape of :func:`comm_bytes_by_name`. Do not reset their stats while metering."""

    def __init__(self, comms: Mapping[str, Communicator]):
        self._comms = dict(comms)
        self._last = comm_bytes_by_name(self._comms)

    def delta(self) -> dict[str, dict[str, Any]]:
        now = comm_bytes_by_name(self._comms)
        delta, self._last = comm_bytes_delta(self._last, now), now
        return delta


def _format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot log a {type(value).__name__} as JSON: {value!r}")


def _scalars(fields: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of ``fields``, nested keys joined by ``/`` (TensorBoard tags)."""
    out = {}
    for key, value in fields.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_scalars(value, f"{tag}/"))
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[tag] = value.item()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = value
    return out


class MetricsLogger:
    """Rank 0's record of a run: one JSON line per :meth:`log` call (flushed at once), a progress line on
    ``stream`` and, with ``tensorboard_dir``, TensorBoard scalars. On every other rank it does nothing.

    Args:
        path: JSON-lines file (appended to, parent folders created), or None for no file.
        rank: this process's global rank.
        total_steps: steps of the run, for the progress bar and the ETA.
        tensorboard_dir: TensorBoard log folder, or None; needs the ``tensorboard`` package.
        stream: where the progress goes (default ``sys.stderr``). On a TTY it is one line redrawn in place
            (carriage return); otherwise one line every ``print_every`` steps and at the last step.
        print_every: steps between progress lines when ``stream`` is not a TTY.
        start_step: steps already done before this logger started (a resumed run), for the ETA.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        rank: int,
        total_steps: int,
        tensorboard_dir: str | os.PathLike | None = None,
        stream: TextIO | None = None,
        print_every: int = 10,
        start_step: int = 0,
    ):
        if total_steps < 1 or print_every < 1:
            raise ValueError(f"total_steps and print_every must be >= 1, got {total_steps} and {print_every}")
        self.active = rank == 0
        self.total_steps, self.print_every, self.start_step = total_steps, print_every, start_step
        self._file: TextIO | None = None
        self._writer = None
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self.active and bool(getattr(self._stream, "isatty", lambda: False)())
        self._line_open = False
        self._start = time.monotonic()
        if not self.active:
            return
        if tensorboard_dir is not None:
            self._writer = self._tensorboard(tensorboard_dir)
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # closed in close()

    @staticmethod
    def _tensorboard(log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                f"tensorboard_dir={str(log_dir)!r} needs the tensorboard package (pip install tensorboard), "
                f"which is not importable: {err}"
            ) from err
        return SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, **fields: Any) -> None:
        """Record ``step`` (steps completed, 1-based) with ``fields``: any JSON-able values, tensors of one
        element included; ``loss`` and ``tokens_per_s`` also go to the progress line."""
        if not self.active:
            return
        if self._file is not None:
            self._file.write(json.dumps({"step": step, **fields}, default=_jsonable) + "\n")
            self._file.flush()
        if self._writer is not None:
            for tag, value in _scalars(fields).items():
                self._writer.add_scalar(tag, value, step)
        last = step >= self.total_steps
        if self._tty:
            self._stream.write("\r" + self._progress(step, fields, bar=True) + ("\n" if last else ""))
            self._line_open = not last
            self._stream.flush()
        elif last or step % self.print_every == 0:
            self._stream.write(self._progress(step, fields, bar=False) + "\n")
            self._stream.flush()

    def event(self, kind: str, **fields: Any) -> None:
        """Record an event row ``{"event": kind, **fields}`` (a resume): in the file only, so the progress line
        and TensorBoard keep showing steps."""
        if self.active and self._file is not None:
            self._file.write(json.dumps({EVENT_KEY: kind, **fields}, default=_jsonable) + "\n")
            self._file.flush()

    def _progress(self, step: int, fields: Mapping[str, Any], *, bar: bool) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        if "loss" in fields:
            parts.append(f"loss {float(fields['loss']):.4f}")
        if "tokens_per_s" in fields:
            parts.append(f"{float(fields['tokens_per_s']):,.0f} tok/s")
        done = step - self.start_step
        if done > 0:
            remaining = (time.monotonic() - self._start) / done * max(0, self.total_steps - step)
            parts.append(f"ETA {_format_duration(remaining)}")
        line = " | ".join(parts)
        if not bar:
            return line
        width = 24
        filled = min(width, width * step // self.total_steps)
        # Padded so that a shorter redraw erases the longer line before it.
        return f"[{'#' * filled}{'.' * (width - filled)}] {line}".ljust(100)

    def close(self) -> None:
        if self._line_open:
            self._stream.write("\n")
            self._stream.flush()
            self._line_open = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_row(line: str) -> dict[str, Any] | None:
    """One ``metrics.jsonl`` line as a dict; None when it is not a JSON object (a line cut short by a crash)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_metrics(path: str | os.PathLike, *, events: bool = False) -> list[dict[str, Any]]:
    """The step rows of a ``metrics.jsonl`` in file order (event rows skipped), or with ``events=True`` the
    event rows only; see :func:`split_metrics`."""
    steps, event_rows = split_metrics(path)
    return event_rows if events else steps


def split_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(step rows, event rows)`` of a ``metrics.jsonl``, each in file order, from one read. A last line that
    is not JSON (cut short when a run was killed mid-write) is ignored; any other one raises ValueError naming
    the file and line."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps, events = [], []
    for number, line in enumerate(lines, start=1):
        row = _parse_row(line)
        if row is None:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not a JSON object: {line[:80]!r}")
        (events if EVENT_KEY in row else steps).append(row)
    return steps, events


def dropped_path(path: str | os.PathLike) -> Path:
    """Where :func:`rewind_metrics` moves the rows it cuts: ``metrics.jsonl`` -> ``metrics.dropped.jsonl``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.dropped{path.suffix}")


def rewind_metrics(path: str | os.PathLike, step: int) -> int:
    """Cut ``metrics.jsonl`` back to a checkpoint taken at ``step``, before a resumed run appends to it, so the
    file holds one trajectory: each step once, in order. Returns how many rows were cut.

    The file keeps its longest prefix of rows with ``step <= step`` (rows without a step count as kept); from
    the first other row on (a step the crashed run logged after its last checkpoint, a line cut short by the
    kill, anything after them) every line is appended verbatim to :func:`dropped_path`, so nothing is lost.
    The dropped rows are written before the file is replaced (atomically), so a crash in between duplicates
    rows in the dropped file rather than losing them. A missing file is nothing to cut (0)."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = [line if line.endswith("\n") else line + "\n" for line in path.read_text(encoding="utf-8").splitlines()]
    cut = len(lines)
    for index, line in enumerate(lines):
        row = _parse_row(line)
        if row is None or (isinstance(row.get("step"), int) and row["step"] > step):
            cut = index
            break
    kept, dropped = lines[:cut], [line for line in lines[cut:] if line.strip()]
    if not dropped:
        return 0
    with open(dropped_path(path), "a", encoding="utf-8") as out:
        out.writelines(dropped)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(dropped)


def summary_line(
    *,
    step: int,
    start_step: int,
    seconds: float,
    loss: float | None,
    evaluation: Mapping[str, float] | None = None,
) -> str:
    """The one line that ends a run: ``done: 500 steps in 107.3 s | loss 0.5200 | eval accuracy 0.953 (chance
    0.062)``; a resumed run names its start step, the time is this run's; the parts without a value are left out."""
    resumed = f" (resumed at step {start_step})" if start_step else ""
    parts = [f"done: {step} steps{resumed} in {seconds:.1f} s"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if evaluation and "eval_accuracy" in evaluation:
        accuracy = f"eval accuracy {evaluation['eval_accuracy']:.3f}"
        if evaluation.get("eval_chance") is not None:
            accuracy += f" (chance {evaluation['eval_chance']:.3f})"
        parts.append(accuracy)
    return " | ".join(parts)
