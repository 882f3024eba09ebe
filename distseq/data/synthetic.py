"""A synthetic long-range task: multi-query associative recall (MQAR) across sequence-parallel shards.

A sample of ``seq_len`` tokens reads::

    k1 v1 k2 v2 ... kP vP   filler filler ... filler   kA vA kB vB ... (Q queries)
    \\_ the first 2P positions _/                       \\_ the last 2Q positions _/

``P = num_pairs`` distinct keys each get a value; the queries repeat ``Q = num_queries`` of those keys (no key
twice) near the end, each followed by its value. With ``min_pairs`` each sample draws its own ``P`` uniformly
from ``[min_pairs, num_pairs]`` and asks ``min(Q, P)`` queries (the mix MQAR models are usually trained on: the
samples with few pairs teach the lookup, the ones with many make it selective).

The loss is on the query keys only: the label there is the value, which is also the next token of the sequence,
so the task is ordinary next-token prediction with every other label ``IGNORE_INDEX``. Under a contiguous layout
with ``sp`` ranks the pairs sit on rank 0 and the queries on rank ``sp - 1`` whenever both spans fit in
``seq_len / sp`` tokens, so answering needs attention across shards. (A zigzag layout gives the first and the
last chunk to rank 0, so there the pairs and the queries share a rank.)

Vocabulary (needs ``vocab_size >= num_keys + num_values + 1``): keys are tokens ``[0, num_keys)``, values
``[num_keys, num_keys + num_values)``, filler the rest ``[num_keys + num_values, vocab_size)``. Values are
drawn uniformly, so guessing scores ``chance_accuracy = 1 / num_values``.

Sample ``i`` depends only on ``(seed, i)``, so any rank can build any sample and results do not depend on
the parallel layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from distseq.data.loader import Sample
from distseq.models.hybrid import IGNORE_INDEX

__all__ = ["RecallTask"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _sample_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, index)`` alone; nearby seeds give unrelated streams."""
    return torch.Generator().manual_seed(_splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)))


class RecallTask:
    """MQAR samples of ``seq_len`` tokens; a :class:`~distseq.data.loader.SampleSource` without end.

    Args:
        seq_len: tokens per sample; ``2 * num_pairs`` and ``2 * num_queries`` must each fit in ``seq_len // 2``.
        vocab_size: the model's vocabulary; at least ``num_keys + num_values + 1``.
        num_pairs: key -> value pairs per sample.
        num_queries: keys asked at the end (default ``num_pairs``); at most ``num_pairs``.
        num_keys: size of the key alphabet the pairs draw distinct keys from.
        num_values: size of the value alphabet (chance accuracy is ``1 / num_values``).
        min_pairs: draw each sample's pair count from ``[min_pairs, num_pairs]``; None = always ``num_pairs``.
        seed: dataset seed.

    The defaults (4 pairs, 16 values, vocabulary >= 81) are small enough for a tiny model: a 4-layer,
    64-wide softmax-attention model falls from chance loss ``ln 16 = 2.77`` to about 1.0 in 300 steps
    (seq_len=64, batch 64, lr 3e-3); linear-attention-heavy patterns and more pairs take longer.
    """

    num_samples = None
    has_documents = False

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        *,
        num_pairs: int = 4,
        num_queries: int | None = None,
        num_keys: int = 64,
        num_values: int = 16,
        min_pairs: int | None = None,
        seed: int = 0,
    ):
        num_queries = num_pairs if num_queries is None else num_queries
        if min_pairs is not None and not 1 <= min_pairs <= num_pairs:
            raise ValueError(
                f"recall task needs 1 <= min_pairs <= num_pairs: min_pairs={min_pairs}, num_pairs={num_pairs}"
            )
        if num_pairs < 1 or not 1 <= num_queries <= num_pairs or num_pairs > num_keys or num_values < 2:
            raise ValueError(
                f"recall task needs 1 <= num_queries <= num_pairs <= num_keys and num_values >= 2: "
                f"num_pairs={num_pairs}, num_queries={num_queries}, num_keys={num_keys}, num_values={num_values}"
            )
        if vocab_size < num_keys + num_values + 1:
            raise ValueError(
                f"recall task needs vocab_size >= num_keys + num_values + 1 = {num_keys + num_values + 1} "
                f"(keys, values and at least one filler token): vocab_size={vocab_size}, num_keys={num_keys}, "
                f"num_values={num_values}"
            )
        if 2 * max(num_pairs, num_queries) > seq_len // 2:
            raise ValueError(
                f"recall task puts 2*num_pairs={2 * num_pairs} pair tokens in the first half and "
                f"2*num_queries={2 * num_queries} query tokens in the second half of seq_len={seq_len}; "
                f"use a longer sequence or fewer pairs"
            )
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_pairs = num_pairs
        self.num_queries = num_queries
        self.num_keys = num_keys
        self.num_values = num_values
        self.min_pairs = min_pairs
        self.seed = seed

    def __repr__(self) -> str:
        return (
            f"RecallTask(seq_len={self.seq_len}, vocab_size={self.vocab_size}, num_pairs={self.num_pairs}, "
            f"num_queries={self.num_queries}, num_keys={self.num_keys}, num_values={self.num_values}, "
            f"min_pairs={self.min_pairs}, seed={self.seed})"
        )

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing a uniform value at each answer position."""
        return 1.0 / self.num_values

    @property
    def answer_positions(self) -> torch.Tensor:
        """Global positions whose label is a value (the query keys), ``[num_queries]`` int64 (with a fixed
        pair count; with ``min_pairs`` they differ by sample: read the labels)."""
        if self.min_pairs is not None:
            raise ValueError("answer_positions differ by sample when min_pairs is set; the labels mark them")
        return self._answer_positions(self.num_queries)

    def _answer_positions(self, queries: int) -> torch.Tensor:
        return torch.arange(self.seq_len - 2 * queries, self.seq_len, 2)

    def generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sample ``index``: ``(input_ids [seq_len], labels [seq_len])``, int64."""
        gen = _sample_generator(self.seed, index)
        pairs, asks = self.num_pairs, self.num_queries
        if self.min_pairs is not None:
            pairs = int(torch.randint(self.min_pairs, self.num_pairs + 1, (1,), generator=gen))
            asks = min(asks, pairs)
        value_start = self.num_keys
        filler_start = self.num_keys + self.num_values
        keys = torch.randperm(self.num_keys, generator=gen)[:pairs]
        values = value_start + torch.randint(self.num_values, (pairs,), generator=gen)
        asked = torch.randperm(pairs, generator=gen)[:asks]
        ids = torch.randint(filler_start, self.vocab_size, (self.seq_len,), generator=gen)
        ids[0 : 2 * pairs : 2] = keys
        ids[1 : 2 * pairs : 2] = values
        queries = self._answer_positions(asks)
        ids[queries] = keys[asked]
        ids[queries + 1] = values[asked]
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.int64)
        labels[queries] = values[asked]
        return ids, labels

    def sample(self, index: int, spans: Sequence[tuple[int, int]]) -> Sample:
        # Generating the whole sample costs about as much as reading it; keep the requested positions.
        ids, labels = self.generate(index)
        positions = torch.cat([torch.arange(start, end) for start, end in spans])
        return Sample(input_ids=ids[positions], labels=labels[positions], cu_seqlens=None)
