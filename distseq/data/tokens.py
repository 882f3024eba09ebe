"""Memory-mapped token files and the fixed-length samples read from them.

A token file named ``<base>`` is three files (written by :class:`TokenFileWriter`, see
``distseq data prepare``):

* ``<base>.bin``: every token, concatenated, as native-byte-order ``uint16`` (``vocab_size <= 65536``) or
  ``uint32``; no header.
* ``<base>.idx``: document offsets as native ``int64``, ``num_documents + 1`` entries ``[0, ..., num_tokens]``;
  document ``d`` is tokens ``[idx[d], idx[d + 1])``.
* ``<base>.json``: the sidecar ``{"format": "distseq-tokens", "version": 1, "dtype", "byteorder",
  "num_tokens", "num_documents", "vocab_size", "tokenizer", "eos_id"}``, written last.

Both binaries are memory-mapped with :func:`torch.from_file` (no numpy needed): opening a file reads only
the sidecar, and a read touches only the pages it asks for, so files of billions of tokens work.

:class:`TokenFileSource` cuts the file into non-overlapping samples: sample ``i`` holds tokens
``[i * seq_len, (i + 1) * seq_len)`` and the label of each position is the next token of the file
(``IGNORE_INDEX`` past the end). A tail shorter than ``seq_len`` is not used.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distseq.data.loader import Sample
from distseq.models.hybrid import IGNORE_INDEX

__all__ = ["TokenFile", "TokenFileSource", "TokenFileWriter", "token_dtype", "token_file_paths"]

FORMAT = "distseq-tokens"
VERSION = 1
_DTYPES = {"uint16": (torch.uint16, "H"), "uint32": (torch.uint32, "I")}
assert array("H").itemsize == 2 and array("I").itemsize == 4 and array("q").itemsize == 8


def token_dtype(vocab_size: int) -> str:
    """The narrowest on-disk dtype for ``vocab_size`` tokens: ``"uint16"`` up to 65536, else ``"uint32"``."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def token_file_paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(<base>.bin, <base>.idx, <base>.json)`` for ``path`` given as the base or any of the three files."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".bin", ".idx", ".json") else path
    return base.with_name(base.name + ".bin"), base.with_name(base.name + ".idx"), base.with_name(base.name + ".json")


