"""Launch helpers for SLURM and multi-node torchrun (standard library only; no torch import).

python -m distseq.launch slurm [--port P] [--nproc-per-node G] [--print] -- train --config c.yaml [k=v ...]
    run under ``srun`` with one task per node: derive the torchrun arguments from the SLURM environment and
    exec ``torchrun <derived> -m distseq <args>`` (``--print`` prints the command instead)
python -m distseq.launch render-sbatch --nodes 2 --gpus-per-node 8 --config c.yaml [-- k=v ...] > job.sbatch
    render ``slurm/train.sbatch`` with those values

The derived arguments use torchrun's *static* rendezvous: ``--nnodes N --nproc-per-node G --node-rank R
--rdzv-backend static --rdzv-endpoint HOST:PORT --rdzv-id JOB``. Node R of the rendezvous is SLURM node R (global
ranks ``R*G .. R*G+G-1``), node 0 hosts the store at HOST:PORT, the first host of the node list, and the workers
see the job id as ``TORCHELASTIC_RUN_ID``. The dynamic ``c10d`` backend would ignore ``--node-rank`` (and warn),
order nodes by arrival and pick the store host by matching host names; under SLURM every node already knows its
rank, so static is the deterministic choice. ``MASTER_ADDR`` / ``MASTER_PORT``, when set, replace HOST / PORT.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["expand_nodelist", "main", "render_sbatch", "torchrun_args_from_slurm"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SBATCH_TEMPLATE = REPO_ROOT / "slurm" / "train.sbatch"

_PLACEHOLDER = re.compile(r"\{\{([A-Z][A-Z0-9_]*)\}\}")
_HOST_PART = re.compile(r"[A-Za-z0-9._-]+")
# SLURM_GPUS_PER_NODE: "8", "h100:8", "gpu:h100:8", possibly with a socket suffix "h100:8(S:0-1)".
_GPU_COUNT = re.compile(r"(?:[A-Za-z0-9_.-]+:)*(\d+)(?:\([^)]*\))?")


def _split_top_level(text: str, where: str) -> list[str]:
    """Split on commas outside brackets; ``where`` names the whole input for error messages."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"malformed node list {where!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"malformed node list {where!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"malformed node list {where!r}: unclosed '['")
    items.append(text[start:])
    return items


def _expand_range_list(body: str, where: str) -> list[str]:
    """``001-003,007`` -> ``['001', '002', '003', '007']``; the low bound's width sets the zero padding."""
    out = []
    for part in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"malformed node list {where!r}: bad range {part!r} in [{body}]")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"malformed node list {where!r}: range {part!r} runs backwards")
        width = len(low) if low.startswith("0") else 0
        out += [str(n).zfill(width) for n in range(int(low), int(high) + 1)]
    return out


def _expand_host_pattern(pattern: str, where: str) -> list[str]:
    """One comma-free pattern such as ``rack[1-2]-n[01-03]`` -> the product, first bracket outermost."""
    if "[]" in pattern:
        raise ValueError(f"malformed node list {where!r}: empty brackets in {pattern!r}")
    hosts = [""]
    for literal, body in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", pattern):
        if literal and not _HOST_PART.fullmatch(literal):
            raise ValueError(f"malformed node list {where!r}: bad characters in {literal!r}")
        values = _expand_range_list(body, where) if body else [""]
        hosts = [h + literal + v for h in hosts for v in values]
    return hosts


def expand_nodelist(s: str) -> list[str]:
    """Expand SLURM hostlist syntax: ``node[001-003,007],gpu-a[1-2]`` -> ``node001 node002 node003 node007
    gpu-a1 gpu-a2``, in order, duplicates kept. Zero padding follows the low bound (``[08-10]`` -> 08 09 10)."""
    text = s.strip()
    if not text:
        raise ValueError("malformed node list '': it is empty")
    hosts = []
    for item in _split_top_level(text, s):
        if not item:
            raise ValueError(f"malformed node list {s!r}: empty entry between commas")
        hosts += _expand_host_pattern(item, s)
    return hosts


def _first_set(env: Mapping[str, str], *names: str) -> str | None:
    return next((env[n] for n in names if env.get(n, "").strip()), None)


