"""The training command end to end on gloo ranks: the same losses under every layout, exact resume, resume under
another layout, divergence handling, collective timeouts.

Runs use ``configs/runs/tiny-hybrid-cpu.yaml`` shrunk by overrides (64-token sequences, a few steps), so the
model, the strategies, the data and the checkpoint code are exactly those of the README's main command.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distseq.config import RunConfig, load_yaml
from distseq.parallel.comm import CommunicationError, Communicator
from distseq.parallel.mesh import ParallelDims
from distseq.train.plan import plan_report
from distseq.train.trainer import TrainingDiverged, run_training

TINY = Path(__file__).resolve().parents[2] / "configs" / "runs" / "tiny-hybrid-cpu.yaml"
SMALL = [
    "data.seq_len=64",
    "data.global_batch=4",
    "data.micro_batch=1",
    "data.eval_samples=4",
    "data.synthetic.num_pairs=4",
    "data.synthetic.num_queries=4",
    "optim.warmup_steps=2",
    # The main job's lr (1e-2) turns fp32 summation-order differences into visible loss differences within a few
    # Adam steps; these runs compare layouts step by step, so they train more gently.
    "optim.lr=3e-3",
    "optim.min_lr=3e-4",
    "train.eval_every=0",
    "metrics.print_every=100",
    "checkpoint.every=0",
]
#: fp32 sums in another order (sequence and data shards reduce differently): losses agree to this, relative
LOSS_RTOL = 2e-5


def job_train(out: str, overrides: list[str], resume: bool | str = False) -> dict:
    cfg = load_yaml(RunConfig, TINY, [*SMALL, f"output_dir={out}", *overrides])
    result = run_training(cfg, resume=resume)
    return {"losses": result.losses, "evals": result.evals, "ckpt": result.last_checkpoint, "start": result.start_step}


def _losses(worlds, world_size: int, out: Path, overrides: list[str], resume: bool | str = False) -> dict:
    results = worlds(world_size).run(job_train, str(out), overrides, resume, timeout=280)
    assert all(r["losses"] == results[0]["losses"] for r in results), "every rank reports the same global loss"
    return results[0]


def _assert_close(got: list[float], want: list[float], rtol: float = LOSS_RTOL) -> None:
    assert len(got) == len(want), (got, want)
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))
    assert worst <= rtol, f"losses differ by {worst:.2e} relative (> {rtol}):\n got  {got}\n want {want}"


@pytest.fixture(scope="module")
def reference(worlds, tmp_path_factory):
    """Eight steps on one process (sp = 1): the losses every layout must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    return _losses(worlds, 1, out, ["parallel.sp=1", "train.steps=8"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["parallel.sp=4"],
        ["parallel.sp=2"],  # dp = 2 derived
        ["parallel.sp=2", "parallel.softmax_strategy=usp", "parallel.layout=contiguous"],
        ["parallel.sp=2", "parallel.tp=2", "parallel.softmax_strategy=ulysses"],
        ["parallel.sp=2", "parallel.ep=2", "parallel.softmax_strategy=token_ring"],
        ["parallel.sp=2", "parallel.data_parallel=ddp", "train.activation_checkpointing=true"],
        ["parallel.sp=2", "parallel.data_parallel=fsdp", "parallel.softmax_strategy=allgather_kv"],
    ],
    ids=["sp4", "sp2-dp2", "sp2-dp2-usp-contiguous", "sp2-tp2-ulysses", "sp2-dp2-ep2-token_ring", "ddp-ckpt", "fsdp"],
)
def test_four_ranks_reproduce_the_single_process_losses(worlds, tmp_path, reference, overrides):
    got = _losses(worlds, 4, tmp_path, [*overrides, "train.steps=8"])
    _assert_close(got["losses"], reference["losses"])
    assert got["losses"][-1] < got["losses"][0], "the loss falls"
    # The evaluation (held-out loss and greedy accuracy on the answers) is layout-independent too.
    assert got["evals"][-1]["eval_accuracy"] == reference["evals"][-1]["eval_accuracy"]
    _assert_close([got["evals"][-1]["eval_loss"]], [reference["evals"][-1]["eval_loss"]])