class TokenFile:
    """A token file opened for reading; see the module docstring for the format."""

    def __init__(self, path: str | os.PathLike):
        self.bin_path, self.idx_path, self.json_path = token_file_paths(path)
        if not self.json_path.exists():
            raise FileNotFoundError(f"no token file sidecar {self.json_path} (write one with `distseq data prepare`)")
        meta = json.loads(self.json_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(
                f"{self.json_path} is not a {FORMAT} v{VERSION} sidecar: "
                f"format={meta.get('format')!r}, version={meta.get('version')!r}"
            )
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"{self.json_path}: unknown dtype {meta['dtype']!r}; expected one of {list(_DTYPES)}")
        if meta["byteorder"] != sys.byteorder:
            raise ValueError(f"{self.bin_path} is {meta['byteorder']}-endian, this machine is {sys.byteorder}-endian")
        self.meta: dict[str, Any] = meta
        self.dtype: str = meta["dtype"]
        self.num_tokens: int = meta["num_tokens"]
        self.num_documents: int = meta["num_documents"]
        self.vocab_size: int = meta["vocab_size"]
        self.tokenizer: str = meta["tokenizer"]
        self.eos_id: int | None = meta["eos_id"]
        if self.num_tokens < 1:
            raise ValueError(f"{self.bin_path} holds no tokens")
        torch_dtype, typecode = _DTYPES[self.dtype]
        self._check_size(self.bin_path, self.num_tokens * array(typecode).itemsize)
        self._check_size(self.idx_path, (self.num_documents + 1) * 8)
        # shared=False maps the file copy-on-write and read-only: pages load on first touch.
        self._tokens = torch.from_file(str(self.bin_path), shared=False, size=self.num_tokens, dtype=torch_dtype)
        self._offsets = torch.from_file(
            str(self.idx_path), shared=False, size=self.num_documents + 1, dtype=torch.int64
        )

    def _check_size(self, path: Path, expected: int) -> None:
        actual = path.stat().st_size if path.exists() else None
        if actual != expected:
            raise ValueError(f"{path} should hold {expected} bytes per {self.json_path}, found {actual}")

    def __repr__(self) -> str:
        return (
            f"TokenFile({str(self.bin_path)!r}, num_tokens={self.num_tokens}, num_documents={self.num_documents}, "
            f"vocab_size={self.vocab_size}, dtype={self.dtype}, tokenizer={self.tokenizer!r})"
        )

    def __len__(self) -> int:
        return self.num_tokens

    def __reduce__(self):
        # Pickle by path (e.g. into spawned workers): each process maps the file itself.
        return (type(self), (self.json_path,))

    def read(self, start: int, end: int) -> torch.Tensor:
        """Tokens ``[start, end)`` as ``[end - start]`` int64."""
        if not 0 <= start <= end <= self.num_tokens:
            raise IndexError(f"token range [{start}, {end}) outside [0, {self.num_tokens})")
        return self._tokens[start:end].to(torch.int64)

    def document_offsets(self, start: int, end: int) -> torch.Tensor:
        """The document offsets ``b`` with ``start <= b < end``, int64 (a binary search of the index)."""
        bounds = torch.tensor([start, end], dtype=torch.int64)
        first, last = torch.searchsorted(self._offsets, bounds).tolist()
        return self._offsets[first:last].clone()


