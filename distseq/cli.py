"""The ``distseq`` command.

distseq env                                   versions and which optional backends are usable
torchrun --nproc-per-node 4 -m distseq check  verify every collective: values, bytes, bandwidth
distseq check --nproc 4                       the same, spawning gloo ranks on this machine
torchrun --nproc-per-node 4 -m distseq train --config configs/runs/tiny-hybrid-cpu.yaml [key=value ...]
                                              a training run ([--resume [DIR]], [--dry-run --world-size N])
distseq plot RUN_DIR [RUN_DIR ...] [--output FILE]
                                              loss, eval accuracy and tokens/s against step (needs matplotlib)
distseq data prepare FILES... --output OUT    text files -> a memory-mapped token file
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["main"]

_OPTIONAL = ["triton", "flash_attn", "fla", "deepspeed", "megatron.core", "nvtx", "apex", "yaml"]


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _auto_attention_backends() -> dict[str, str]:
    """What ``attention_backend="auto"`` runs here, per device and dtype."""
    import torch

    from distseq.kernels.attention.backends import select_attention_backend

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return {
        f"{device} {str(dtype).removeprefix('torch.')}": select_attention_backend(torch.device(device), dtype, 128).name
        for device in devices
        for dtype in dtypes
    }


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
        "attention_backend_auto": _auto_attention_backends(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _check_job(numel: int, dtype_name: str, shapes: dict | None = None) -> tuple[list[dict], dict | None]:
    """Every primitive's check on this rank; with ``shapes``, also the measured profile."""
    import torch
    import torch.distributed as dist

    from distseq.parallel.check import check_communicator
    from distseq.parallel.comm import Communicator

    comm = Communicator()
    # the device the backend moves: NCCL needs CUDA tensors (distseq check set the device for this rank)
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    checks = [c.as_dict() for c in check_communicator(comm, numel, getattr(torch, dtype_name), device=device)]
    profile = None
    if shapes is not None:
        from distseq.plan.measure import ProfileShapes, measure_profile

        compute = torch.bfloat16 if device.type == "cuda" else torch.float32  # what training computes in
        profile = measure_profile(comm, ProfileShapes(**shapes), dtype=compute, device=device)
    return checks, profile


def _profile_shapes(args: argparse.Namespace) -> dict | None:
    """The shapes ``--profile`` measures at: a run config's (``--config``) or the defaults."""
    if args.profile is None:
        return None
    if args.config is None:
        return {}
    from distseq.config import RunConfig, load_yaml

    cfg = load_yaml(RunConfig, args.config)
    sp = cfg.parallel.sp if isinstance(cfg.parallel.sp, int) else 1
    m = cfg.model
    return {
        "hidden": m.hidden_size,
        "heads": m.num_heads,
        "kv_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "tokens": cfg.data.seq_len // sp,
    }


def _write_profile(profile: dict, path: str) -> None:
    Path(path).write_text(json.dumps(profile, indent=1) + "\n")
    device = next(iter(profile["devices"].values()))
    link = next(iter(profile["links"].values()))
    eff = profile["efficiency"]
    print(
        f"profile -> {path}: matmul {device['fp32']:.4g} TFLOP/s, attention x{eff['attention']:.3f}, scan "
        f"x{eff['scan']:.3f}, memory {device['memory_gbps']:.3g} GB/s, {device['call_overhead_us']:.3g} us/call, "
        f"send_recv {link['gbps']:.3g} GB/s, latency {link['latency_us']:.3g} us, overlap {eff['overlap']:.2f}"
    )


