"""Published sequence-parallel results reproduced by the step-level model (:mod:`distseq.plan.schedule`) on the
published device and link profiles (``profiles.json``), nothing fitted to the numbers being reproduced.

* :func:`ring_flash_attention`: ring-flash-attention's README table (8 x H800, batch api): each ring variant's
  throughput as a fraction of the ideal, 8 x the time of one flash-attn call on a rank's 8K tokens.
* :func:`lasp2`: the LASP-2 paper's training-speed gains (Linear-Llama3-1B, 64 x A100): LASP-2 over Ring Attention
  and over LASP-1, at 2048K and 512K tokens.

``python -m distseq.plan.published`` prints both tables; ``docs/planning.md`` explains the setups and the gaps.
"""

from __future__ import annotations

from dataclasses import dataclass

from distseq.plan.profiles import load_profile
from distseq.plan.schedule import (
    AttentionDims,
    Collective,
    Kernel,
    KernelKind,
    Message,
    build_schedule,
    kernel_seconds,
    lasp1_schedule,
    lasp2_schedule,
    layer_time,
    message_seconds,
)

__all__ = ["TOLERANCE", "Row", "format_rows", "lasp2", "ring_flash_attention"]

#: a reproduction holds when the prediction is within this relative distance of the published value
TOLERANCE = 0.10


@dataclass(frozen=True)
class Row:
    """One published quantity and the model's prediction of it."""

    quantity: str
    predicted: float
    published: float
    unit: str
    note: str = ""

    @property
    def error(self) -> float:
        """Relative error of the prediction."""
        return self.predicted / self.published - 1

    def within(self, tolerance: float = TOLERANCE) -> bool:
        return abs(self.error) <= tolerance


# ring-flash-attention (zhuzilin/ring-flash-attention), README "Performance Summary", batch api rows, measured with
# benchmark/benchmark_kvpacked_func.py at the commit that added the table ("Update benchmark", 2024-10-30): every rank
# holds 8K tokens of Llama-3.1-8B attention (32 query heads, 8 KV heads, head dim 128), batch 1, bf16, causal.
RING_FLASH_GPUS = 8
RING_FLASH_DIMS = AttentionDims(tokens=8 * 1024, heads=32, kv_heads=8, head_dim=128)
RING_FLASH_IDEAL_ITERS = {"fwd": 591.5, "fwd+bwd": 154.7}  # flash_attn_kvpacked_func on 8K, iter/s
RING_FLASH_FRACTIONS = {  # % of the ideal (the ideal iter/s / 8)
    "fwd": {"contiguous": 52.1, "zigzag": 85.2, "stripe": 74.4},
    "fwd+bwd": {"contiguous": 53.9, "zigzag": 90.2, "stripe": 82.9},
}
_RING_FLASH_NAMES = {"contiguous": "ring_attn", "zigzag": "zigzag_ring", "stripe": "stripe_attn"}
_ZIGZAG_BACKWARD_GAP = (
    "every measured ring backward is 0.4-0.7 ms per step slower than the model, about the time of the step's "
    "K/V and dK/dV messages (0.63 ms), which the model hides behind the kernels as the code is written to; the "
    "forwards and the single-call ideal match"
)


