"""Training data: sources of fixed-length samples and the loader that shards them over dp x sp ranks.

* :class:`RecallTask`: a synthetic multi-query associative recall task whose answers lie across SP shards.
* :class:`TokenFile` / :class:`TokenFileSource`: memory-mapped token files written by :func:`prepare`
  (``distseq data prepare``), cut into samples with packed-document ``cu_seqlens``. The re-exported function
  hides the ``prepare`` module as an attribute of this package: reach the module (``add_arguments``,
  ``main``) with ``importlib.import_module("distseq.data.prepare")``.
* :class:`ShardedLoader`: per optimizer step, this rank's micro-batches (:class:`Batch`), reading only the
  positions its :class:`~distseq.parallel.layout.SequenceLayout` holds.
* :class:`LengthGroupedOrder`: the order that puts samples of similar document lengths in the same step
  (``data.group_by_length``).
"""

from distseq.data.grouping import LengthGroupedOrder
from distseq.data.loader import Batch, Sample, SampleSource, ShardedLoader, layout_spans
from distseq.data.prepare import prepare
from distseq.data.synthetic import RecallTask
from distseq.data.tokens import TokenFile, TokenFileSource, TokenFileWriter, token_dtype

__all__ = [
    "Batch",
    "LengthGroupedOrder",
    "RecallTask",
    "Sample",
    "SampleSource",
    "ShardedLoader",
    "TokenFile",
    "TokenFileSource",
    "TokenFileWriter",
    "layout_spans",
    "prepare",
    "token_dtype",
]
