"""The ``distseq`` command.

distseq env                                   versions and which optional backends are usable
torchrun --nproc-per-node 4 -m distseq check  verify every collective: values, bytes, bandwidth
distseq check --nproc 4                       the same, spawning gloo ranks on this machine
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

__all__ = ["main"]

_OPTIONAL = ["triton", "flash_attn", "fla", "deepspeed", "megatron.core", "nvtx", "apex", "yaml"]


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _cmd_env(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    info = {
        "distseq": __import__("distseq").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
        "backends": {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available()},
        "optional": {name: _module_available(name) for name in _OPTIONAL},
    }
    print(json.dumps(info, indent=2))
    return 0


def _check_job(numel: int, dtype_name: str) -> list[dict]:
    import torch

    from distseq.parallel.check import check_communicator
    from distseq.parallel.comm import Communicator

    comm = Communicator()
    return [c.as_dict() for c in check_communicator(comm, numel, getattr(torch, dtype_name))]


def _report_checks(per_rank: list[list[dict]]) -> int:
    failed = [(rank, c) for rank, checks in enumerate(per_rank) for c in checks if not c["ok"]]
    world = len(per_rank)
    print(f"{'primitive':<22}{'elements':>10}  {'bytes sent/rank':>16}  {'GB/s (rank 0)':>13}  result")
    for i, c in enumerate(per_rank[0]):
        rate = c["bytes_sent"] / c["seconds"] / 1e9 if c["seconds"] > 0 else 0.0
        ok = all(checks[i]["ok"] for checks in per_rank)
        print(f"{c['primitive']:<22}{c['numel']:>10}  {c['bytes_sent']:>16}  {rate:>13.3f}  {'ok' if ok else 'FAILED'}")
    for rank, c in failed:
        print(
            f"rank {rank}: {c['primitive']} correct={c['correct']} bytes_sent={c['bytes_sent']} "
            f"expected={c['expected_bytes_sent']}",
            file=sys.stderr,
        )
    print(f"{world} rank(s): {'all checks passed' if not failed else f'{len(failed)} check(s) FAILED'}")
    return 1 if failed else 0


def _cmd_check(args: argparse.Namespace) -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        import torch
        import torch.distributed as dist

        backend = (
            "nccl"
            if torch.cuda.is_available() and args.backend == "auto"
            else ("gloo" if args.backend == "auto" else args.backend)
        )
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        try:
            mine = _check_job(args.numel, args.dtype)
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            code = _report_checks(gathered) if dist.get_rank() == 0 else 0
        finally:
            dist.destroy_process_group()
        return code
    from distseq.testing import run_distributed

    return _report_checks(run_distributed(_check_job, args.nproc, args.numel, args.dtype, timeout=args.timeout))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distseq",
        description="Sequence-parallel training of hybrid linear/full-attention MoE language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    env = sub.add_parser("env", help="print versions and which optional backends are available")
    env.set_defaults(fn=_cmd_env)

    check = sub.add_parser(
        "check",
        help="verify every collective (values, exact bytes, bandwidth) under torchrun or on spawned gloo ranks",
    )
    check.add_argument("--nproc", type=int, default=4, help="ranks to spawn when not under torchrun (default 4)")
    check.add_argument("--numel", type=int, default=1 << 20, help="elements per tensor (default 1048576)")
    check.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    check.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    check.add_argument("--timeout", type=float, default=300.0, help="seconds before a hang fails the check")
    check.set_defaults(fn=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.fn(args)