def ring_flash_attention() -> list[Row]:
    """The README's fractions of the ideal on 8 x H800 (profile ``h800``), and the ideal call's own iter/s."""
    profile = load_profile("h800")
    dims, gpus = RING_FLASH_DIMS, RING_FLASH_GPUS
    call = Kernel(KernelKind.SOFTMAX, dims.tokens, dims.tokens, causal=True)
    ideal = {
        "fwd": kernel_seconds(call, dims, profile, backward=False),
        "fwd+bwd": sum(kernel_seconds(call, dims, profile, backward=b) for b in (False, True)),
    }
    rows = [
        Row(f"flash_attn on 8K, {mode} (iter/s)", 1 / ideal[mode], RING_FLASH_IDEAL_ITERS[mode], "iter/s")
        for mode in ("fwd", "fwd+bwd")
    ]
    for mode in ("fwd+bwd", "fwd"):
        for layout, published in RING_FLASH_FRACTIONS[mode].items():
            layer = layer_time(build_schedule("ring", gpus, dims, layout), dims, profile, gpus_per_node=gpus)
            seconds = layer.forward_s if mode == "fwd" else layer.total_s
            note = _ZIGZAG_BACKWARD_GAP if (mode, layout) == ("fwd+bwd", "zigzag") else ""
            rows.append(
                Row(
                    f"{_RING_FLASH_NAMES[layout]}, {mode} (% of ideal)",
                    100 * gpus * ideal[mode] / seconds,
                    published,
                    "%",
                    note,
                )
            )
    return rows


# LASP-2 (Sun et al. 2025, arXiv 2502.07563). Section 4.1: DGX-A100 servers of 8 A100 80GB (NVSwitch), bf16,
# Megatron-Core 0.9; Fig. 3: pure Linear-Llama3-1B with basic linear attention, 64 GPUs, SP size 64, batch 1.
# Model: 16 layers, hidden 2048, 16 heads (Appendix A.5.3); FFN 8192 and untied embeddings (Linear-MoE's 1B example
# script), the Llama-3 tokenizer's 128256 tokens; LASP's kernels use 256-token blocks for long chunks.
LASP_GPUS, LASP_GPUS_PER_NODE = 64, 8
LASP_LAYERS, LASP_HIDDEN, LASP_HEADS, LASP_FFN, LASP_VOCAB = 16, 2048, 16, 8192, 128256
LASP_CHUNK = 256
LASP_SPEEDUPS = {  # Section 4.2: LASP-2's training-speed gain, %
    (2048 * 1024, "ring_linear"): 36.6,
    (2048 * 1024, "lasp1"): 15.2,
    (512 * 1024, "ring_linear"): 17.8,
    (512 * 1024, "lasp1"): 7.3,
}
LASP2_THROUGHPUT = {256 * 1024: 130215, 512 * 1024: 245353, 1024 * 1024: 442221}  # Table 6, 64 GPUs, tokens/s
_LASP_NAMES = {"ring_linear": "Ring Attention", "lasp1": "LASP-1"}
_LASP_GAPS = {
    "ring_linear": (
        "the paper ran Ring Attention without the right-product trick: every ring step is a quadratic block of "
        "(chunk x chunk) pairs, priced at matmul speed; the published gain implies a far cheaper baseline"
    ),
    "lasp1": (
        "LASP's released code receives the state before its whole local pass, so the 64 local passes run one after "
        "another in every layer; the published gain implies a far shorter chain"
    ),
    "throughput": (
        "the paper's iteration is slower than the model's and nearly flat in length (Table 6: 1.6 s at 2K tokens), "
        "a per-iteration cost the paper does not describe"
    ),
}


def _lasp_dims(seq_len: int) -> AttentionDims:
    return AttentionDims(
        tokens=seq_len // LASP_GPUS,
        heads=LASP_HEADS,
        kv_heads=LASP_HEADS,
        head_dim=LASP_HIDDEN // LASP_HEADS,
        chunk=LASP_CHUNK,
    )