def test_bf16_autocast_tracks_the_fp32_losses(worlds, tmp_path, reference):
    """train.dtype=bfloat16 (the GPU default) runs the same model under autocast; on CPU too."""
    got = _losses(worlds, 4, tmp_path, ["parallel.sp=2", "train.steps=8", "train.dtype=bfloat16"])
    _assert_close(got["losses"], reference["losses"], rtol=2e-2)


def test_metrics_log_and_resolved_config(worlds, tmp_path):
    _losses(worlds, 4, tmp_path, ["parallel.sp=2", "train.steps=3", "checkpoint.every=2"])
    run = tmp_path / "tiny-hybrid-cpu"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2, 3]
    first = lines[0]
    for key in (
        "loss",
        "lm_loss",
        "aux_loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "tflops_per_rank",
        "peak_memory_bytes",
    ):
        assert isinstance(first[key], (int, float)) and first[key] >= 0, key
    assert first["mfu"] is None  # no known peak on a CPU
    assert first["tokens_per_s"] == pytest.approx(4 * 64 / first["step_time_s"])
    sent = first["comm_bytes_sent"]
    assert sent["softmax.ring"] > 0 and sent["linear.lasp2"] > 0 and sent["dp_sp"] > 0, sent
    # The short convolutions' halos, measured on rank 0, are what the dry-run plan says.
    cfg = load_yaml(RunConfig, run / "config.yaml")
    plan = plan_report(
        cfg.model,
        ParallelDims(dp=2, sp=2, world_size=4),
        seq_len=64,
        micro_batch=cfg.data.micro_batch,
        grad_accum=cfg.data.global_batch // cfg.data.micro_batch // 2,
        softmax_strategy="ring",
        linear_strategy="lasp2",
        layout="contiguous",
        dtype_bytes=4,
    )
    halos = [e for e in plan["communication"]["sequence_parallel"] if e["kind"].startswith("short conv")]
    grad_accum = cfg.data.global_batch // cfg.data.micro_batch // 2
    rank0 = sum(
        e["layers"] * grad_accum * (e["per_sp_rank"][0]["fwd_sent"] + e["per_sp_rank"][0]["bwd_sent"]) for e in halos
    )
    assert len(halos) == 2 and sent["conv"] == rank0, (sent, halos)
    # So are the strategies' bytes and the gradient reduction with the step's small totals over dp x sp.
    for entry in plan["communication"]["sequence_parallel"]:
        if not entry["kind"].startswith("short conv"):
            mine = entry["per_sp_rank"][0]
            want = entry["layers"] * grad_accum * (mine["fwd_sent"] + mine["bwd_sent"])
            assert sent[f"{entry['kind']}.{entry['strategy']}"] == want, (entry, sent)
    assert sent["dp_sp"] == plan["communication"]["gradients"]["per_step"], (sent, plan["communication"]["gradients"])
    resolved = load_yaml(RunConfig, run / "config.yaml")
    assert resolved.parallel.dp == 2 and resolved.data.seq_len == 64
    # checkpoint.every=2 and the end: step 2 and step 3, the newest two kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]