def _report_checks(per_rank: list[list[dict]]) -> int:
    failed = [(rank, c) for rank, checks in enumerate(per_rank) for c in checks if not c["ok"]]
    world = len(per_rank)
    print(f"{'primitive':<22}{'elements':>10}  {'bytes sent/rank':>16}  {'busbw GB/s':>11}  result")
    for i, c in enumerate(per_rank[0]):
        ok = all(checks[i]["ok"] for checks in per_rank)
        bus = min(checks[i]["bus_gbps"] for checks in per_rank)  # the slowest rank's view, as nccl-tests reports
        print(f"{c['primitive']:<22}{c['numel']:>10}  {c['bytes_sent']:>16}  {bus:>11.3f}  {'ok' if ok else 'FAILED'}")
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
            mine, profile = _check_job(args.numel, args.dtype, _profile_shapes(args))
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            code = _report_checks(gathered) if dist.get_rank() == 0 else 0
            if profile is not None and dist.get_rank() == 0:
                _write_profile(profile, args.profile)
        finally:
            dist.destroy_process_group()
        return code
    from distseq.testing import run_distributed

    shapes = _profile_shapes(args)
    per_rank = run_distributed(_check_job, args.nproc, args.numel, args.dtype, shapes, timeout=args.timeout)
    code = _report_checks([checks for checks, _ in per_rank])
    if shapes is not None:
        _write_profile(per_rank[0][1], args.profile)
    return code


