"""Every feasible parallel layout of a run on a cluster, ranked by predicted step time (``distseq plan``).

Candidates: ``tp`` dividing the GPUs of a node (and the heads), ``sp`` and ``dp`` filling the world, ``ep`` dividing
``dp x sp`` and the experts, each softmax strategy (``usp`` with every Ulysses degree that divides ``sp`` and the
heads), each linear strategy, both token layouts; with activation checkpointing where the layout does not fit
without it (checkpointing only trades compute for memory). A candidate the
trainer would refuse (``plan_report``'s checks: heads, sequence and batch divisibility, strategy limits) is
skipped; one that does not fit the device's memory is kept but ranked after every one that does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from distseq.config.run import RunConfig
from distseq.models.parallelize import check_parallel_dims, check_strategies
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.mesh import ParallelDims
from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES
from distseq.plan.cost import Prediction, predict_step
from distseq.plan.profiles import ClusterProfile
from distseq.train.plan import plan_report

__all__ = ["Candidate", "rank_layouts"]


@dataclass
class Candidate:
    dp: int
    sp: int
    tp: int
    ep: int
    softmax: str
    ulysses_degree: int | None
    linear: str
    layout: str
    checkpointing: bool
    prediction: Prediction
    report: dict[str, Any]

    @property
    def label(self) -> str:
        softmax = f"usp(u={self.ulysses_degree})" if self.softmax == "usp" else self.softmax
        return f"dp={self.dp} sp={self.sp} tp={self.tp} ep={self.ep} {softmax}/{self.linear} {self.layout}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rank_layouts(
    cfg: RunConfig, profile: ClusterProfile, *, nodes: int, gpus_per_node: int, dtype: str = "bf16"
) -> list[Candidate]:
    """Every candidate layout of ``cfg``'s model and data on ``nodes x gpus_per_node`` GPUs, best first."""
    world = nodes * gpus_per_node
    model, data = cfg.model, cfg.data
    moe = "M" in model.mlp_kinds()
    linear_choices = [*LINEAR_STRATEGIES, "ulysses"] if set(model.layer_pattern) & {"L", "M", "G"} else ["lasp2"]
    softmax_choices = SOFTMAX_STRATEGIES if "A" in model.layer_pattern else ["ring"]
    out: list[Candidate] = []
    for tp in _divisors(gpus_per_node):
        for sp in _divisors(world // tp):
            dp = world // (tp * sp)
            dims_base = ParallelDims(dp=dp, sp=sp, tp=tp, ep=1, world_size=world)
            try:
                check_parallel_dims(model, dims_base)
                SequenceLayout("contiguous", data.seq_len, sp, 0)
            except ValueError:
                continue
            if data.global_batch % (dp * data.micro_batch):
                continue
            grad_accum = data.global_batch // (dp * data.micro_batch)
            experts = [e for e in _divisors(dp * sp) if model.num_experts % e == 0] if moe else [1]
            for ep in experts:
                dims = ParallelDims(dp=dp, sp=sp, tp=tp, ep=ep, world_size=world)
                for softmax, linear, kind in itertools.product(
                    softmax_choices, linear_choices, ("zigzag", "contiguous")
                ):
                    heads = model.num_heads // tp
                    degrees = [u for u in _divisors(sp) if heads % u == 0] if softmax == "usp" else [None]
                    for u in degrees:
                        settings = (cfg, profile, dims, grad_accum, softmax, u, linear, kind)
                        candidate = _candidate(*settings, False, gpus_per_node, dtype)
                        if candidate is not None and not candidate.prediction.fits:
                            # checkpointing only trades compute for memory: worth a look where memory binds
                            candidate = _candidate(*settings, True, gpus_per_node, dtype) or candidate
                        if candidate is not None:
                            out.append(candidate)
    # ties (compute-bound layouts) go to the one that moves fewer bytes
    out.sort(
        key=lambda c: (not c.prediction.fits, c.prediction.step_s, c.report["communication"]["total_per_step_sent"])
    )
    return out


def _candidate(cfg, profile, dims, grad_accum, softmax, u, linear, kind, checkpointing, gpus_per_node, dtype):
    model, data = cfg.model, cfg.data
    try:
        check_strategies(model, linear=linear)
        SequenceLayout(kind, data.seq_len, dims.sp, 0)
        report = plan_report(
            model,
            dims,
            seq_len=data.seq_len,
            micro_batch=data.micro_batch,
            grad_accum=grad_accum,
            softmax_strategy=softmax,
            linear_strategy=linear,
            layout=kind,
            dtype_bytes=2 if dtype == "bf16" else 4,
            param_bytes=4,
            data_parallel=cfg.parallel.data_parallel if dims.ep == 1 else "reduce",
            ulysses_degree=u,
            activation_checkpointing=checkpointing,
        )
    except ValueError:
        return None
    prediction = predict_step(
        model,
        report,
        profile,
        gpus_per_node=gpus_per_node,
        seq_len=data.seq_len,
        global_batch=data.global_batch,
        checkpointing=checkpointing,
        dtype=dtype,
    )
    return Candidate(dims.dp, dims.sp, dims.tp, dims.ep, softmax, u, linear, kind, checkpointing, prediction, report)
