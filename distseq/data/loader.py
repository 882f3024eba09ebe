"""ShardedLoader: the micro-batches one (dp, sp) rank feeds the model each optimizer step.

Every source (the synthetic recall task, memory-mapped token files) answers one question: the tokens and
labels of sample ``i`` at a list of global position spans. The loader turns the step position, the dp split
and the rank's :class:`~distseq.parallel.layout.SequenceLayout` into those questions, so an SP rank only ever
asks for the positions it holds.

Step ``k`` consumes the ``global_batch`` consecutive samples that follow the previous step. Data-parallel rank
``r`` takes rows ``[r * G / dp, (r + 1) * G / dp)`` of them and splits its rows into micro-batches of
``micro_batch`` rows (``G / (dp * micro_batch)`` gradient-accumulation steps). The position is counted in
global samples, so a resume under another dp/sp split continues at the same data. An ``order`` maps each position
to the sample read there (``distseq.data.grouping``: samples grouped by document lengths); by default position
``i`` reads sample ``i``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from distseq.parallel.layout import SequenceLayout

__all__ = ["Batch", "Sample", "SampleSource", "ShardedLoader", "layout_spans"]


@dataclass
class Sample:
    """The tokens of one sample at the requested positions, in request order."""

    input_ids: torch.Tensor  # [n] int64
    labels: torch.Tensor  # [n] int64, next token of the global sequence or IGNORE_INDEX
    cu_seqlens: torch.Tensor | None  # [num_docs + 1] int64 global document offsets of the whole sample


@dataclass
class Batch:
    """One micro-batch for one SP rank, in the layout's local token order."""

    input_ids: torch.Tensor  # [micro_batch, n_local] int64
    labels: torch.Tensor  # [micro_batch, n_local] int64
    cu_seqlens: torch.Tensor | None  # [num_docs + 1] int64 global offsets (micro_batch == 1 only)


class SampleSource(Protocol):
    """What the loader needs from a source of fixed-length samples."""

    seq_len: int
    num_samples: int | None  # samples before the source wraps around; None for an endless source
    has_documents: bool  # samples carry cu_seqlens

    def sample(self, index: int, spans: Sequence[tuple[int, int]]) -> Sample:
        """Tokens and labels of sample ``index`` at the global positions ``[start, end)`` of each span."""
        ...


def layout_spans(layout: SequenceLayout) -> list[tuple[int, int]]:
    """The global position spans ``layout`` holds, in local order, with touching spans merged."""
    spans: list[tuple[int, int]] = []
    for chunk in layout.local_chunks():
        if spans and spans[-1][1] == chunk.start:
            spans[-1] = (spans[-1][0], chunk.end)
        else:
            spans.append((chunk.start, chunk.end))
    return spans


class ShardedLoader:
    """Per-rank micro-batches of a :class:`SampleSource`; iterate for one ``list[Batch]`` per optimizer step.

    Args:
        source: the samples; its ``seq_len`` must equal ``layout.seq_len``.
        global_batch: samples per optimizer step over all data-parallel ranks.
        micro_batch: rows per forward/backward; must be 1 for sources with packed documents.
        dp: data-parallel degree; ``dp_rank`` is this rank's coordinate on it.
        layout: which positions of each sample this SP rank holds.
        start_sample: global sample index of the first step.
        order: position -> sample index (the same function on every rank); None reads position ``i`` as sample
            ``i``.

    A finite source (``num_samples`` set) wraps around: global sample ``i`` reads sample ``i % num_samples``,
    so a step may take the last samples of one epoch and the first of the next.
    """

    def __init__(
        self,
        source: SampleSource,
        *,
        global_batch: int,
        micro_batch: int,
        layout: SequenceLayout,
        dp: int = 1,
        dp_rank: int = 0,
        start_sample: int = 0,
        order: Callable[[int], int] | None = None,
    ):
        if source.seq_len != layout.seq_len:
            raise ValueError(f"source seq_len={source.seq_len} differs from layout seq_len={layout.seq_len}")
        if dp < 1 or not 0 <= dp_rank < dp:
            raise ValueError(f"need dp >= 1 and 0 <= dp_rank < dp, got dp={dp}, dp_rank={dp_rank}")
        if micro_batch < 1 or global_batch < 1 or global_batch % (dp * micro_batch):
            raise ValueError(
                f"global_batch must be a positive multiple of dp * micro_batch: global_batch={global_batch}, "
                f"dp={dp}, micro_batch={micro_batch}, dp*micro_batch={dp * micro_batch}"
            )
        if source.has_documents and micro_batch != 1:
            raise ValueError(
                f"packed documents need micro_batch=1 (cu_seqlens describes one sequence), got "
                f"micro_batch={micro_batch}; raise global_batch/dp accumulation instead"
            )
        if start_sample < 0:
            raise ValueError(f"start_sample must be >= 0, got {start_sample}")
        self.source = source
        self.layout = layout
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp = dp
        self.dp_rank = dp_rank
        self.next_sample = start_sample
        self.order = order
        self.spans = layout_spans(layout)

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def num_micro_batches(self) -> int:
        """Gradient-accumulation steps per optimizer step."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def epoch(self) -> int:
        """Completed passes over a finite source (0 for an endless one)."""
        return 0 if self.source.num_samples is None else self.next_sample // self.source.num_samples

    @property
    def steps_per_epoch(self) -> float | None:
        """Optimizer steps per pass over a finite source (may be fractional), None for an endless one."""
        return None if self.source.num_samples is None else self.source.num_samples / self.global_batch

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step; advances the position by ``global_batch``."""
        rows_per_rank = self.global_batch // self.dp
        first = self.next_sample + self.dp_rank * rows_per_rank
        batches = [
            self._micro_batch(range(start, start + self.micro_batch))
            for start in range(first, first + rows_per_rank, self.micro_batch)
        ]
        self.next_sample += self.global_batch
        return batches

    def _micro_batch(self, indices: range) -> Batch:
        read = indices if self.order is None else map(self.order, indices)
        samples = [self.source.sample(i, self.spans) for i in read]
        for sample in samples:
            assert sample.input_ids.shape == (self.layout.local_len,), (sample.input_ids.shape, self.layout)
        return Batch(
            input_ids=torch.stack([s.input_ids for s in samples]),
            labels=torch.stack([s.labels for s in samples]),
            cu_seqlens=samples[0].cu_seqlens,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"next_sample": self.next_sample, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at ``state["next_sample"]``, whatever dp/sp split or batch size wrote it.

        A state written with another ``seq_len`` continues at the first sample that starts at or after the
        same token offset (with a warning), which is the same data for a token file.
        """
        next_sample = int(state["next_sample"])
        saved_len = int(state.get("seq_len", self.seq_len))
        if saved_len != self.seq_len:
            converted = math.ceil(next_sample * saved_len / self.seq_len)
            warnings.warn(
                f"loader state was saved with seq_len={saved_len}, now seq_len={self.seq_len}: continuing at "
                f"sample {converted} (token offset {next_sample * saved_len}) instead of {next_sample}",
                stacklevel=2,
            )
            next_sample = converted
        self.next_sample = next_sample
