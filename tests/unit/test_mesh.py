"""ParallelDims validation and rank arithmetic, without process groups."""

from __future__ import annotations

import pytest

from distseq.parallel.mesh import MeshAxis, ParallelDims


def test_coords_follow_megatron_order_tp_fastest():
    dims = ParallelDims(dp=2, sp=2, tp=2, world_size=8)
    assert [dims.coords(r)[MeshAxis.TP] for r in range(8)] == [0, 1] * 4
    assert [dims.coords(r)[MeshAxis.SP] for r in range(8)] == [0, 0, 1, 1] * 2
    assert [dims.coords(r)[MeshAxis.DP] for r in range(8)] == [0] * 4 + [1] * 4


@pytest.mark.parametrize(
    ("dims", "axis", "groups"),
    [
        (ParallelDims(dp=2, sp=2, tp=1, world_size=4), "sp", [[0, 1], [2, 3]]),
        (ParallelDims(dp=2, sp=2, tp=1, world_size=4), "dp", [[0, 2], [1, 3]]),
        (ParallelDims(sp=2, tp=2, world_size=4), "tp", [[0, 1], [2, 3]]),
        (ParallelDims(sp=2, tp=2, world_size=4), "sp", [[0, 2], [1, 3]]),
        (ParallelDims(dp=2, tp=2, world_size=4), "dp", [[0, 2], [1, 3]]),
        # ep folded over dp x sp: ep groups are consecutive dp*sp indices at a fixed tp coordinate.
        (ParallelDims(sp=2, ep=2, world_size=2), "ep", [[0, 1]]),
        (ParallelDims(dp=2, sp=2, ep=2, world_size=4), "ep", [[0, 1], [2, 3]]),
        (ParallelDims(dp=2, sp=2, ep=2, world_size=4), "edp", [[0, 2], [1, 3]]),
        (ParallelDims(dp=2, sp=2, tp=2, ep=4, world_size=8), "ep", [[0, 2, 4, 6], [1, 3, 5, 7]]),
        (ParallelDims(sp=4, world_size=4), "tp", [[0], [1], [2], [3]]),
        (ParallelDims(dp=2, sp=2, tp=2, world_size=8), "dp_sp", [[0, 2, 4, 6], [1, 3, 5, 7]]),
    ],
)
def test_axis_groups(dims, axis, groups):
    assert dims.axis_groups(axis) == groups


@pytest.mark.parametrize(
    "dp,sp,tp,ep", [(1, 4, 1, 1), (1, 2, 2, 1), (2, 2, 1, 1), (1, 2, 1, 2), (2, 1, 2, 1), (2, 2, 2, 4)]
)
def test_axis_groups_partition_the_world(dp, sp, tp, ep):
    dims = ParallelDims(dp=dp, sp=sp, tp=tp, ep=ep, world_size=dp * sp * tp)
    for axis in MeshAxis:
        groups = dims.axis_groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(dims.world_size))
        assert all(len(g) == dims.degree(axis) for g in groups)


def test_world_size_mismatch_names_every_number():
    with pytest.raises(ValueError, match=r"dp=2 \* sp=2 \* tp=2 = 8, world_size=4"):
        ParallelDims(dp=2, sp=2, tp=2, world_size=4)


def test_ep_must_divide_dp_times_sp():
    with pytest.raises(ValueError, match=r"ep=3, dp=2, sp=2, dp\*sp=4"):
        ParallelDims(dp=2, sp=2, ep=3, world_size=4)


def test_degrees_must_be_positive():
    with pytest.raises(ValueError, match=r"positive integers, got \{'sp': 0\}"):
        ParallelDims(sp=0, world_size=4)


def test_keyword_only_and_world_size_required():
    with pytest.raises(TypeError):
        ParallelDims(2, 2, world_size=4)  # type: ignore[misc]
    with pytest.raises(TypeError):
        ParallelDims(dp=2)  # type: ignore[call-arg]


def test_axis_names_are_strings():
    assert MeshAxis.SP == "sp" and ParallelDims(sp=2, world_size=2).degree("sp") == 2