def test_resume_continues_the_exact_trajectory(worlds, tmp_path):
    base = ["parallel.sp=2", "train.steps=20", "checkpoint.every=10", "checkpoint.keep=0"]
    whole = _losses(worlds, 4, tmp_path / "whole", base)
    # A second run resumes from the first run's step-10 checkpoint and trains steps 11..20.
    ckpt = tmp_path / "whole" / "tiny-hybrid-cpu" / "checkpoints" / "step_00000010"
    resumed = _losses(worlds, 4, tmp_path / "resumed", base, resume=str(ckpt))
    assert resumed["start"] == 10
    assert resumed["losses"] == whole["losses"][10:], "a resume under the same layout is bit-for-bit the same run"


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        (4, ["parallel.sp=4"]),
        (4, ["parallel.sp=1", "parallel.tp=2"]),
        (1, ["parallel.sp=1"]),
        (2, ["parallel.sp=1", "parallel.ep=2"]),
    ],
    ids=["to-sp4", "to-dp2-tp2", "to-single", "to-dp2-ep2"],
)
def test_resume_under_another_layout(worlds, tmp_path, world, layout):
    base = ["train.steps=12", "checkpoint.every=6", "checkpoint.keep=0"]
    whole = _losses(worlds, 4, tmp_path / "whole", [*base, "parallel.sp=2"])  # saved as dp=2 x sp=2
    ckpt = tmp_path / "whole" / "tiny-hybrid-cpu" / "checkpoints" / "step_00000006"
    resumed = _losses(worlds, world, tmp_path / "resumed", [*base, *layout], resume=str(ckpt))
    assert resumed["start"] == 6
    # Adam divides by sqrt(v): fp32 differences of order 1e-7 in the weights grow a little per step.
    _assert_close(resumed["losses"], whole["losses"][6:], rtol=1e-4)


def test_init_from_another_run_under_another_layout_and_length(worlds, tmp_path):
    """``train.init_from`` starts a run from another run's weights (not its optimizer, schedule or data): with a
    vanishing learning rate, the new run's evaluation on the source run's held-out samples equals the source run's
    last evaluation, under another layout (sp = 4); at twice the sequence length the run trains from there."""
    source = _losses(worlds, 4, tmp_path / "source", ["parallel.sp=2", "train.steps=6"])
    ckpt = tmp_path / "source" / "tiny-hybrid-cpu" / "checkpoints" / "step_00000006"
    frozen = ["train.steps=1", "optim.lr=1e-12", "optim.min_lr=0", f"train.init_from={ckpt}"]
    same = _losses(worlds, 4, tmp_path / "same", ["parallel.sp=4", *frozen])
    assert same["start"] == 0
    _assert_close([same["evals"][-1]["eval_loss"]], [source["evals"][-1]["eval_loss"]], rtol=1e-5)
    rows = (tmp_path / "same" / "tiny-hybrid-cpu" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[0]) == {"event": "init_from", "step": 0, "checkpoint": str(ckpt)}
    longer = _losses(
        worlds, 4, tmp_path / "longer", ["parallel.sp=4", "data.seq_len=128", "train.steps=2", *frozen[2:]]
    )
    # A fresh model starts at about ln(vocab) = 4.56; the source run's weights start lower.
    assert longer["losses"][0] < source["losses"][0] - 0.1, (longer["losses"], source["losses"])


