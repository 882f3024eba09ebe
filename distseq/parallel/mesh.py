"""ParallelDims: the validated degrees of data, sequence, tensor and expert parallelism.

Rank order (fastest-varying last): ``dp``, ``sp``, ``tp``, as in Megatron-Core (tensor parallel ranks
are neighbours, so they share a node). Expert parallelism is folded over the ``dp x sp`` ranks: the
``dp*sp`` ranks that share a ``tp`` coordinate are cut into groups of ``ep`` consecutive ranks, and the
remaining factor is the expert-data-parallel axis ``edp``.

The rank arithmetic (:meth:`ParallelDims.coords`, :meth:`ParallelDims.axis_groups`) is pure; only
:meth:`ParallelDims.build_mesh` and :meth:`ParallelDims.communicators` create process groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

import torch.distributed as dist

from distseq.parallel.comm import Communicator

__all__ = ["MeshAxis", "ParallelDims"]


class MeshAxis(StrEnum):
    DP = "dp"
    SP = "sp"
    TP = "tp"
    EP = "ep"
    EDP = "edp"  # expert data parallel: the dp x sp ranks holding the same experts
    DP_SP = "dp_sp"  # every rank holding different tokens of the batch (gradient reduction of replicated weights)


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Degrees of each parallel axis; their product ``dp * sp * tp`` must equal ``world_size``.

    Attributes:
        dp: data-parallel degree (replicas of the model, each on different sequences).
        sp: sequence-parallel degree (ranks sharing one sequence).
        tp: tensor-parallel degree (ranks sharing each weight matrix).
        ep: expert-parallel degree, folded over ``dp x sp``; must divide ``dp * sp``.
        world_size: total number of ranks.
    """

    dp: int = 1
    sp: int = 1
    tp: int = 1
    ep: int = 1
    world_size: int

    def __post_init__(self) -> None:
        degrees = {"dp": self.dp, "sp": self.sp, "tp": self.tp, "ep": self.ep, "world_size": self.world_size}
        bad = {k: v for k, v in degrees.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"parallel degrees must be positive integers, got {bad} (all: {degrees})")
        if self.dp * self.sp * self.tp != self.world_size:
            raise ValueError(
                f"dp * sp * tp must equal world_size: dp={self.dp} * sp={self.sp} * tp={self.tp} = "
                f"{self.dp * self.sp * self.tp}, world_size={self.world_size}"
            )
        if (self.dp * self.sp) % self.ep:
            raise ValueError(
                f"ep must divide dp * sp (experts are folded over the data and sequence ranks): "
                f"ep={self.ep}, dp={self.dp}, sp={self.sp}, dp*sp={self.dp * self.sp}"
            )

    @property
    def edp(self) -> int:
        return self.dp * self.sp // self.ep

    @property
    def dp_sp(self) -> int:
        return self.dp * self.sp

    def degree(self, axis: MeshAxis | str) -> int:
        return getattr(self, MeshAxis(axis).value)

    def coords(self, rank: int) -> dict[MeshAxis, int]:
        """Coordinate of ``rank`` along every axis."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        tp = rank % self.tp
        dp_sp = rank // self.tp
        return {
            MeshAxis.DP: dp_sp // self.sp,
            MeshAxis.SP: dp_sp % self.sp,
            MeshAxis.TP: tp,
            MeshAxis.EP: dp_sp % self.ep,
            MeshAxis.EDP: dp_sp // self.ep,
            MeshAxis.DP_SP: dp_sp,
        }

    def axis_groups(self, axis: MeshAxis | str) -> list[list[int]]:
        """Every group of global ranks along ``axis`` (ranks that differ only in that coordinate)."""
        return [list(group) for group in _axis_groups(self, MeshAxis(axis))]

    def _axis_groups(self, axis: MeshAxis) -> tuple[tuple[int, ...], ...]:
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            # The other coordinates that fix a group: for the expert axes, (the other expert axis, tp).
            if axis is MeshAxis.DP_SP:
                key = (c[MeshAxis.TP],)
            elif axis in (MeshAxis.EP, MeshAxis.EDP):
                other = MeshAxis.EDP if axis is MeshAxis.EP else MeshAxis.EP
                key = (c[other], c[MeshAxis.TP])
            else:
                key = tuple(c[a] for a in (MeshAxis.DP, MeshAxis.SP, MeshAxis.TP) if a is not axis)
            groups.setdefault(key, []).append(rank)
        return tuple(tuple(group) for group in groups.values())

    def build_mesh(self, device_type: str = "cpu"):
        """A DeviceMesh with axes ``(dp, sp, tp)`` over the initialised world."""
        from torch.distributed.device_mesh import init_device_mesh

        self._check_world()
        return init_device_mesh(
            device_type, (self.dp, self.sp, self.tp), mesh_dim_names=(MeshAxis.DP, MeshAxis.SP, MeshAxis.TP)
        )

    def communicators(self, mesh=None) -> dict[MeshAxis, Communicator]:
        """One Communicator per axis (dp, sp, tp, ep, edp, dp_sp) for this rank.

        ``dp``, ``sp`` and ``tp`` reuse the process groups of ``mesh`` (from :meth:`build_mesh`; built
        here when omitted); ``ep``, ``edp`` and ``dp_sp`` get groups of their own. Collective: every rank must call
        it, in the same order relative to other group creation.
        """
        self._check_world()
        mesh = mesh if mesh is not None else self.build_mesh()
        comms = {
            axis: Communicator(mesh.get_group(axis.value), name=axis.value)
            for axis in (MeshAxis.DP, MeshAxis.SP, MeshAxis.TP)
        }
        rank = dist.get_rank()
        for axis in (MeshAxis.EP, MeshAxis.EDP, MeshAxis.DP_SP):
            for members in self.axis_groups(axis):
                # new_group is collective over the world: every rank creates every group, in order.
                pg = dist.new_group(members)
                if rank in members:
                    comms[axis] = Communicator(pg, name=axis.value)
        return comms

    def _check_world(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; call init_process_group first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims(world_size={self.world_size}) does not match the initialised world of "
                f"{dist.get_world_size()} ranks (dp={self.dp}, sp={self.sp}, tp={self.tp}, ep={self.ep})"
            )

    def describe(self) -> str:
        return ", ".join(f"{a.value}={self.degree(a)}" for a in MeshAxis) + f" (world_size={self.world_size})"


@functools.lru_cache(maxsize=4096)
def _axis_groups(dims: ParallelDims, axis: MeshAxis) -> tuple[tuple[int, ...], ...]:
    """:meth:`ParallelDims.axis_groups`, computed once per (degrees, axis): the planner asks for thousands."""
    return dims._axis_groups(axis)
