"""Launchers: SLURM hostlist expansion, torchrun arguments from a SLURM environment, the sbatch template and the
shell launchers (checked with bash -n and run with DRY_RUN=1), and a two-node static rendezvous on localhost."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distseq.launch import expand_nodelist, main, render_sbatch, torchrun_args_from_slurm

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "slurm" / "train.sbatch"

SLURM_2x8 = {
    "SLURM_JOB_NODELIST": "gpu[001-002]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "0",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_JOB_ID": "4242",
}


def _expected_2x8(node_rank: int, endpoint: str = "gpu001:29500") -> list[str]:
    return [
        "--nnodes", "2",
        "--nproc-per-node", "8",
        "--node-rank", str(node_rank),
        "--rdzv-backend", "static",
        "--rdzv-endpoint", endpoint,
        "--rdzv-id", "4242",
    ]  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without SLURM, torchrun or launcher variables, plus ``extra``."""
    drop = ("SLURM_", "MASTER_", "NNODES", "NODE_RANK", "NPROC", "RDZV_ID", "DRY_RUN", "RANK", "WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, **extra}


def _run(args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n1", ["n1"]),
        ("n1,n2", ["n1", "n2"]),
        ("node[001-003,007]", ["node001", "node002", "node003", "node007"]),
        ("node[001-003,007],gpu-a[1-2]", ["node001", "node002", "node003", "node007", "gpu-a1", "gpu-a2"]),
        ("node[8-11]", ["node8", "node9", "node10", "node11"]),
        ("node[08-11]", ["node08", "node09", "node10", "node11"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("node[5]", ["node5"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("n[1-2]-ib.cluster,login", ["n1-ib.cluster", "n2-ib.cluster", "login"]),
        (" a[1-2],b,c[3] ", ["a1", "a2", "b", "c3"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist, message",
    [
        ("", "empty"),
        ("node[1-3", "unclosed"),
        ("node1-3]", "without"),
        ("node[[1-2]]", "nested"),
        ("node[]", "empty brackets"),
        ("node[a-b]", "bad range 'a-b'"),
        ("node[1-2-3]", "bad range"),
        ("node[3-1]", "backwards"),
        ("n1,,n2", "empty entry"),
        ("n1,", "empty entry"),
        ("node 1", "bad characters"),
    ],
)
def test_expand_nodelist_rejects_malformed(nodelist, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        expand_nodelist(nodelist)


@pytest.mark.parametrize("node_rank", [0, 1])
def test_torchrun_args_2_nodes_x_8_gpus(node_rank):
    env = {**SLURM_2x8, "SLURM_NODEID": str(node_rank)}
    assert torchrun_args_from_slurm(env) == _expected_2x8(node_rank)
    assert torchrun_args_from_slurm(env, port=12345) == _expected_2x8(node_rank, "gpu001:12345")


@pytest.mark.parametrize(
    "gpu_vars, nproc",
    [
        ({"SLURM_GPUS_PER_NODE": "8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "gpu:a100:4(S:0-1)"}, 4),
        ({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "h100:2"}, 2),
        ({"SLURM_NTASKS_PER_NODE": "4"}, 4),
        ({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}, 8),
    ],
)
def test_ranks_per_node_from_gpu_variables(gpu_vars, nproc):
    env = {k: v for k, v in SLURM_2x8.items() if k != "SLURM_GPUS_ON_NODE"} | gpu_vars
    args = torchrun_args_from_slurm(env)
    assert args[args.index("--nproc-per-node") + 1] == str(nproc)
    assert torchrun_args_from_slurm(env, nproc_per_node=3)[3] == "3"  # the explicit value wins


def test_step_variable_names_are_accepted():
    env = {
        "SLURM_NODELIST": "gpu[001-002]",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_GPUS_PER_NODE": "h100:8",
        "SLURM_JOBID": "4242",
    }
    assert torchrun_args_from_slurm(env) == _expected_2x8(1)


@pytest.mark.parametrize(
    "drop, message",
    [
        ("SLURM_JOB_NODELIST", "SLURM_JOB_NODELIST (or SLURM_NODELIST)"),
        ("SLURM_JOB_NUM_NODES", "SLURM_JOB_NUM_NODES (or SLURM_NNODES)"),
        ("SLURM_NODEID", "SLURM_NODEID"),
        ("SLURM_JOB_ID", "SLURM_JOB_ID"),
        ("SLURM_GPUS_ON_NODE", "pass --nproc-per-node"),
    ],
)
def test_missing_variable_is_named(drop, message):
    env = {k: v for k, v in SLURM_2x8.items() if k != drop}
    with pytest.raises(ValueError, match=re.escape(message)):
        torchrun_args_from_slurm(env)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_JOB_NUM_NODES": "3"}, "node count 3 does not match the node list 'gpu[001-002]' (2 hosts)"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside 0..1"),
        ({"SLURM_NODEID": "one"}, "SLURM_NODEID='one' is not an integer"),
        ({"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100"}, "SLURM_GPUS_PER_NODE='h100'"),
        ({"MASTER_PORT": "70000"}, "port 70000 is outside"),
        ({"MASTER_ADDR": "127.0.0.1"}, "MASTER_ADDR=127.0.0.1 is a loopback address but the job spans 2 nodes"),
    ],
)
def test_inconsistent_environment_is_rejected(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        torchrun_args_from_slurm({**SLURM_2x8, **change})


def test_master_addr_and_port_override_the_node_list():
    env = {**SLURM_2x8, "SLURM_NODEID": "1", "MASTER_ADDR": "gpu001-ib0"}
    assert torchrun_args_from_slurm(env) == _expected_2x8(1, "gpu001-ib0:29500")
    env["MASTER_PORT"] = "31000"
    assert torchrun_args_from_slurm(env, port=12345) == _expected_2x8(1, "gpu001-ib0:31000")


def test_launch_slurm_print_under_fake_env():
    env = _clean_env(**{**SLURM_2x8, "SLURM_NODEID": "1"})
    out = _run([sys.executable, "-m", "distseq.launch", "slurm", "--print", "--", "train", "--config", "c.yaml"], env)
    assert out.returncode == 0, out.stderr
    command = shlex.split(out.stdout)
    assert Path(command[0]).name == "torchrun"
    assert command[1:] == [*_expected_2x8(1), "-m", "distseq", "train", "--config", "c.yaml"]


def test_launch_slurm_reports_missing_variable_and_missing_separator(monkeypatch, capsys):
    for name in [k for k in os.environ if k.startswith(("SLURM_", "MASTER_"))]:
        monkeypatch.delenv(name)
    for name, value in SLURM_2x8.items():
        if name != "SLURM_NODEID":
            monkeypatch.setenv(name, value)
    assert main(["slurm", "--print", "--", "train"]) == 2
    assert "missing SLURM environment variable(s): SLURM_NODEID" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", "--print"])
    assert exit_info.value.code == 2 and "put the distseq arguments after --" in capsys.readouterr().err


def test_render_sbatch_names_missing_and_unknown_placeholders():
    text = "#SBATCH --nodes={{NODES}}\n#SBATCH --time={{TIME}}\n"
    assert render_sbatch(text, nodes=2, TIME="1:00:00") == "#SBATCH --nodes=2\n#SBATCH --time=1:00:00\n"
    with pytest.raises(ValueError, match="no value for placeholder.* TIME"):
        render_sbatch(text, nodes=2)
    with pytest.raises(ValueError, match="unknown placeholder.* PARTITION"):
        render_sbatch(text, nodes=2, time="1:00:00", partition="gpu")
    with pytest.raises(ValueError, match="malformed placeholder left"):
        render_sbatch(text + "{{ nodes }}\n", nodes=2, time="1:00:00")


def test_every_template_placeholder_is_documented_in_its_header():
    text = TEMPLATE.read_text()
    header = text.split("#SBATCH", 1)[0]
    placeholders = set(re.findall(r"\{\{([A-Z_]+)\}\}", text))
    assert placeholders >= {"NODES", "GPUS_PER_NODE", "TIME", "JOB_NAME", "CONFIG"}
    assert placeholders == set(re.findall(r"^#   ([A-Z_]+) ", header, flags=re.MULTILINE))


def _render_2x8(tmp_path: Path, capsys) -> Path:
    config = "configs/runs/my run.yaml"
    argv = ["render-sbatch", "--nodes", "2", "--gpus-per-node", "8", "--config", config, "--time", "12:00:00"]
    assert main([*argv, "--", "lr=3e-4", "tag=a b"]) == 0
    job = tmp_path / "job.sbatch"
    job.write_text(capsys.readouterr().out)
    return job


def test_rendered_sbatch_2_nodes_x_8_gpus(tmp_path, capsys):
    job = _render_2x8(tmp_path, capsys)
    text = job.read_text()
    assert "{{" not in text and "}}" not in text
    for line in ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64", "--time=12:00:00"]:
        assert f"#SBATCH {line}\n" in text
    checked = _run(["bash", "-n", str(job)], _clean_env())
    assert checked.returncode == 0, checked.stderr


def test_rendered_sbatch_runs_one_launcher_per_node(tmp_path, capsys):
    """Run the rendered job with a stand-in srun that prints its arguments: the config path and overrides must
    reach the launcher intact (quoting), with the CPUs of the allocation."""
    job = _render_2x8(tmp_path, capsys)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    (bin_dir / "srun").chmod(0o755)
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_CPUS_PER_TASK="64")
    out = _run(["bash", str(job)], env)
    assert out.returncode == 0, out.stderr
    srun_args = out.stdout.splitlines()
    assert srun_args[:3] == ["--ntasks-per-node=1", "--cpus-per-task=64", "--kill-on-bad-exit=1"]
    launcher = srun_args[3 : srun_args.index("--")]
    assert launcher == [".venv/bin/python", "-m", "distseq.launch", "slurm", "--port", "29500"]
    assert srun_args[srun_args.index("--") + 1 :] == [
        "train",
        "--config",
        "configs/runs/my run.yaml",
        "lr=3e-4",
        "tag=a b",
    ]


@pytest.mark.parametrize("script", sorted((ROOT / "launch").glob("*.sh")), ids=lambda p: p.name)
def test_launch_scripts_parse(script):
    out = _run(["bash", "-n", str(script)], _clean_env())
    assert out.returncode == 0, out.stderr


def test_train_sh_dry_run(tmp_path):
    env = _clean_env(DRY_RUN="1", NPROC="2")
    out = _run(["bash", "launch/train.sh", "configs/runs/x.yaml", "lr=3e-4", "tag=a b"], env)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == [
        ".venv/bin/torchrun", "--standalone", "--nproc-per-node", "2",
        "-m", "distseq", "train", "--config", "configs/runs/x.yaml", "lr=3e-4", "tag=a b",
    ]  # fmt: skip
    # From another directory, a relative config is the caller's, so it becomes absolute.
    out = _run(["bash", str(ROOT / "launch" / "train.sh"), "x.yaml"], env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout)[-1] == str(tmp_path / "x.yaml")
    out = _run(["bash", "launch/train.sh"], env)
    assert out.returncode == 2 and "usage: launch/train.sh CONFIG.yaml" in out.stderr


MULTINODE_ENV = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "gpu001", "NPROC_PER_NODE": "8"}


def test_multinode_sh_dry_run():
    env = _clean_env(DRY_RUN="1", RDZV_ID="4242", **MULTINODE_ENV)
    out = _run(["bash", "launch/multinode.sh", "c.yaml", "lr=3e-4"], env)
    assert out.returncode == 0, out.stderr
    command = shlex.split(out.stdout)
    assert command == [
        ".venv/bin/torchrun",
        *_expected_2x8(1),
        "-m",
        "distseq",
        "train",
        "--config",
        "c.yaml",
        "lr=3e-4",
    ]
    out = _run(["bash", "launch/multinode.sh", "c.yaml"], {**env, "MASTER_PORT": "31000"})
    assert "--rdzv-endpoint gpu001:31000 --rdzv-id 4242" in out.stdout


@pytest.mark.parametrize("drop", ["NNODES", "NODE_RANK", "MASTER_ADDR"])
def test_multinode_sh_names_missing_variable(drop):
    env = _clean_env(DRY_RUN="1", **{k: v for k, v in MULTINODE_ENV.items() if k != drop})
    out = _run(["bash", "launch/multinode.sh", "c.yaml"], env)
    assert out.returncode != 0 and out.stdout == ""
    assert f"launch/multinode.sh: set {drop} " in out.stderr


def test_multinode_sh_rejects_node_rank_out_of_range():
    env = _clean_env(DRY_RUN="1", **{**MULTINODE_ENV, "NODE_RANK": "2"})
    out = _run(["bash", "launch/multinode.sh", "c.yaml"], env)
    assert out.returncode != 0 and "0 <= NODE_RANK < NNODES, got NNODES=2 NODE_RANK=2" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_rendezvous_on_localhost():
    """Two launchers with SLURM node ids 0 and 1 exec torchrun with the derived static rendezvous and run
    `distseq check` as one 2-rank gloo world: the derived arguments work, not only look right."""
    slurm = {"SLURM_JOB_NODELIST": "localhost,localhost", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242"}
    command = [sys.executable, "-m", "distseq.launch", "slurm", "--nproc-per-node", "1", "--port", str(_free_port())]
    command += ["--", "check", "--numel", "1024", "--backend", "gloo"]
    nodes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=_clean_env(**slurm, SLURM_NODEID=str(node)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert "2 rank(s): all checks passed" in outputs[0]
