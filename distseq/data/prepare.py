"""``distseq data prepare``: tokenize text files into a memory-mapped token file.

Inputs are read as streams, never whole:

* ``*.jsonl``: one document per line, its text in the field ``text_field`` (default ``"text"``);
* any other file: one document per file, or one per line with ``split_lines`` (line terminators removed,
  empty lines skipped);
* a directory: every file below it, in sorted order.

Tokenizers:

* ``"byte"`` (default): the raw bytes of the text are the tokens ``0..255`` and the document separator is
  EOS ``256``, so the vocabulary is 257 and files are ``uint16``. Decoding is ``bytes(tokens)``.
* ``"hf:/path/to/tokenizer"``: a local Hugging Face tokenizer (a ``tokenizer.json`` file or a directory
  holding one, read with the ``tokenizers`` package; otherwise a directory read with ``transformers``
  ``AutoTokenizer``, local files only). Neither package is a dependency of distseq; nothing is downloaded.

With ``eos`` each document ends with the tokenizer's EOS token (the byte tokenizer's is 256).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from distseq.data.tokens import TokenFile, TokenFileWriter

__all__ = ["BYTE_EOS", "BYTE_VOCAB_SIZE", "Tokenizer", "add_arguments", "load_tokenizer", "main", "prepare"]

BYTE_EOS = 256
BYTE_VOCAB_SIZE = 257
_BLOCK_BYTES = 1 << 20
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


@dataclass(frozen=True)
class Tokenizer:
    """A tokenizer as prepare uses it: a document's UTF-8 byte pieces in, token pieces out."""

    name: str
    vocab_size: int
    eos_id: int | None
    tokenize: Callable[[Iterable[bytes]], Iterator[Sequence[int] | bytes]]


def _byte_pieces(pieces: Iterable[bytes]) -> Iterator[bytes]:
    # A byte's token is its value, so the pieces are already tokens (a bytes object iterates as ints).
    yield from pieces


def _whole_text(encode: Callable[[str], list[int]]) -> Callable[[Iterable[bytes]], Iterator[list[int]]]:
    def tokenize(pieces: Iterable[bytes]) -> Iterator[list[int]]:
        # Subword tokenizers need the whole document: a piece boundary could split a word or a character.
        yield encode(b"".join(pieces).decode("utf-8"))

    return tokenize


def _hf_tokenizer(spec: str) -> Tokenizer:
    path = Path(spec.removeprefix("hf:")).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {spec!r}: {path} does not exist (only local tokenizers are supported)")
    name = f"hf:{path.resolve()}"
    tokenizer_json = path / "tokenizer.json" if path.is_dir() else path
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        HFTokenizer = None
    if HFTokenizer is not None and tokenizer_json.is_file():
        tok = HFTokenizer.from_file(str(tokenizer_json))
        eos_id = next((i for n in _EOS_NAMES if (i := tok.token_to_id(n)) is not None), None)
        return Tokenizer(
            name,
            tok.get_vocab_size(with_added_tokens=True),
            eos_id,
            _whole_text(lambda text: tok.encode(text, add_special_tokens=False).ids),
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(
            f"tokenizer {spec!r} needs the `tokenizers` package (for a tokenizer.json) or `transformers`: "
            f"pip install tokenizers"
        ) from None
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return Tokenizer(
        name, len(tok), tok.eos_token_id, _whole_text(lambda text: tok.encode(text, add_special_tokens=False))
    )


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or ``"hf:/path/to/local/tokenizer"``."""
    if spec == "byte":
        return Tokenizer("byte", BYTE_VOCAB_SIZE, BYTE_EOS, _byte_pieces)
    if spec.startswith("hf:"):
        return _hf_tokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}; use 'byte' or 'hf:/path/to/local/tokenizer'")


def _input_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file()))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not files:
        raise ValueError(f"no input files in {[str(i) for i in inputs]}")
    return files


def _file_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(_BLOCK_BYTES):
            yield block


def _documents(path: Path, *, split_lines: bool, text_field: str) -> Iterator[Iterable[bytes]]:
    """Each document of ``path`` as UTF-8 byte pieces, consumed one document at a time."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_no}: no string field {text_field!r} in the JSON record")
                yield [text.encode("utf-8")]
    elif split_lines:
        with open(path, "rb") as f:
            for line in f:
                line = line.removesuffix(b"\n").removesuffix(b"\r")
                if line:
                    yield [line]
    else:
        yield _file_blocks(path)


def prepare(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer: str = "byte",
    eos: bool = True,
    *,
    split_lines: bool = False,
    text_field: str = "text",
) -> TokenFile:
    """Tokenize ``inputs`` into the token file ``output`` (``<output>.bin/.idx/.json``) and open it.

    Documents are written in input order; empty documents are skipped. With ``eos`` every document ends
    with the tokenizer's EOS token (a ValueError if it has none).
    """
    tok = load_tokenizer(tokenizer)
    if eos and tok.eos_id is None:
        raise ValueError(f"tokenizer {tok.name!r} has no EOS token (looked for {list(_EOS_NAMES)}); pass eos=False")
    files = _input_files(inputs)
    with TokenFileWriter(output, vocab_size=tok.vocab_size, tokenizer=tok.name, eos_id=tok.eos_id) as writer:
        for path in files:
            for pieces in _documents(path, split_lines=split_lines, text_field=text_field):
                for tokens in tok.tokenize(pieces):
                    writer.append(tokens)
                if eos and writer.document_tokens:
                    writer.append([tok.eos_id])
                writer.end_document()
    return TokenFile(output)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="text files, *.jsonl files or directories of them")
    parser.add_argument("--output", "-o", required=True, help="token file base name: writes OUTPUT.bin/.idx/.json")
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (vocab 257, EOS 256) or 'hf:/path/to/local/tokenizer' (needs tokenizers or transformers)",
    )
    parser.add_argument("--no-eos", dest="eos", action="store_false", help="do not end documents with EOS")
    parser.add_argument("--split-lines", action="store_true", help="one document per line of plain text files")
    parser.add_argument("--text-field", default="text", help="field of the text in *.jsonl records")


def main(args: argparse.Namespace) -> int:
    token_file = prepare(
        args.inputs,
        args.output,
        tokenizer=args.tokenizer,
        eos=args.eos,
        split_lines=args.split_lines,
        text_field=args.text_field,
    )
    print(
        f"wrote {token_file.num_tokens} tokens in {token_file.num_documents} documents to {token_file.bin_path} "
        f"(dtype={token_file.dtype}, vocab_size={token_file.vocab_size}, tokenizer={token_file.tokenizer})"
    )
    return 0
