"""``distseq train`` with DeepSpeed ZeRO as the data-parallel engine, on gloo ranks: every stage reproduces the
native run step by step at sp = 2 x dp = 2, a resume from a DeepSpeed checkpoint continues the same trajectory, a
native checkpoint starts a DeepSpeed run, and a diverging run stops before its optimizer step touches the weights.

The runs are those of ``test_training.py`` (the README's tiny config, shrunk: two micro-batches per step, so the
accumulation boundary matters). The losses alone cannot show that the gradients are normalised right: clipping and
Adam are blind to a constant factor (gradients averaged instead of summed over dp x sp give the same losses to
1e-7). The gradient norm is not, so every step's norm (DeepSpeed's, before clipping) is compared too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distseq.config import RunConfig, load_yaml
from distseq.train.checkpoint import CheckpointManager, param_shards
from distseq.train.deepspeed_engine import DeepSpeedCheckpoints
from distseq.train.trainer import TrainingDiverged, run_training
from tests.distributed.test_training import SMALL, TINY, _assert_close, _losses

pytest.importorskip("deepspeed")

BASE = [
    "parallel.sp=2",  # dp = 2 derived: DeepSpeed's group is the 4 ranks of dp x sp
    "train.steps=8",
    "optim.max_grad_norm=0.5",  # below every step's norm here: clipping acts at every step
]
#: stage 3 gathers and frees every parameter (by default those of at most 100K elements, all of this model's, stay
#: whole after their first gather)
STAGE = {stage: [f"deepspeed.zero_stage={stage}"] for stage in (0, 1, 2)} | {
    3: ["deepspeed.zero_stage=3", "deepspeed.param_persistence_threshold=0"]
}
#: the same fp32 sums in another order (DeepSpeed's buckets and partitions); measured: 1.3e-7
RTOL = 1e-5


def _grad_norms(out: Path) -> list[float]:
    rows = (out / "tiny-hybrid-cpu" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["grad_norm"] for row in rows]


@pytest.fixture(scope="module")
def native(worlds, tmp_path_factory):
    """The same run with the native engine (one flat all-reduce of the summed gradients)."""
    out = tmp_path_factory.mktemp("native")
    return _losses(worlds, 4, out, [*BASE, "parallel.data_parallel=reduce"]), _grad_norms(out), out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 1, 2, 3], ids=lambda s: f"zero{s}")
def test_zero_stages_reproduce_the_native_run(worlds, tmp_path, native, stage):
    want, want_norms, _ = native
    got = _losses(worlds, 4, tmp_path, [*BASE, "parallel.data_parallel=deepspeed", *STAGE[stage]])
    _assert_close(got["losses"], want["losses"], rtol=RTOL)
    _assert_close(_grad_norms(tmp_path), want_norms, rtol=RTOL)
    assert got["losses"][-1] < got["losses"][0], "the loss falls"
    assert got["evals"][-1]["eval_accuracy"] == want["evals"][-1]["eval_accuracy"]
    _assert_close([got["evals"][-1]["eval_loss"]], [want["evals"][-1]["eval_loss"]], rtol=RTOL)


@pytest.mark.timeout(300)
def test_resume_from_a_deepspeed_checkpoint_continues_the_trajectory(worlds, tmp_path):
    ds = [*BASE, "parallel.data_parallel=deepspeed", *STAGE[3], "checkpoint.every=4", "checkpoint.keep=0"]
    whole = _losses(worlds, 4, tmp_path / "whole", ds)
    ckpt = tmp_path / "whole" / "tiny-hybrid-cpu" / "checkpoints" / "step_00000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["step"] == 4
    resumed = _losses(worlds, 4, tmp_path / "resumed", ds, resume=str(ckpt))
    assert resumed["start"] == 4
    assert resumed["losses"] == whole["losses"][4:], "a resume is bit-for-bit the same run"


@pytest.mark.timeout(300)
def test_init_from_a_native_checkpoint(worlds, tmp_path, native):
    """``train.init_from`` loads a DCP checkpoint into the model before ZeRO-3 shards it: with a vanishing learning
    rate, the evaluation equals the native run's last one."""
    want, _, out = native
    ckpt = out / "tiny-hybrid-cpu" / "checkpoints" / "step_00000008"
    frozen = ["train.steps=1", "optim.lr=1e-12", "optim.min_lr=0", f"train.init_from={ckpt}"]
    got = _losses(worlds, 4, tmp_path, [*BASE, "parallel.data_parallel=deepspeed", *STAGE[3], *frozen])
    _assert_close([got["evals"][-1]["eval_loss"]], [want["evals"][-1]["eval_loss"]], rtol=RTOL)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 2], ids=lambda s: f"zero{s}")
def test_divergence_stops_before_the_step(worlds, tmp_path, stage):
    """Stage 0 checks the norm itself; stages 1-3 rely on DeepSpeed skipping a non-finite step."""
    assert worlds(4).run(_divergence_job, str(tmp_path), stage, timeout=200) == ["stopped"] * 4
    kept = sorted((tmp_path / "tiny-hybrid-cpu" / "checkpoints").glob("step_*"))
    assert kept and all((k / "meta.json").exists() for k in kept), "only complete (good) checkpoints exist"


def _divergence_job(out: str, stage: int) -> str:
    overrides = ["parallel.sp=2", "train.steps=6", "parallel.data_parallel=deepspeed", *STAGE[stage]]
    cfg = load_yaml(RunConfig, TINY, [*SMALL, f"output_dir={out}", *overrides])
    cfg.checkpoint.every = 1
    cfg.optim.lr = cfg.optim.min_lr = 1e30  # the weights blow up after the first step
    cfg.optim.max_grad_norm = None
    with pytest.raises(TrainingDiverged, match=r"non-finite training at step \d+.*Last good checkpoint: \S+step_"):
        run_training(cfg)
    return "stopped"


def _meta(path: Path, **meta) -> Path:
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": 4, **meta}))
    return path


def test_a_checkpoint_loads_only_under_the_engine_and_world_size_that_wrote_it(tmp_path):
    """Checked from meta.json before either engine reads a file (no process group needed)."""
    deepspeed_ckpt = _meta(tmp_path / "ds" / "step_00000004", engine="deepspeed", world_size=4, degrees={"dp": 2})
    native_ckpt = _meta(tmp_path / "dcp" / "step_00000004", world_size=4)
    checkpoints = DeepSpeedCheckpoints(tmp_path / "ds", zero=None, world_size=2)
    with pytest.raises(ValueError, match=r"ZeRO shards of 4 ranks .* this run has 2: .* resumes under the world size"):
        checkpoints.load(deepspeed_ckpt)
    with pytest.raises(ValueError, match=r"step_00000004 is not a DeepSpeed checkpoint .* train.init_from"):
        checkpoints.load(native_ckpt)
    with pytest.raises(FileNotFoundError, match=r"is not a complete checkpoint \(no meta.json\)"):
        checkpoints.load(tmp_path / "ds" / "step_00000008")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    native = CheckpointManager(tmp_path / "dcp", model, optimizer, param_shards(model), mesh=None)
    with pytest.raises(ValueError, match=r"holds a deepspeed checkpoint: only --resume of a .*'deepspeed' run"):
        native.load(deepspeed_ckpt, model_only=True)