def test_a_fresh_run_retires_an_earlier_runs_checkpoints(worlds, tmp_path):
    """Run the same config twice without --resume: the second run's saves, pruning and a later --resume see only
    its own checkpoints; the first run's move to checkpoints.previous."""
    run = tmp_path / "tiny-hybrid-cpu"
    _losses(worlds, 2, tmp_path, ["parallel.sp=2", "train.steps=3", "checkpoint.every=1", "checkpoint.keep=0"])
    _losses(worlds, 2, tmp_path, ["parallel.sp=2", "train.steps=1", "checkpoint.every=1", "checkpoint.keep=2"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    previous = sorted(p.name for p in (run / "checkpoints.previous").iterdir())
    assert previous == ["step_00000001", "step_00000002", "step_00000003"]
    resumed = _losses(worlds, 2, tmp_path, ["parallel.sp=2", "train.steps=2"], resume=True)
    assert resumed["start"] == 1, "resumed from this run's step 1, not the earlier run's step 3"


def test_resume_latest_from_the_run_directory(worlds, tmp_path):
    base = ["parallel.sp=2", "train.steps=4", "checkpoint.every=2"]
    _losses(worlds, 4, tmp_path, base)
    again = _losses(worlds, 4, tmp_path, [*base, "train.steps=6"], resume=True)  # newest: step 4
    assert again["start"] == 4 and len(again["losses"]) == 2


def test_divergence_stops_before_the_step_and_keeps_the_last_good_checkpoint(worlds, tmp_path):
    assert worlds(4).run(_divergence_job, str(tmp_path), timeout=200) == ["stopped"] * 4
    run = tmp_path / "tiny-hybrid-cpu"
    kept = sorted((run / "checkpoints").iterdir())
    assert kept and all((k / "meta.json").exists() for k in kept), "only complete (good) checkpoints exist"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert int(kept[-1].name.removeprefix("step_")) == logged[-1]["step"], "the last logged step was saved"


def _divergence_job(out: str) -> str:
    cfg = load_yaml(RunConfig, TINY, [*SMALL, f"output_dir={out}", "parallel.sp=2", "train.steps=6"])
    cfg.checkpoint.every = 1
    cfg.optim.lr = cfg.optim.min_lr = 1e30  # the weights blow up after the first step
    cfg.optim.max_grad_norm = None
    with pytest.raises(TrainingDiverged, match=r"non-finite training at step \d+.*Last good checkpoint: \S+step_"):
        run_training(cfg)
    return "stopped"


def job_timeout() -> str:
    group = dist.new_group(list(range(dist.get_world_size())), timeout=timedelta(seconds=3))
    comm = Communicator(group, name="sp")
    if dist.get_rank() == 1:
        return "skipped"  # never joins the all-reduce: rank 0 must fail, naming the call, not hang
    with pytest.raises(CommunicationError, match=r"all_reduce on group 'sp' \(rank 0 of 2"):
        comm.all_reduce(torch.ones(4))
    return "timed out"


def test_a_missing_peer_fails_the_collective_with_rank_group_and_operation(worlds):
    assert worlds(2).run(job_timeout, timeout=60) == ["timed out", "skipped"]


def test_packed_documents_from_a_token_file_under_every_layout(worlds, tmp_path):
    """Documents cross sequence-shard boundaries; cu_seqlens reach every strategy; the losses match sp = 1."""
    from distseq.data import prepare

    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(16):
        (texts / f"{i:02d}.txt").write_text(f"doc {i} " + "abcdefghij"[i % 10] * (7 + 5 * i))
    prepare([texts], tmp_path / "corpus")
    tokens = [
        "data.source=tokens",
        f"data.path={tmp_path / 'corpus'}",
        "data.pack_documents=true",
        "data.eval_samples=0",
        "model.vocab_size=260",
        "train.steps=4",
    ]
    want = _losses(worlds, 1, tmp_path / "one", [*tokens, "parallel.sp=1"])
    for overrides in (["parallel.sp=2"], ["parallel.sp=4", "parallel.softmax_strategy=token_ring"]):
        got = _losses(worlds, 4, tmp_path / overrides[-1], [*tokens, *overrides])
        _assert_close(got["losses"], want["losses"])


@pytest.mark.timeout(300)
def test_the_main_command_learns_the_recall_task(worlds, tmp_path):
    """The README's run (400 steps, about two minutes on 4 gloo ranks): the model learns the recall task whose
    answers lie on the other SP shard, held-out accuracy >= 0.9 (chance 1/16), the loss far below chance."""
    cfg = load_yaml(RunConfig, TINY, [f"output_dir={tmp_path}", "train.eval_every=0"])
    results = worlds(4).run(_learn_job, cfg, timeout=290)
    losses, final = results[0]
    assert final["eval_chance"] == 1 / 16
    assert losses[0] > 4.0 and max(losses[-10:]) < 0.5, losses[::10]  # ln(16) = 2.77 guesses a value
    assert final["eval_accuracy"] >= 0.9, final


def _learn_job(cfg: RunConfig) -> tuple[list[float], dict]:
    result = run_training(cfg)
    return result.losses, result.evals[-1]
