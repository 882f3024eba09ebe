"""``parallel.*: auto`` resolved at launch: fixed keys respected, the planner's best agreeing layout taken, the same
answer every time, the trainer's own checks applied, a resume keeping its layout, and errors that name the values
before any process group exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from distseq.cli import main
from distseq.config import ConfigError, RunConfig, load_yaml
from distseq.plan.auto import CPU_PROFILE, profile_for_device, run_profile, saved_choice
from distseq.plan.profiles import load_profile
from distseq.plan.search import rank_layouts
from distseq.train.validate import launch_plan, validate

TINY = Path(__file__).resolve().parents[2] / "configs" / "runs" / "tiny-hybrid-cpu.yaml"
SMALL = ["data.global_batch=8", "data.micro_batch=1", "data.eval_samples=8", "parallel.profile=h100"]
AUTO = [f"parallel.{key}=auto" for key in ("dp", "sp", "softmax_strategy", "linear_strategy", "layout")]


def _cfg(*overrides: str) -> RunConfig:
    return load_yaml(RunConfig, TINY, [*SMALL, *overrides])


def test_the_best_layout_that_agrees_with_the_fixed_keys_is_taken():
    cfg = _cfg(*AUTO, "parallel.linear_strategy=allscan", "parallel.tp=1")
    cfg, plan = launch_plan(cfg, 8, gpus_per_node=4)
    assert not cfg.parallel.auto_keys() and plan.auto is not None
    p = cfg.parallel
    assert p.linear_strategy == "allscan" and p.tp == 1 and p.dp * p.sp == 8
    # The planner's own ranking, filtered by hand: the first candidate with the fixed values.
    ranked = rank_layouts(_cfg(*AUTO), load_profile("h100"), nodes=2, gpus_per_node=4, dtype="fp32")
    best = next(c for c in ranked if c.linear == "allscan" and c.tp == 1)
    assert plan.auto.candidate.label == best.label
    assert (p.dp, p.sp, p.ep, p.softmax_strategy, p.layout) == (best.dp, best.sp, best.ep, best.softmax, best.layout)
    assert plan.auto.choice() == {
        "dp": best.dp,
        "sp": best.sp,
        "softmax_strategy": best.softmax,
        "layout": best.layout,
    }
    assert (plan.auto.nodes, plan.auto.gpus_per_node) == (2, 4)
    assert plan.dims.dp == p.dp and plan.dims.sp == p.sp
    assert "predicted step" in plan.auto.describe() and plan.auto.event()["predicted_step_s"] > 0


def test_the_choice_is_the_same_every_time():
    choices = {repr(launch_plan(_cfg(*AUTO, "parallel.ep=auto"), 4)[0].parallel) for _ in range(3)}
    assert len(choices) == 1


def test_a_layout_the_trainer_refuses_is_skipped():
    """The planner does not check data.eval_samples against dp; the trainer does, and auto skips what it refuses."""
    cfg = _cfg(*AUTO, "parallel.tp=1", "parallel.ep=1", "data.eval_samples=2")
    ranked = rank_layouts(cfg, load_profile("h100"), nodes=1, gpus_per_node=4, dtype="fp32")
    agreeing = [c for c in ranked if c.tp == 1 and c.ep == 1]
    resolved, plan = launch_plan(cfg, 4)
    assert plan.auto.candidate.label == next(c for c in agreeing if c.dp <= 2).label
    assert resolved.parallel.dp <= 2 and plan.auto.agreeing == len(agreeing)


def test_usp_degree_and_the_per_batch_list_are_respected():
    per_batch = _cfg(
        "parallel.sp=4", "parallel.softmax_strategy=auto", "parallel.softmax_strategy_per_batch=[usp,ulysses]"
    )
    with pytest.warns(UserWarning, match="every batch gets the same choice"):  # no packed documents
        cfg, _ = launch_plan(per_batch, 4)
    assert cfg.parallel.softmax_strategy in ("usp", "ulysses")
    cfg, _ = launch_plan(
        _cfg("parallel.sp=4", "parallel.softmax_strategy=usp", "parallel.ulysses_degree=2", *AUTO[4:]), 4
    )
    assert (cfg.parallel.softmax_strategy, cfg.parallel.ulysses_degree) == ("usp", 2)


def test_errors_name_the_values_before_any_process_group():
    assert not dist.is_initialized()
    with pytest.raises(
        ValueError, match=r"none of the \d+ layouts .* agrees with the fixed keys \{'sp': 3, 'tp': 1, 'ep': 1, 'linear"
    ):
        launch_plan(_cfg("parallel.sp=3", "parallel.softmax_strategy=auto"), 4)
    with pytest.raises(ValueError, match=r"parallel.profile='nope': unknown profile 'nope'"):
        launch_plan(_cfg("parallel.sp=auto", "parallel.profile=nope"), 4)
    with pytest.raises(ValueError, match=r"world of 6 ranks is not whole nodes of 4"):
        launch_plan(_cfg("parallel.sp=auto"), 6, gpus_per_node=4)
    with pytest.raises(ValueError, match=r"parallel keys \['sp'\] are 'auto': resolve them first"):
        validate(_cfg("parallel.sp=auto"), 4)
    with pytest.raises(ConfigError, match=r"parallel.sp: 'fast' fits none of"):
        _cfg("parallel.sp=fast")
    assert not dist.is_initialized()


def test_the_profile_follows_the_device():
    assert profile_for_device(None) == str(CPU_PROFILE)
    assert profile_for_device("NVIDIA H100 80GB HBM3") == "h100"
    assert profile_for_device("NVIDIA H100 PCIe") == "h100-pcie"
    assert profile_for_device("NVIDIA A100-SXM4-80GB") == "a100"
    assert profile_for_device("NVIDIA A100-PCIE-40GB") == "a100-pcie"
    assert profile_for_device("NVIDIA H200") == "h200"
    assert profile_for_device("NVIDIA H800") == "h800"
    assert profile_for_device("NVIDIA B200") == "b200"
    with pytest.raises(ValueError, match=r"no profile for the CUDA device 'NVIDIA GeForce RTX 4090': set parallel"):
        profile_for_device("NVIDIA GeForce RTX 4090")
    assert run_profile("auto", None).name == load_profile(str(CPU_PROFILE)).name
    assert run_profile("b200", "NVIDIA H100 PCIe").name == "b200"  # an explicit profile wins


def test_a_profile_without_a_use_warns():
    with pytest.warns(UserWarning, match=r"parallel.profile='h100' has no effect"):
        launch_plan(_cfg("parallel.sp=2"), 4)


def test_a_resume_keeps_the_saved_layout():
    cfg = _cfg(*AUTO)
    saved = {"dp": 2, "sp": 2, "tp": 1, "ep": 1, "softmax_strategy": "usp", "ulysses_degree": 2}
    saved |= {"linear_strategy": "lasp1", "layout": "contiguous"}
    kept = saved_choice(cfg, saved)
    assert {k: getattr(kept.parallel, k) for k in saved} == saved
    assert saved_choice(_cfg(*AUTO, "parallel.tp=2"), saved) is None, "a fixed key that disagrees"
    assert saved_choice(cfg, {**saved, "sp": "auto"}) is None


def test_dry_run_prints_the_choice(capsys):
    assert (
        main(["train", "--config", str(TINY), "--dry-run", "--world-size", "8", "--gpus-per-node", "4", *SMALL, *AUTO])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("parallel auto ['dp', 'sp', 'softmax_strategy', 'linear_strategy', 'layout']: dp=")
    assert "predicted step" in out and "on profile h100 for 2 x 4 ranks" in out and "world_size=8" in out
