"""The distseq command: --help, env, and check both on spawned ranks and under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from distseq.cli import main

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


def test_check_on_spawned_ranks(capsys):
    assert main(["check", "--nproc", "2", "--numel", "4096", "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "2 rank(s): all checks passed" in out and "all_to_all" in out


def test_check_under_torchrun():
    torchrun = Path(sys.executable).with_name("torchrun")
    out = _run(str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "distseq", "check", "--numel", "2048")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rank(s): all checks passed" in out.stdout
