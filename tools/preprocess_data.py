"""Tokenize a JSON lines or plain-text corpus into Megatron indexed datasets (.bin/.idx).

Megatron-LM's `tools/preprocess_data.py` flags where they apply; writes `<prefix>_<key>_document.bin`
and `.idx` (e.g. `<prefix>_text_document`), which `--data-path <prefix>_text_document` then trains on:

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt --append-eod

Input: JSON lines (one object per line; the text under each of `--json-keys`), or plain text with one
document per line (`--input-format text`, the default for a `.txt` name). A `.gz` input is read as gzip.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

try:
    import megatron_unicron  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_unicron.megatron.preprocess import INPUT_FORMATS, preprocess
from megatron_unicron.megatron.tokenizer import TOKENIZER_TYPES, build_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with Megatron-LM's flag names."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("input data")
    data.add_argument("--input", required=True, help="JSON lines or plain-text file (.gz allowed)")
    data.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys holding the text (default: text)"
    )
    data.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="auto: plain text for a .txt name, JSON lines otherwise",
    )
    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    tok.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    tok.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    tok.add_argument("--vocab-size", type=int, help="ids per token, without eod (NullTokenizer)")
    proc = parser.add_argument_group("tokenization process")
    proc.add_argument("--append-eod", action="store_true", help="end every document with the eod token")
    out = parser.add_argument_group("output data")
    out.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    run = parser.add_argument_group("runtime")
    run.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    run.add_argument("--log-interval", type=int, default=10000, help="progress every N documents")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the tool; print one line and return 1 on bad input."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    start = time.perf_counter()
    try:
        tokenizer = build_tokenizer(
            args.tokenizer_type,
            vocab_size=args.vocab_size,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
        )
        written = preprocess(
            input_path=args.input,
            output_prefix=args.output_prefix,
            tokenizer=tokenizer,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            input_format=args.input_format,
            workers=args.workers,
            log_interval=args.log_interval,
        )
    except (ValueError, OSError, ImportError) as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    for stats in written:
        print(
            f"wrote {stats.prefix}.bin/.idx: {stats.documents} documents, {stats.tokens} tokens"
            + (f", {stats.skipped_empty} empty documents skipped" if stats.skipped_empty else "")
            + f" ({elapsed:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
