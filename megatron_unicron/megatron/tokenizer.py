"""Tokenizers for GPT pretraining: Megatron-LM's `NullTokenizer` and `GPT2BPETokenizer` semantics.

Megatron-LM's own GPT-2 wrapper needs `transformers`; here the byte-level BPE runs on the HF
`tokenizers` library (the project's `data` extra) with GPT-2's pre-tokenization regex, which gives the
same ids as Megatron-LM's `_GPT2BPETokenizer` for the same vocab.json and merges.txt. Both classes carry
what megatron-core's GPT datasets read from a tokenizer: `vocab_size`, `eod` and `unique_identifiers`
(part of the dataset cache key, so it depends on the tokenizer's content, never on a file's path).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

TOKENIZER_TYPES = ("GPT2BPETokenizer", "NullTokenizer")
GPT2_EOD_TOKEN = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What the project and megatron-core's GPT datasets need from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """True vocabulary size, special tokens included (before padding for the model)."""
        ...

    @property
    def eod(self) -> int:
        """Id of the end-of-document token."""
        ...

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """JSON-serialisable identity; megatron-core hashes it into the dataset cache key."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Text to token ids (no end-of-document token added)."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids to text."""
        ...


class NullTokenizer:
    """Megatron-LM's `NullTokenizer`: text is space-separated integer ids.

    The end-of-document id is `vocab_size` (one past the last text id), so the true vocabulary holds
    `vocab_size + 1` ids, as in Megatron-LM's `_NullTokenizer` and megatron-core 0.16's `NullTokenizer`.
    """

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"NullTokenizer needs --vocab-size as a positive integer, got {vocab_size!r}")
        self._ids_without_eod = vocab_size

    @property
    def vocab_size(self) -> int:
        """Text ids plus the end-of-document id."""
        return self._ids_without_eod + 1

    @property
    def eod(self) -> int:
        """The end-of-document id, `vocab_size - 1`."""
        return self._ids_without_eod

    @property
    def eos(self) -> int:
        """Alias of `eod`, as in Megatron-LM."""
        return self._ids_without_eod

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """Class and size: all that determines the token ids."""
        return {"class": type(self).__name__, "vocab_size": self._ids_without_eod}

    def tokenize(self, text: str) -> list[int]:
        """Parse whitespace-separated integer ids; each must lie in [0, vocab_size)."""
        ids: list[int] = []
        for word in text.split():
            try:
                token = int(word)
            except ValueError:
                raise ValueError(f"NullTokenizer: {word[:40]!r} is not an integer token id") from None
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"NullTokenizer: token id {token} is outside [0, {self.vocab_size}) "
                    f"(--vocab-size {self._ids_without_eod}, eod {self.eod})"
                )
            ids.append(token)
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """Join the ids with single spaces."""
        return " ".join(str(int(i)) for i in ids)


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE from a vocab.json and merges.txt (Megatron-LM's `GPT2BPETokenizer`).

    `<|endoftext|>` must be in the vocabulary: it is the end-of-document id. As in Megatron-LM it is
    not treated as a special token inside text (text containing it is BPE-encoded like any other).
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
            from tokenizers import decoders, models, pre_tokenizers
        except ImportError:
            raise ImportError(
                "GPT2BPETokenizer needs the 'tokenizers' package: pip install 'megatron_unicron[data]'"
            ) from None
        vocab = _read_vocab(vocab_file)
        if GPT2_EOD_TOKEN not in vocab:
            raise ValueError(
                f"vocab file {vocab_file} has no {GPT2_EOD_TOKEN} token; GPT2BPETokenizer uses it as "
                "the end-of-document id"
            )
        if not os.path.isfile(merge_file):
            raise FileNotFoundError(f"merge file not found: {merge_file} (give --merge-file merges.txt)")
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as err:  # the Rust side raises a plain Exception for malformed files
            raise ValueError(f"cannot read GPT-2 BPE files {vocab_file}, {merge_file}: {err}") from None
        self._hf = HFTokenizer(model)
        self._hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._hf.decoder = decoders.ByteLevel()
        self._vocab_size = len(vocab)
        self._eod = vocab[GPT2_EOD_TOKEN]
        self._identity = {
            "class": type(self).__name__,
            "vocab_sha256": _sha256(vocab_file),
            "merges_sha256": _sha256(merge_file),
        }

    @property
    def vocab_size(self) -> int:
        """Number of entries in vocab.json (50257 for GPT-2)."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        """Id of `<|endoftext|>`."""
        return self._eod

    @property
    def eos(self) -> int:
        """Alias of `eod`, as in Megatron-LM."""
        return self._eod

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        """Class plus content digests of the vocab and merges files."""
        return dict(self._identity)

    def tokenize(self, text: str) -> list[int]:
        """Byte-level BPE ids of `text`."""
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 byte sequences become U+FFFD, as in Megatron-LM."""
        return str(self._hf.decode([int(i) for i in ids], skip_special_tokens=False))


def build_tokenizer(
    tokenizer_type: str,
    *,
    vocab_size: int | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
) -> Tokenizer:
    """Build the tokenizer named by Megatron-LM's `--tokenizer-type` from its flags."""
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N")
        return NullTokenizer(vocab_size)
    if tokenizer_type == "GPT2BPETokenizer":
        if vocab_file is None or merge_file is None:
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        return GPT2BPETokenizer(vocab_file, merge_file)
    raise ValueError(
        f"unsupported --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def padded_vocab_size(
    orig_vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int
) -> int:
    """Megatron-LM's `_vocab_size_with_padding`: round up to a multiple of divisible_by × TP."""
    for name, value in (
        ("vocab size", orig_vocab_size),
        ("--make-vocab-size-divisible-by", make_vocab_size_divisible_by),
        ("--tensor-model-parallel-size", tensor_model_parallel_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple


def _read_vocab(vocab_file: str) -> dict[str, int]:
    if not os.path.isfile(vocab_file):
        raise FileNotFoundError(f"vocab file not found: {vocab_file} (give --vocab-file vocab.json)")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"vocab file {vocab_file} is not valid JSON: {err}") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"vocab file {vocab_file} must map token strings to integer ids")
    return vocab


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