def _cmd_train(args: argparse.Namespace) -> int:
    from distseq.config import ConfigError, RunConfig, load_yaml

    try:
        cfg = load_yaml(RunConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"distseq train: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")), args.gpus_per_node)
    from distseq.train.trainer import run_training

    resume = True if args.resume == "latest" else (args.resume or False)
    result = run_training(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0 and result.losses:
        done = {"run_dir": result.run_dir, "steps": len(result.losses), "final_loss": result.losses[-1]}
        if result.evals:
            done.update(result.evals[-1])
        if result.last_checkpoint:
            done["checkpoint"] = result.last_checkpoint
        print(json.dumps(done), file=sys.stderr)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy of a trained run's checkpoint at several sequence lengths, a JSON record and a picture."""
    from distseq.config import ConfigError, RunConfig, load_yaml
    from distseq.train.checkpoint import CheckpointDirectory
    from distseq.train.trainer import evaluate_lengths

    run_dir = Path(args.run)
    try:
        cfg = load_yaml(RunConfig, run_dir / "config.yaml", args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"distseq eval: {err} (the run directory holds the config.yaml its run wrote)", file=sys.stderr)
        return 2
    cfg = replace(cfg, output_dir=str(run_dir.parent), name=run_dir.name)  # wherever the run directory is now
    checkpoint = Path(args.checkpoint) if args.checkpoint else CheckpointDirectory(cfg.checkpoint_dir).latest()
    if checkpoint is None:
        print(f"distseq eval: no complete checkpoint in {cfg.checkpoint_dir}", file=sys.stderr)
        return 2
    rows = evaluate_lengths(cfg, checkpoint, args.lengths, samples=args.samples)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    record = {"run": str(run_dir), "checkpoint": str(checkpoint), "trained_seq_len": cfg.data.seq_len, "rows": rows}
    output = Path(cfg.run_dir) / "eval" / "by_length.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'seq_len':>9}{'accuracy':>10}{'loss':>9}")
    for row in rows:
        print(f"{row['seq_len']:>9}{row['eval_accuracy']:>10.3f}{row['eval_loss']:>9.4f}")
    try:
        from distseq.train.plot import plot_eval_lengths

        picture = plot_eval_lengths(
            rows, cfg.data.seq_len, output.with_suffix(".png"), f"{cfg.name}: {checkpoint.name}"
        )
        print(f"wrote {output} and {picture}")
    except ImportError:
        print(f"wrote {output} (no picture: matplotlib is not installed)")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    """Every feasible layout of a run on a cluster, ranked by predicted step time."""
    from distseq.config import ConfigError, RunConfig, load_yaml
    from distseq.plan import load_profile, rank_layouts

    try:
        cfg = load_yaml(RunConfig, args.config, args.overrides)
        profile = load_profile(args.profile)
    except (ConfigError, ValueError) as err:
        print(f"distseq plan: {err}", file=sys.stderr)
        return 2
    ranked = rank_layouts(cfg, profile, nodes=args.nodes, gpus_per_node=args.gpus_per_node)
    if not ranked:
        print(f"distseq plan: no layout of {cfg.name} fits {args.nodes} x {args.gpus_per_node} GPUs", file=sys.stderr)
        return 1
    gib = 2**30
    cluster = f"{args.nodes} x {args.gpus_per_node} {profile.device} ({profile.name})"
    print(
        f"{cfg.name} on {cluster}, N = {cfg.data.seq_len:,}, global batch {cfg.data.global_batch}: {len(ranked)} "
        f"layouts, predicted by distseq's cost model (how far to trust it: docs/planning.md)"
    )
    print(f"{'#':>3}  {'layout':<52}{'ckpt':>5}{'step s':>9}{'compute':>9}{'comm GiB':>10}{'mem GiB':>9}  binding")
    for i, c in enumerate(ranked[: args.top], 1):
        p = c.prediction
        comm = c.report["communication"]["total_per_step_sent"] / gib
        fits = "" if p.fits else " (does not fit)"
        print(
            f"{i:>3}  {c.label:<52}{'yes' if c.checkpointing else 'no':>5}{p.step_s:>9.3f}{p.compute_s:>9.3f}"
            f"{comm:>10.2f}{p.memory_bytes / gib:>9.1f}  {p.binding}{fits}"
        )
    if args.explain:
        best = ranked[0]
        print(f"\nwhy #1 ({best.label}, checkpointing {best.checkpointing}):")
        for kind, seconds in best.prediction.details["compute_by_kind_s"].items():
            print(f"  compute {kind:<10} {seconds:9.4f} s")
        for name, seconds in best.prediction.comm_s.items():
            raw = best.prediction.details["comm_raw_s"].get(name.split(" (")[0].removeprefix("sp "), seconds)
            print(f"  comm {name:<40} {seconds:9.4f} s exposed ({raw:.4f} s in all)")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from distseq.train.plot import MatplotlibMissing, default_output, plot_runs

    output = args.output or default_output(args.run_dirs)
    try:
        written = plot_runs(args.run_dirs, output)
    except MatplotlibMissing as err:
        print(f"distseq plot: {err}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:
        print(f"distseq plot: {err}", file=sys.stderr)
        return 2
    print(written)
    return 0


def _dry_run(cfg, world_size: int, gpus_per_node: int | None = None) -> int:
    """The resolved layout (``auto`` keys chosen by the planner), per-rank memory estimate and communication plan;
    no process group, no model."""
    from distseq.train.plan import format_plan, plan_report
    from distseq.train.validate import launch_plan

    cfg, plan = launch_plan(cfg, world_size, gpus_per_node=gpus_per_node)
    if plan.auto is not None:
        print(plan.auto.describe())
    p = cfg.parallel
    bf16 = cfg.train.dtype == "bfloat16" or (cfg.train.dtype == "auto" and p.backend != "gloo" and _cuda_available())
    report = plan_report(
        cfg.model,
        plan.dims,
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.data.micro_batch,
        grad_accum=cfg.data.global_batch // (plan.dims.dp * cfg.data.micro_batch),
        softmax_strategy=p.softmax_strategy,
        linear_strategy=p.linear_strategy,
        layout=p.layout,
        data_parallel=p.data_parallel,
        zero_stage=cfg.deepspeed.zero_stage if p.data_parallel == "deepspeed" else None,
        ulysses_degree=plan.ulysses_degree,
        dtype_bytes=2 if bf16 else 4,  # activations under bf16 autocast; weights and optimizer stay fp32
        param_bytes=4,
        activation_checkpointing=cfg.train.activation_checkpointing,
    )
    print(format_plan(report))
    if p.softmax_strategy_per_batch:
        print(_per_batch_line(cfg, plan))
    return 0


def _per_batch_line(cfg, plan) -> str:
    """What ``softmax_strategy_per_batch`` predicts for one whole-sequence document and for one document per chunk."""
    from distseq.parallel.layout import SequenceLayout
    from distseq.train.validate import softmax_chooser

    chooser = softmax_chooser(cfg, plan)
    chunk = SequenceLayout(cfg.parallel.layout, cfg.data.seq_len, plan.dims.sp, 0).chunk_size
    cases = {"one document": None, f"documents of {chunk} tokens": list(range(0, cfg.data.seq_len + 1, chunk))}
    parts = []
    for case, cu_seqlens in cases.items():
        costs = ", ".join(f"{name} {s * 1e3:.4g} ms" for name, s in chooser.costs(cu_seqlens).items())
        parts.append(f"{case}: {costs} -> {chooser.choose(cu_seqlens)}")
    return (
        f"softmax per batch: the fastest of {chooser.strategies} for each batch's documents (profile "
        f"{plan.profile.name}; predicted per layer, forward and backward): " + "; ".join(parts)
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
    check.add_argument(
        "--profile",
        metavar="OUT.json",
        default=None,
        help="also measure this machine's compute, memory and link rates into a planner profile (distseq plan "
        "--profile OUT.json)",
    )
    check.add_argument(
        "--config", default=None, help="with --profile: measure at this run config's hidden size, heads and length"
    )
    check.set_defaults(fn=_cmd_check)

    train = sub.add_parser("train", help="train a model from a run config (under torchrun for several ranks)")
    train.add_argument("--config", required=True, help="a YAML run config, e.g. configs/runs/tiny-hybrid-cpu.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the newest checkpoint of the run (or from the checkpoint directory given)",
    )
    train.add_argument(
        "--dry-run", action="store_true", help="print the layout, memory estimate and communication plan; no training"
    )
    train.add_argument("--world-size", type=int, default=None, help="ranks to plan for with --dry-run")
    train.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="ranks per node for --dry-run's parallel auto keys (default: LOCAL_WORLD_SIZE, else one node)",
    )
    train.set_defaults(fn=_cmd_train)

    evaluate = sub.add_parser(
        "eval",
        help="accuracy of a trained run at several sequence lengths (under torchrun for several ranks)",
        description="Evaluate a run's newest checkpoint (or --checkpoint) on its own held-out task at each of "
        "--lengths, in the run's layout: how far beyond its training length a model (its recurrent state) still "
        "recalls. Writes RUN_DIR/eval/by_length.json and by_length.png (rank 0).",
    )
    # positional: under torchrun an option called --run would be taken for torchrun's --run-path
    evaluate.add_argument("run", metavar="RUN_DIR", help="the run directory (holds config.yaml and checkpoints/)")
    evaluate.add_argument("--lengths", type=int, nargs="+", required=True, help="sequence lengths, e.g. 64 1024 8192")
    evaluate.add_argument("--samples", type=int, default=None, help="held-out samples per length (default: the run's)")
    evaluate.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the run's newest)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the run's config")
    evaluate.set_defaults(fn=_cmd_eval)

    plan = sub.add_parser(
        "plan",
        help="rank every feasible parallel layout of a run on a cluster by predicted step time",
        description="Every feasible (dp, sp, tp, ep, softmax strategy, linear strategy, layout, activation "
        "checkpointing) of the run's model and data on NODES x GPUS_PER_NODE GPUs, ranked by a predicted step "
        "time: FLOPs at a fraction of the device's peak, the dry-run plan's exact bytes over the links each "
        "process group crosses, overlap where the strategy overlaps. Uncalibrated: see docs/planning.md.",
    )
    plan.add_argument("--config", required=True, help="a YAML run config")
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, required=True)
    plan.add_argument("--profile", default="h100", help="a cluster profile name (h100, h200, a100, b200, ...) or JSON")
    plan.add_argument("--top", type=int, default=15, help="rows to print")
    plan.add_argument("--explain", action="store_true", help="the top layout's compute and communication terms")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the config")
    plan.set_defaults(fn=_cmd_plan)

    plot = sub.add_parser(
        "plot",
        help="draw training loss, eval accuracy and tokens/s against step from runs' metrics.jsonl (needs matplotlib)",
        description="Draw one or more runs on one figure (one colour per run, labelled with the run directory's "
        "name): training loss, held-out accuracy with its chance level, and tokens/s, each against step.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    plot.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="PNG to write (default: RUN_DIR/metrics.png for one run, ./runs_comparison.png for several)",
    )
    plot.set_defaults(fn=_cmd_plot)

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    prepare = data_sub.add_parser("prepare", help="text files -> a memory-mapped token file")
    # (by path: the package re-exports a function named ``prepare``)
    prepare_module = importlib.import_module("distseq.data.prepare")
    prepare_module.add_arguments(prepare)
    prepare.set_defaults(fn=prepare_module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.fn(args)
