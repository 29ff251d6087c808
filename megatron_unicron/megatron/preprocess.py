"""Tokenize a text corpus into Megatron indexed datasets (`<prefix>_<key>_document.bin/.idx`).

The engine behind `tools/preprocess_data.py`, after Megatron-LM's tool of that name: JSON lines (one
document per line, text under `--json-keys`) or plain text (one document per line) in, one indexed
dataset per key out, written through megatron-core's `IndexedDatasetBuilder`, so `GPTDataset` reads
it. The input is streamed in chunks; memory grows only with megatron's per-document index (a few
integers per document). Outputs appear only when complete: they are written under temporary names
and renamed at the end, so a bad line leaves nothing behind.
"""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from megatron_unicron.megatron.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

INPUT_FORMATS = ("auto", "jsonl", "text")
CHUNK_DOCUMENTS = 512
# In each spawned worker process: its tokenizer, set once by `_init_worker`.
_WORKER: dict[str, Tokenizer] = {}


class InputError(ValueError):
    """A problem with the input corpus, named by file and line."""


@dataclass(frozen=True, kw_only=True)
class OutputStats:
    """What was written for one JSON key."""

    prefix: str
    documents: int
    tokens: int
    skipped_empty: int


@dataclass(frozen=True, kw_only=True)
class Document:
    """One input line: its number in the file and its text per JSON key."""

    line: int
    texts: tuple[str, ...]


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's output name for a key at document level: `<prefix>_<key>_document`."""
    return f"{output_prefix}_{key}_document"


def resolve_input_format(path: str, input_format: str) -> str:
    """`jsonl` or `text`; `auto` means text for a `.txt`/`.txt.gz` name and JSON lines otherwise."""
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input format {input_format!r} is not one of {', '.join(INPUT_FORMATS)}")
    if input_format != "auto":
        return input_format
    name = path[:-3] if path.endswith(".gz") else path
    return "text" if name.endswith(".txt") else "jsonl"


def read_documents(path: str, *, input_format: str, json_keys: Sequence[str]) -> Iterator[Document]:
    """Stream the documents of `path` (blank lines are skipped); bad lines raise `InputError`.

    The file's existence and the format are checked at once, the lines as they are read.
    """
    fmt = resolve_input_format(path, input_format)
    if fmt == "text" and list(json_keys) != ["text"]:
        raise InputError(f"{path}: --json-keys applies to JSON lines input only (this is plain text)")
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    return _iter_documents(path, fmt, json_keys)


def _iter_documents(path: str, fmt: str, json_keys: Sequence[str]) -> Iterator[Document]:
    line_number = 0
    with _open_text(path) as stream:
        try:
            for line_number, line in enumerate(stream, start=1):
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                if fmt == "text":
                    yield Document(line=line_number, texts=(text,))
                else:
                    yield Document(line=line_number, texts=_json_texts(path, line_number, text, json_keys))
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text after line {line_number}: {err.reason}") from None


def preprocess(
    *,
    input_path: str,
    output_prefix: str,
    tokenizer: Tokenizer,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    input_format: str = "auto",
    workers: int = 1,
    log_interval: int = 10000,
) -> list[OutputStats]:
    """Tokenize `input_path` into one indexed dataset per JSON key; return what was written."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise ValueError(f"--json-keys must name distinct keys, got {list(json_keys)}")
    directory = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(directory):
        raise ValueError(
            f"output directory {directory} does not exist (from --output-prefix {output_prefix})"
        )
    documents = read_documents(input_path, input_format=input_format, json_keys=json_keys)
    writers = [_Writer(output_prefix_for(output_prefix, key), tokenizer.vocab_size) for key in json_keys]
    pool: multiprocessing.pool.Pool | None = None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(tokenizer,)
            )
        done = 0
        for chunk in _chunks(documents, CHUNK_DOCUMENTS * workers):
            parts = [chunk[i : i + CHUNK_DOCUMENTS] for i in range(0, len(chunk), CHUNK_DOCUMENTS)]
            if pool is not None:
                encoded = pool.map(_encode_in_worker, [(p, append_eod) for p in parts])
            else:
                encoded = [_encode(tokenizer, chunk, append_eod)]
            for part in encoded:
                for per_key in part:
                    for writer, ids in zip(writers, per_key):
                        writer.add(ids)
            if log_interval and done // log_interval != (done + len(chunk)) // log_interval:
                logger.info("processed %d documents", done + len(chunk))
            done += len(chunk)
        return [writer.finish() for writer in writers]
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for writer in writers:
            writer.discard()


class _Writer:
    """One output dataset, written under temporary names until `finish`."""

    def __init__(self, prefix: str, vocab_size: int) -> None:
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix = prefix
        self._tmp_bin = prefix + ".bin.tmp"
        self._tmp_idx = prefix + ".idx.tmp"
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=DType.optimal_dtype(vocab_size))
        self._documents = 0
        self._tokens = 0
        self._skipped = 0
        self._finished = False

    def add(self, ids: list[int]) -> None:
        if not ids:
            self._skipped += 1
            return
        self._builder.add_document(ids, [len(ids)])
        self._documents += 1
        self._tokens += len(ids)

    def finish(self) -> OutputStats:
        self._builder.finalize(self._tmp_idx)
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(self._tmp_idx, self.prefix + ".idx")
        self._finished = True
        return OutputStats(
            prefix=self.prefix, documents=self._documents, tokens=self._tokens, skipped_empty=self._skipped
        )

    def discard(self) -> None:
        if self._finished:
            return
        self._builder.data_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)


def _init_worker(tokenizer: Tokenizer) -> None:
    _WORKER["tokenizer"] = tokenizer


def _encode_in_worker(task: tuple[list[Document], bool]) -> list[list[list[int]]]:
    return _encode(_WORKER["tokenizer"], *task)


def _encode(tokenizer: Tokenizer, documents: list[Document], append_eod: bool) -> list[list[list[int]]]:
    """Token ids per document per key (plus eod on non-empty documents when asked)."""
    out = []
    for document in documents:
        per_key = []
        for text in document.texts:
            try:
                ids = tokenizer.tokenize(text)
            except ValueError as err:
                raise InputError(f"line {document.line}: {err}") from None
            if ids and append_eod:
                ids.append(tokenizer.eod)
            per_key.append(ids)
        out.append(per_key)
    return out


def _json_texts(path: str, line_number: int, line: str, json_keys: Sequence[str]) -> tuple[str, ...]:
    where = f"{path}:{line_number}"
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    texts = []
    for key in json_keys:
        if key not in record:
            keys = ", ".join(sorted(record)) or "none"
            raise InputError(f"{where}: no key {key!r} (keys: {keys}); choose the text key with --json-keys")
        value = record[key]
        if not isinstance(value, str):
            raise InputError(f"{where}: key {key!r} holds {type(value).__name__}, not a string")
        texts.append(value)
    return tuple(texts)


def _open_text(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _chunks(documents: Iterator[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
