"""The only place a strategy name becomes a class."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from distseq.parallel.comm import Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.base import SequenceStrategy

__all__ = ["LINEAR_STRATEGIES", "SOFTMAX_STRATEGIES", "STRATEGIES", "make_strategy", "strategy_class"]

# name -> "module:Class"; modules are imported on first use.
STRATEGIES: dict[str, str] = {
    "ring": "distseq.parallel.sequence.ring:RingAttention",
    "ulysses": "distseq.parallel.sequence.ulysses:UlyssesAttention",
    "allgather_kv": "distseq.parallel.sequence.allgather_kv:AllGatherKVAttention",
    "token_ring": "distseq.parallel.sequence.token_ring:TokenRingAttention",
    "usp": "distseq.parallel.sequence.usp:USPAttention",
    "lasp2": "distseq.parallel.sequence.lasp2:LASP2",
    "lasp1": "distseq.parallel.sequence.lasp1:LASP1",
    "allscan": "distseq.parallel.sequence.allscan:AllScan",
}
SOFTMAX_STRATEGIES = ["ring", "ulysses", "allgather_kv", "token_ring", "usp"]
LINEAR_STRATEGIES = ["lasp2", "lasp1", "allscan"]


def make_strategy(name: str, comm: Communicator, layout: SequenceLayout, **options: Any) -> SequenceStrategy:
    """Build the strategy ``name`` over the SP communicator ``comm`` for the model's ``layout``.

    ``options`` are the strategy's own settings (e.g. ``ulysses_degree`` for ``"usp"``).
    """
    strategy_cls = strategy_class(name)
    accepted = [
        p.name for p in inspect.signature(strategy_cls.__init__).parameters.values() if p.kind is p.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for strategy {name!r}; it accepts {accepted}")
    return strategy_cls(comm, layout, **options)


def strategy_class(name: str) -> type[SequenceStrategy]:
    """The class of the strategy ``name`` (to ask what it implements before building one)."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown sequence-parallel strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)