def _int_from(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _gpus_per_node(env: Mapping[str, str]) -> int | None:
    if env.get("SLURM_GPUS_ON_NODE", "").strip():
        gpus = _int_from("SLURM_GPUS_ON_NODE", env["SLURM_GPUS_ON_NODE"])
        if gpus > 0:
            return gpus
    if env.get("SLURM_GPUS_PER_NODE", "").strip():
        value = env["SLURM_GPUS_PER_NODE"].strip()
        match = _GPU_COUNT.fullmatch(value)
        if match is None:
            raise ValueError(f"SLURM_GPUS_PER_NODE={value!r}: expected a count like '8' or 'h100:8'")
        if int(match.group(1)) > 0:
            return int(match.group(1))
    if env.get("SLURM_NTASKS_PER_NODE", "").strip():
        return _int_from("SLURM_NTASKS_PER_NODE", env["SLURM_NTASKS_PER_NODE"])
    return None


def _is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")


def torchrun_args_from_slurm(
    env: Mapping[str, str], *, nproc_per_node: int | None = None, port: int = 29500
) -> list[str]:
    """torchrun arguments for this node of a SLURM job, from its environment (one launcher task per node).

    Reads SLURM_JOB_NODELIST (or SLURM_NODELIST), SLURM_JOB_NUM_NODES (or SLURM_NNODES), SLURM_NODEID,
    SLURM_JOB_ID and, unless ``nproc_per_node`` is given, SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE
    (``8`` or ``h100:8``), else SLURM_NTASKS_PER_NODE. MASTER_ADDR / MASTER_PORT override the first host of the
    node list and ``port``. Returns ``--nnodes N --nproc-per-node G --node-rank R --rdzv-backend static
    --rdzv-endpoint HOST:PORT --rdzv-id JOB`` (see the module docstring for why static).
    """
    nodelist = _first_set(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    nnodes_text = _first_set(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    node_id_text = _first_set(env, "SLURM_NODEID")
    job_id = _first_set(env, "SLURM_JOB_ID", "SLURM_JOBID")
    missing = [
        name
        for name, value in [
            ("SLURM_JOB_NODELIST (or SLURM_NODELIST)", nodelist),
            ("SLURM_JOB_NUM_NODES (or SLURM_NNODES)", nnodes_text),
            ("SLURM_NODEID", node_id_text),
            ("SLURM_JOB_ID", job_id),
        ]
        if value is None
    ]
    if missing:
        raise ValueError(
            f"missing SLURM environment variable(s): {', '.join(missing)}; run this under srun inside an allocation"
        )
    hosts = expand_nodelist(nodelist)
    nnodes = _int_from("SLURM_JOB_NUM_NODES/SLURM_NNODES", nnodes_text)
    node_rank = _int_from("SLURM_NODEID", node_id_text)
    if nnodes != len(hosts):
        raise ValueError(f"node count {nnodes} does not match the node list {nodelist!r} ({len(hosts)} hosts)")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"SLURM_NODEID={node_rank} is outside 0..{nnodes - 1}")
    nproc = nproc_per_node if nproc_per_node is not None else _gpus_per_node(env)
    if nproc is None:
        raise ValueError(
            "cannot tell the ranks per node: none of SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, "
            "SLURM_NTASKS_PER_NODE is set; pass --nproc-per-node"
        )
    if nproc < 1:
        raise ValueError(f"ranks per node must be at least 1, got {nproc}")
    master_addr = env.get("MASTER_ADDR", "").strip() or hosts[0]
    if nnodes > 1 and master_addr != hosts[0] and _is_loopback(master_addr):
        # sbatch exports the submitting shell's environment, so a MASTER_ADDR left over from a local run lands here.
        raise ValueError(f"MASTER_ADDR={master_addr} is a loopback address but the job spans {nnodes} nodes; unset it")
    master_port = _int_from("MASTER_PORT", env["MASTER_PORT"]) if env.get("MASTER_PORT", "").strip() else port
    if not 0 < master_port < 65536:
        raise ValueError(f"rendezvous port {master_port} is outside 1..65535")
    return [
        "--nnodes", str(nnodes),
        "--nproc-per-node", str(nproc),
        "--node-rank", str(node_rank),
        "--rdzv-backend", "static",
        "--rdzv-endpoint", f"{master_addr}:{master_port}",
        "--rdzv-id", job_id,
    ]  # fmt: skip


def render_sbatch(template_text: str, **values: object) -> str:
    """Replace every ``{{NAME}}`` in ``template_text`` by ``str(values[NAME])`` (keys are case-insensitive:
    ``nodes=2`` fills ``{{NODES}}``). A placeholder without a value, or a value without a placeholder, is an
    error that names it. Values are inserted as given: quote them for the shell where the template needs it."""
    upper: dict[str, object] = {}
    for key, value in values.items():
        if key.upper() in upper:
            raise ValueError(f"placeholder {key.upper()} given twice")
        upper[key.upper()] = value
    wanted = set(_PLACEHOLDER.findall(template_text))
    missing = sorted(wanted - set(upper))
    unknown = sorted(set(upper) - wanted)
    if missing:
        raise ValueError(f"no value for placeholder(s) {', '.join(missing)}")
    if unknown:
        raise ValueError(f"unknown placeholder(s) {', '.join(unknown)}; the template has {', '.join(sorted(wanted))}")
    rendered = _PLACEHOLDER.sub(lambda m: str(upper[m.group(1)]), template_text)
    if "{{" in rendered or "}}" in rendered:
        line = next(line for line in rendered.splitlines() if "{{" in line or "}}" in line)
        raise ValueError(f"malformed placeholder left after rendering: {line.strip()!r}")
    return rendered


def _torchrun_command() -> list[str]:
    """The torchrun of this interpreter's environment (a venv's bin/torchrun), else ``python -m torch...run``."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distseq.launch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    slurm = sub.add_parser("slurm", help="exec torchrun for this node of a SLURM job (args for distseq after --)")
    slurm.add_argument("--port", type=_positive_int, default=29500, help="rendezvous port (MASTER_PORT overrides)")
    slurm.add_argument("--nproc-per-node", type=_positive_int, default=None, help="default: GPUs SLURM gave")
    slurm.add_argument("--print", action="store_true", help="print the command instead of running it")
    render = sub.add_parser("render-sbatch", help="render slurm/train.sbatch to stdout (train overrides after --)")
    render.add_argument("--nodes", type=_positive_int, required=True)
    render.add_argument("--gpus-per-node", type=_positive_int, required=True)
    render.add_argument("--config", required=True, help="run config, relative to the repository root or absolute")
    render.add_argument("--time", default="04:00:00", help="wall-clock limit (default 04:00:00)")
    render.add_argument("--job-name", default="distseq")
    render.add_argument("--cpus-per-task", type=_positive_int, default=None, help="default: 8 per GPU")
    render.add_argument("--output", default="%x-%j.out", help="log file pattern (default %%x-%%j.out)")
    render.add_argument("--port", type=_positive_int, default=29500)
    render.add_argument("--repo", default=str(REPO_ROOT), help="checkout the job runs in (default: this one)")
    render.add_argument("--template", default=str(SBATCH_TEMPLATE))
    return parser


def _render_from_args(args: argparse.Namespace, overrides: list[str]) -> str:
    for name in ("job_name", "time", "output"):
        value = getattr(args, name)
        if not value or re.search(r"[\s'\"\\$`]", value):
            raise ValueError(f"--{name.replace('_', '-')}={value!r}: must be non-empty, without spaces or quotes")
    return render_sbatch(
        Path(args.template).read_text(),
        job_name=args.job_name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task or 8 * args.gpus_per_node,
        time=args.time,
        output=args.output,
        repo=shlex.quote(args.repo),
        config=shlex.quote(args.config),
        overrides=shlex.join(overrides),
        port=args.port,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passed = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = _parser()
    args = parser.parse_args(own)
    try:
        if args.command == "render-sbatch":
            sys.stdout.write(_render_from_args(args, passed))
            return 0
        if not passed:
            parser.error("slurm: put the distseq arguments after --, e.g. -- train --config configs/runs/x.yaml")
        derived = torchrun_args_from_slurm(os.environ, nproc_per_node=args.nproc_per_node, port=args.port)
    except ValueError as err:
        print(f"distseq.launch: {err}", file=sys.stderr)
        return 2
    command = [*_torchrun_command(), *derived, "-m", "distseq", *passed]
    if args.print:
        print(shlex.join(command))
        return 0
    sys.stdout.flush()
    os.execv(command[0], command)
    return 1  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