def _lasp_iteration_s(strategy: str, seq_len: int, *, whole_pass_on_chain: bool = True) -> float:
    """One training iteration on one rank: the weight matmuls (3 passes of ``2 x tokens x weights``, lookups free)
    at the matmul fraction of peak, the attention layers' schedule, and the fp32 gradient all-reduce over the 64
    ranks (Megatron reduces bf16 runs' gradients in fp32; not overlapped by default). The optimizer step, the same
    for every strategy, is left out."""
    profile = load_profile("a100")
    dims = _lasp_dims(seq_len)
    h = LASP_HIDDEN
    layer_weights = 4 * h * h + 3 * h * LASP_FFN
    matmul_flops = 3 * 2 * dims.tokens * (LASP_LAYERS * layer_weights + h * LASP_VOCAB)
    dense_s = matmul_flops / (profile.peak_tflops["bf16"] * 1e12 * profile.efficiency["matmul"])
    if strategy == "lasp2":  # the released LASP-2 op gathers the states before its local kernels, blocking
        schedule = lasp2_schedule(LASP_GPUS, dims, overlap=False)
    elif strategy == "lasp1":
        schedule = lasp1_schedule(LASP_GPUS, dims, whole_pass_on_chain=whole_pass_on_chain)
    else:
        schedule = build_schedule(strategy, LASP_GPUS, dims)
    attention_s = LASP_LAYERS * layer_time(schedule, dims, profile, gpus_per_node=LASP_GPUS_PER_NODE).total_s
    gradient_bytes = 4 * (LASP_LAYERS * layer_weights + 2 * h * LASP_VOCAB)
    shard = Message(gradient_bytes // LASP_GPUS, Collective.ALL_GATHER)
    gradients_s = 2 * message_seconds(shard, LASP_GPUS, profile, LASP_GPUS_PER_NODE)  # reduce-scatter + all-gather
    return dense_s + attention_s + gradients_s


def lasp2() -> list[Row]:
    """LASP-2's gains over Ring Attention and LASP-1 (profile ``a100``), and LASP-2's own throughput."""
    rows = []
    for (seq_len, baseline), published in LASP_SPEEDUPS.items():
        gain = _lasp_iteration_s(baseline, seq_len) / _lasp_iteration_s("lasp2", seq_len) - 1
        quantity = f"LASP-2 over {_LASP_NAMES[baseline]}, {seq_len // 1024}K (% faster)"
        rows.append(Row(quantity, 100 * gain, published, "%", _LASP_GAPS[baseline]))
    paper_chain = _lasp_iteration_s("lasp1", 2048 * 1024, whole_pass_on_chain=False)
    gain = paper_chain / _lasp_iteration_s("lasp2", 2048 * 1024) - 1
    note = "LASP-1 as its paper's algorithm: intra-chunk kernels first, only the state update on the chain"
    rows.append(Row("LASP-2 over LASP-1 (paper's chain), 2048K (% faster)", 100 * gain, 15.2, "%", note))
    for seq_len, published in LASP2_THROUGHPUT.items():
        tokens_s = seq_len / _lasp_iteration_s("lasp2", seq_len)
        quantity = f"LASP-2 throughput, {seq_len // 1024}K on 64 GPUs (tokens/s)"
        rows.append(Row(quantity, tokens_s, published, "tokens/s", _LASP_GAPS["throughput"]))
    return rows


def format_rows(title: str, rows: list[Row]) -> str:
    width = max(len(r.quantity) for r in rows)
    lines = [title, f"{'quantity':<{width}}  {'predicted':>10}  {'published':>10}  {'error':>8}  within 10%"]
    for r in rows:
        lines.append(
            f"{r.quantity:<{width}}  {r.predicted:>10.4g}  {r.published:>10.4g}  {100 * r.error:>+7.1f}%  "
            f"{'yes' if r.within() else 'no'}"
        )
    return "\n".join(lines)


def main() -> None:
    print(
        format_rows("ring-flash-attention, 8 x H800, Llama-3.1-8B attention, 8K tokens per GPU", ring_flash_attention())
    )
    print()
    print(format_rows("LASP-2, Linear-Llama3-1B, 64 x A100 (8 DGX-A100)", lasp2()))
    print()
    notes = {r.note for r in ring_flash_attention() + lasp2() if r.note}
    print("Gaps:\n" + "\n".join(f"- {n}" for n in sorted(notes)))


if __name__ == "__main__":
    main()
