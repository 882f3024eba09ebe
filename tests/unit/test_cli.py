"""The distseq command: --help, env, and check both on spawned ranks and under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from distseq.cli import main
from distseq.plan.profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def test_help_lists_subcommands():
    out = _run(sys.executable, "-m", "distseq", "--help")
    assert out.returncode == 0, out.stderr
    assert "env" in out.stdout and "check" in out.stdout


def test_env_reports_versions(capsys):
    assert main(["env"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["gloo"] is True and info["torch"].startswith("2.")
    assert set(info["optional"]) >= {"triton", "flash_attn", "deepspeed", "megatron.core"}


def test_check_on_spawned_ranks_and_its_measured_profile(capsys, tmp_path):
    path = tmp_path / "measured.json"
    config = ROOT / "configs" / "runs" / "tiny-hybrid-cpu.yaml"
    argv = ["check", "--nproc", "2", "--numel", "4096", "--timeout", "120", "--profile", str(path)]
    assert main([*argv, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "2 rank(s): all checks passed" in out and "all_to_all" in out
    assert f"profile -> {path}" in out
    # a profile the planner reads: measured rates, per-collective bandwidths, the tiny config's shapes
    profile = load_profile(str(path))
    assert profile.peak_tflops["fp32"] > 0 and profile.memory_gbps > 0 and profile.attention_row_ns >= 0
    assert set(profile.intra.primitives_gbps) == {"all_gather", "all_to_all", "all_reduce", "send_recv"}
    assert all(v > 0 for v in profile.intra.primitives_gbps.values()) and profile.intra.latency_us > 0
    assert 0 <= profile.overlap <= 1 and profile.efficiency["attention"] > 0 and profile.efficiency["scan"] > 0
    assert profile.ranks_per_device == max(1.0, 2 / len(os.sched_getaffinity(0)))
    assert "hidden 64, 4 heads x 16, 32 tokens per rank" in json.loads(path.read_text())["_about"]
    # every strategy that runs on 2 ranks, on each layout, calibrated (usp needs a degree strictly between 1 and sp)
    softmax = [f"softmax/{s}" for s in ("ring", "ulysses", "allgather_kv", "token_ring")]
    linear = [f"linear/{s}" for s in ("lasp2", "lasp1", "allscan", "ulysses")]
    want = {f"{name}/{layout}" for name in softmax + linear for layout in ("contiguous", "zigzag")}
    assert set(profile.strategy_overhead_us) == want


def test_check_under_torchrun():
    torchrun = Path(sys.executable).with_name("torchrun")
    out = _run(str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "distseq", "check", "--numel", "2048")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rank(s): all checks passed" in out.stdout
