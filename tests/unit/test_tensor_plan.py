"""The tensor-parallel plan's checks (no process group: only the rank arithmetic is exercised)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distseq.parallel.comm import Communicator
from distseq.parallel.tensor import parallelize_module, vocab_parallel_cross_entropy


def _mlp():
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 6))


def test_plan_errors_name_the_problem_and_leave_the_module_untouched():
    model = _mlp()
    three = SimpleNamespace(size=3, rank=1)
    with pytest.raises(ValueError, match=r"unknown tensor-parallel style\(s\) \{'0': 'diagonal'\}"):
        parallelize_module(model, three, {"0": "diagonal"})
    with pytest.raises(ValueError, match=r"plan key 'mlp\.\*' matches no submodule"):
        parallelize_module(model, three, {"mlp.*": "colwise"})
    with pytest.raises(ValueError, match=r"needs 0\.in_features divisible by tp: 0\.in_features=6, tp=4"):
        parallelize_module(model, SimpleNamespace(size=4, rank=0), {"0": "rowwise", "2": "rowwise"})
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)


def test_single_rank_plan_is_the_identity_and_ce_matches_torch():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(5, 6)
    ref = model(x)
    parallelize_module(model, Communicator.solo(), {"0": "colwise", "2": "rowwise"})
    torch.testing.assert_close(model(x), ref)
    logits = torch.randn(7, 11, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 10, 5, -100, 2])
    loss = vocab_parallel_cross_entropy(logits, labels, Communicator.solo(), 0)
    ref_loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss, ref_loss)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    (ref_g,) = torch.autograd.grad(ref_loss.sum(), logits)
    torch.testing.assert_close(g, ref_g)
