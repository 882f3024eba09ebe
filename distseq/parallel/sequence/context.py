"""SequenceParallel: what a model needs to run one batch sharded over the SP group.

One layout for the whole model, one strategy per layer type (softmax, linear), built once (some strategies
create process groups) and reused for every batch; the batch's packed documents travel with the context. Extra
softmax strategies may be built beside the first (``softmax_choices``) for a per-batch choice: the layout does not
change, and :meth:`SequenceParallel.with_softmax` hands the softmax layers another one for a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from distseq.parallel.comm import CommStats, Communicator
from distseq.parallel.layout import SequenceLayout
from distseq.parallel.sequence.base import SequenceStrategy
from distseq.parallel.sequence.conv import causal_conv
from distseq.parallel.sequence.registry import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES, make_strategy

__all__ = ["SequenceParallel"]


@dataclass(frozen=True)
class SequenceParallel:
    layout: SequenceLayout
    softmax: SequenceStrategy
    linear: SequenceStrategy
    cu_seqlens: torch.Tensor | None = None  # global document offsets of the current batch
    #: token-level exchanges between neighbouring chunks (the short convolutions' halos); None: sp = 1 only
    comm: Communicator | None = None
    #: every softmax strategy built for this context by name (``softmax`` among them), for :meth:`with_softmax`
    softmax_choices: Mapping[str, SequenceStrategy] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        comm: Communicator,
        layout: SequenceLayout,
        *,
        softmax: str = "ring",
        linear: str = "lasp2",
        softmax_options: dict[str, Any] | None = None,
        linear_options: dict[str, Any] | None = None,
        softmax_choices: Mapping[str, dict[str, Any]] | None = None,
    ) -> SequenceParallel:
        """Strategies for softmax and linear layers over the SP communicator ``comm`` (collective for ``usp``).

        ``softmax_choices`` maps more softmax strategies to their options; they are built after the first two,
        in the mapping's order (the same on every rank), for :meth:`with_softmax`.
        """
        extra = {name: opts for name, opts in (softmax_choices or {}).items() if name != softmax}
        for name in (softmax, *extra):
            if name not in SOFTMAX_STRATEGIES:
                raise ValueError(f"softmax layers take one of {SOFTMAX_STRATEGIES}, got {name!r}")
        if linear not in [*LINEAR_STRATEGIES, "ulysses"]:
            raise ValueError(f"linear layers take one of {[*LINEAR_STRATEGIES, 'ulysses']}, got {linear!r}")

        def softmax_strategy(name: str, options: dict[str, Any] | None) -> SequenceStrategy:
            # Views of one group, so each strategy's traffic is counted apart (CommStats per strategy).
            return make_strategy(name, comm.view(f"{comm.name}.softmax.{name}"), layout, **(options or {}))

        first = softmax_strategy(softmax, softmax_options)
        linear_comm = comm.view(f"{comm.name}.linear.{linear}")
        linear_strategy = make_strategy(linear, linear_comm, layout, **(linear_options or {}))
        choices = {softmax: first, **{name: softmax_strategy(name, opts) for name, opts in extra.items()}}
        return cls(layout, first, linear_strategy, comm=comm.view(f"{comm.name}.conv"), softmax_choices=choices)

    @classmethod
    def single(cls, seq_len: int, *, kind: str = "contiguous") -> SequenceParallel:
        """No sequence parallelism: one rank holds the whole sequence (single-process runs and references)."""
        return cls.build(Communicator.solo(), SequenceLayout(kind, seq_len, 1, 0))

    def with_documents(self, cu_seqlens: torch.Tensor | Sequence[int] | None) -> SequenceParallel:
        """This context for a batch of packed documents (global offsets); validated against the layout."""
        cu = self.layout.with_documents(cu_seqlens).cu_seqlens if cu_seqlens is not None else None
        return replace(self, cu_seqlens=cu)

    def with_softmax(self, name: str) -> SequenceParallel:
        """This context with the softmax layers on ``name``, one of the strategies built with it."""
        if name not in self.softmax_choices:
            built = list(self.softmax_choices) or [self.softmax.name]
            raise ValueError(f"softmax strategy {name!r} was not built for this context; built: {built}")
        return replace(self, softmax=self.softmax_choices[name])

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self.layout.positions(device)

    def short_conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Causal depthwise convolution of this rank's tokens ``[B, n, C]`` with ``weight`` ``[C, W]`` over the
        whole (sharded) sequence, per document; see :func:`~distseq.parallel.sequence.conv.causal_conv`."""
        comm = self.comm if self.comm is not None else Communicator.solo()
        return causal_conv(x, weight, self.layout.with_documents(self.cu_seqlens), comm, bias=bias)

    def strategies(self) -> list[SequenceStrategy]:
        return [self.softmax, self.linear]

    def comm_stats(self) -> dict[str, CommStats]:
        """Byte statistics by strategy: ``{"softmax.ring": ..., "linear.lasp2": ...}`` (each strategy's
        communicators merged)."""
        out = {}
        softmax = [("softmax", s) for s in (self.softmax_choices or {self.softmax.name: self.softmax}).values()]
        for kind, strategy in (*softmax, ("linear", self.linear)):
            merged = CommStats()
            for comm in strategy.communicators():
                merged.add(comm.stats)
            out[f"{kind}.{strategy.name}"] = merged
        if self.comm is not None and self.comm.stats.calls:
            out["conv"] = self.comm.stats
        return out