class TokenFileWriter:
    """Streams documents into a new token file; the files appear under their names only on :meth:`close`.

    Use as a context manager; an exception inside the block removes the partial files::

        with TokenFileWriter("data/train", vocab_size=257, tokenizer="byte", eos_id=256) as writer:
            writer.append(b"hello")        # a sequence of ints or bytes; a document may arrive in pieces
            writer.end_document()
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        vocab_size: int,
        tokenizer: str,
        eos_id: int | None,
        buffer_tokens: int = 1 << 20,
    ):
        self.dtype = token_dtype(vocab_size)
        if eos_id is not None and not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id={eos_id} outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.paths = token_file_paths(path)
        self.paths[0].parent.mkdir(parents=True, exist_ok=True)
        self._tmp = [p.with_name(p.name + ".tmp") for p in self.paths]
        # Closed by close() or abort().
        self._bin = open(self._tmp[0], "wb")
        self._idx = open(self._tmp[1], "wb")
        self._typecode = _DTYPES[self.dtype][1]
        self._buffer = array(self._typecode)
        self._offsets = array("q", [0])
        self._buffer_tokens = buffer_tokens
        self.num_tokens = 0
        self.num_documents = 0
        self.document_tokens = 0  # tokens of the document being written

    def __enter__(self) -> TokenFileWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, tokens: Sequence[int] | bytes) -> None:
        """Add tokens to the current document."""
        chunk = array(self._typecode)
        try:
            chunk.extend(tokens)
            in_range = not chunk or max(chunk) < self.vocab_size
        except OverflowError:  # negative, or too large for the dtype
            in_range = False
        if not in_range:
            bad = next(t for t in tokens if not 0 <= t < self.vocab_size)
            raise ValueError(f"token id {bad} outside the vocabulary [0, {self.vocab_size}) of {self.tokenizer!r}")
        self._buffer.extend(chunk)
        self.document_tokens += len(chunk)
        self.num_tokens += len(chunk)
        if len(self._buffer) >= self._buffer_tokens:
            self._flush()

    def end_document(self) -> None:
        """Close the current document; an empty one is dropped."""
        if self.document_tokens == 0:
            return
        self._offsets.append(self.num_tokens)
        self.num_documents += 1
        self.document_tokens = 0

    def _flush(self) -> None:
        # Every document holds a token, so the offsets buffer never outgrows the token buffer.
        self._buffer.tofile(self._bin)
        self._buffer = array(self._typecode)
        self._offsets.tofile(self._idx)
        self._offsets = array("q")

    def close(self) -> TokenFile:
        """Finish the file (closing an unfinished document) and open it for reading."""
        self.end_document()
        self._flush()
        self._bin.close()
        self._idx.close()
        if self.num_tokens == 0:
            self.abort()
            raise ValueError(f"no tokens to write to {self.paths[0]}: every input document was empty")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype,
            "byteorder": sys.byteorder,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer,
            "eos_id": self.eos_id,
        }
        self._tmp[2].write_text(json.dumps(meta, indent=2) + "\n")
        for tmp, final in zip(self._tmp, self.paths, strict=True):
            os.replace(tmp, final)
        return TokenFile(self.paths[2])

    def abort(self) -> None:
        """Drop the partial files."""
        self._bin.close()
        self._idx.close()
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)


class TokenFileSource:
    """Non-overlapping ``seq_len``-token samples of a :class:`TokenFile`; a :class:`SampleSource`.

    Args:
        file: the token file, or its path.
        seq_len: tokens per sample.
        documents: treat the file as packed documents: each sample carries its ``cu_seqlens`` (documents
            crossing the sample's start or end are cut there) and the label of a document's last token, which
            would predict the next document's first token, is ``IGNORE_INDEX``. With ``False`` the file is one
            token stream (``cu_seqlens`` is None; micro-batches may hold several samples).

    ``num_samples = num_tokens // seq_len``; index ``i`` reads sample ``i % num_samples`` (epochs wrap around).
    """

    def __init__(self, file: TokenFile | str | os.PathLike, seq_len: int, *, documents: bool = True):
        self.file = file if isinstance(file, TokenFile) else TokenFile(file)
        if seq_len < 1 or self.file.num_tokens < seq_len:
            raise ValueError(
                f"token file {self.file.bin_path} has {self.file.num_tokens} tokens, fewer than one sample of "
                f"seq_len={seq_len}"
            )
        self.seq_len = seq_len
        self.num_samples = self.file.num_tokens // seq_len
        self.has_documents = documents

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return f"TokenFileSource({self.file!r}, seq_len={self.seq_len}, documents={self.has_documents})"

    def cu_seqlens(self, index: int) -> torch.Tensor:
        """Document offsets ``[0, ..., seq_len]`` of sample ``index`` (int64)."""
        base = (index % self.num_samples) * self.seq_len
        inside = self.file.document_offsets(base + 1, base + self.seq_len) - base
        edges = torch.tensor([0, self.seq_len], dtype=torch.int64)
        return torch.cat([edges[:1], inside, edges[1:]])

    def sample(self, index: int, spans: Sequence[tuple[int, int]]) -> Sample:
        base = (index % self.num_samples) * self.seq_len
        ids, labels = [], []
        for start, end in spans:
            assert 0 <= start < end <= self.seq_len, (start, end, self.seq_len)
            lo, hi = base + start, base + end
            # One token past the span gives the label of its last position.
            tokens = self.file.read(lo, min(hi + 1, self.file.num_tokens))
            span_labels = torch.full((end - start,), IGNORE_INDEX, dtype=torch.int64)
            span_labels[: tokens.numel() - 1] = tokens[1:]
            if self.has_documents:
                # Position p ends a document when p + 1 starts the next one.
                ends = self.file.document_offsets(lo + 1, hi + 1) - 1 - lo
                span_labels[ends] = IGNORE_INDEX
            ids.append(tokens[: end - start])
            labels.append(span_labels)
        return Sample(
            input_ids=torch.cat(ids),
            labels=torch.cat(labels),
            cu_seqlens=self.cu_seqlens(index) if self.has_documents else None,
        )
