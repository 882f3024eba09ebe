"""Samples grouped by their documents' lengths (``data.group_by_length``), so that each optimizer step's micro-batches
have similar document-length profiles: all short documents, or one long one.

The loader's position counts global samples; :class:`LengthGroupedOrder` maps a position to the sample read there.
Positions are cut into windows of ``window`` samples (a multiple of ``global_batch``). Within a window the samples
are sorted by their causal attention pairs ``sum_d L_d (L_d + 1) / 2`` (document lengths ``L_d``; ties keep file
order), cut into steps of ``global_batch`` consecutive samples, and the steps are put in an order drawn from
``(seed, window)``, so training does not run every window from short to long. The map depends on the position
alone, so it is the same on every rank and after a resume; a window is a permutation of its positions, so every
sample is still read once per epoch.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["LengthGroupedOrder", "attention_pairs"]


class DocumentSource(Protocol):
    num_samples: int | None

    def cu_seqlens(self, index: int) -> torch.Tensor: ...


def attention_pairs(cu_seqlens: torch.Tensor) -> int:
    """Causal query-key pairs of a sample's documents: ``sum_d L_d (L_d + 1) / 2``."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return int((lengths * (lengths + 1) // 2).sum())


class LengthGroupedOrder:
    """Position -> sample index, grouping samples of similar document lengths into the same step.

    Args:
        source: a source of packed documents (``cu_seqlens(index)``), e.g. ``TokenFileSource``.
        global_batch: samples per optimizer step.
        window: samples per window, a positive multiple of ``global_batch``.
        seed: draws the order of the steps inside each window.
    """

    def __init__(self, source: DocumentSource, *, global_batch: int, window: int, seed: int):
        if global_batch < 1 or window < global_batch or window % global_batch:
            raise ValueError(
                f"the grouping window must be a positive multiple of global_batch: window={window}, "
                f"global_batch={global_batch}"
            )
        self.source, self.global_batch, self.window, self.seed = source, global_batch, window, seed
        self._cached: tuple[int, list[int]] | None = None

    def window_order(self, window_index: int) -> list[int]:
        """The positions of window ``window_index`` in the order they are read."""
        if self._cached is not None and self._cached[0] == window_index:
            return self._cached[1]
        first = window_index * self.window
        positions = range(first, first + self.window)
        by_pairs = sorted(positions, key=lambda i: (attention_pairs(self.source.cu_seqlens(i)), i))
        steps = [by_pairs[i : i + self.global_batch] for i in range(0, self.window, self.global_batch)]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + window_index)
        order = [i for step in torch.randperm(len(steps), generator=generator).tolist() for i in steps[step]]
        self._cached = (window_index, order)
        return order

    def __call__(self, position: int) -> int:
        window_index, offset = divmod(position, self.window)
        return self.window_order(window_index)[offset]
