"""tools/preprocess_data.py: corpus in, Megatron .bin/.idx out, read back through megatron-core."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy
import pytest

from megatron_unicron.megatron.preprocess import InputError, read_documents
from megatron_unicron.megatron.tokenizer import GPT2BPETokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
VOCAB = str(FIXTURES / "gpt2_tiny" / "vocab.json")
MERGES = str(FIXTURES / "gpt2_tiny" / "merges.txt")
CORPUS = FIXTURES / "tiny_corpus.jsonl"
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB, "--merge-file", MERGES]


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("preprocess_data", REPO / "tools" / "preprocess_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus_texts() -> list[str]:
    with open(CORPUS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def read_indexed(prefix: str) -> tuple[list[list[int]], type]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.index.dtype


def test_jsonl_gpt2_documents_read_back_exactly(tool: ModuleType, tmp_path: Path, capsys) -> None:
    prefix = str(tmp_path / "corpus")
    assert tool.main(["--input", str(CORPUS), "--output-prefix", prefix, "--append-eod", *GPT2_FLAGS]) == 0
    tokenizer = GPT2BPETokenizer(VOCAB, MERGES)
    texts = corpus_texts()
    documents, dtype = read_indexed(prefix + "_text_document")
    assert documents == [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts]
    assert [tokenizer.detokenize(d[:-1]) for d in documents] == texts
    assert dtype == numpy.uint16  # Megatron's optimal dtype for a vocabulary below 65500
    out = capsys.readouterr().out
    assert f"{len(texts)} documents, {sum(map(len, documents))} tokens" in out
    assert sorted(os.listdir(tmp_path)) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_plain_text_null_tokenizer_one_document_per_line(tool: ModuleType, tmp_path: Path) -> None:
    source = tmp_path / "ids.txt"
    source.write_text("1 2 3\n\n7  8\n0\n", encoding="utf-8")
    prefix = str(tmp_path / "ids")
    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--append-eod"]
    assert tool.main(["--input", str(source), "--output-prefix", prefix, *flags]) == 0
    documents, _ = read_indexed(prefix + "_text_document")
    assert documents == [[1, 2, 3, 10], [7, 8, 10], [0, 10]]  # eod = vocab size; blank line skipped


def test_without_append_eod_and_multiple_keys(tool: ModuleType, tmp_path: Path, capsys) -> None:
    source = tmp_path / "two.jsonl"
    rows = [{"title": "A title", "body": "Some body text."}, {"title": "", "body": "More."}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prefix = str(tmp_path / "two")
    argv = ["--input", str(source), "--output-prefix", prefix, "--json-keys", "title", "body"]
    assert tool.main([*argv, *GPT2_FLAGS]) == 0
    tokenizer = GPT2BPETokenizer(VOCAB, MERGES)
    titles, _ = read_indexed(prefix + "_title_document")
    bodies, _ = read_indexed(prefix + "_body_document")
    assert titles == [tokenizer.tokenize("A title")]
    assert bodies == [tokenizer.tokenize("Some body text."), tokenizer.tokenize("More.")]
    assert "1 empty documents skipped" in capsys.readouterr().out


def test_two_workers_write_the_same_files(tool: ModuleType, tmp_path: Path) -> None:
    source = tmp_path / "big.jsonl.gz"
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    with gzip.open(source, "wt", encoding="utf-8") as f:
        for i in range(40):  # 1280 documents: several chunks, each split between the workers
            f.write("\n".join(lines[i % len(lines) :] + lines[: i % len(lines)]) + "\n")
    outputs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        argv = ["--input", str(source), "--output-prefix", prefix, "--append-eod", "--workers", str(workers)]
        assert tool.main([*argv, *GPT2_FLAGS]) == 0
        outputs.append([Path(prefix + "_text_document" + ext).read_bytes() for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1]
    documents, _ = read_indexed(str(tmp_path / "w2_text_document"))
    assert len(documents) == 1280


def test_input_is_streamed_line_by_line(tmp_path: Path) -> None:
    source = tmp_path / "lazy.jsonl"
    source.write_text('{"text": "a"}\n{"text": "b"}\n{broken\n', encoding="utf-8")
    documents = read_documents(str(source), input_format="auto", json_keys=["text"])
    assert [next(documents).texts, next(documents).texts] == [("a",), ("b",)]
    with pytest.raises(InputError, match=r"lazy.jsonl:3: not valid JSON"):
        next(documents)


@pytest.mark.parametrize(
    "content, flags, message",
    [
        ('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', GPT2_FLAGS, r"bad.jsonl:3: not valid JSON"),
        (
            '{"text": "ok"}\n{"body": "x", "id": 1}\n',
            GPT2_FLAGS,
            r"bad.jsonl:2: no key 'text' \(keys: body, id\)",
        ),
        ('{"text": ["a", "b"]}\n', GPT2_FLAGS, r"bad.jsonl:1: key 'text' holds list, not a string"),
        ('["text"]\n', GPT2_FLAGS, r"bad.jsonl:1: expected a JSON object, got list"),
        (
            '{"text": "1 2"}\n{"text": "3 x"}\n',
            ["--tokenizer-type", "NullTokenizer", "--vocab-size", "8"],
            r"line 2: NullTokenizer: 'x' is not an integer token id",
        ),
        (
            '{"text": "1 9"}\n',
            ["--tokenizer-type", "NullTokenizer", "--vocab-size", "8"],
            r"line 1: NullTokenizer: token id 9 is outside \[0, 9\)",
        ),
        ('{"text": "ok"}\n', ["--tokenizer-type", "NullTokenizer"], r"NullTokenizer needs --vocab-size"),
        (
            '{"text": "ok"}\n',
            ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", VOCAB],
            r"needs --vocab-file and --merge-file",
        ),
        (
            '{"text": "ok"}\n',
            [*GPT2_FLAGS[:2], "--vocab-file", "/nonexistent/vocab.json", "--merge-file", MERGES],
            r"vocab file not found: /nonexistent/vocab.json",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_no_output(
    tool: ModuleType, tmp_path: Path, capsys, content: str, flags: list[str], message: str
) -> None:
    source = tmp_path / "bad.jsonl"
    source.write_text(content, encoding="utf-8")
    assert tool.main(["--input", str(source), "--output-prefix", str(tmp_path / "out"), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preprocess_data: error: ")
    assert re.search(message, err[-1]), err[-1]
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_missing_input_and_missing_output_directory(tool: ModuleType, tmp_path: Path, capsys) -> None:
    missing = ["--input", str(tmp_path / "none.jsonl"), "--output-prefix", str(tmp_path / "o")]
    assert tool.main([*missing, *GPT2_FLAGS]) == 1
    assert f"input file not found: {tmp_path / 'none.jsonl'}" in capsys.readouterr().err
    argv = ["--input", str(CORPUS), "--output-prefix", str(tmp_path / "no" / "such" / "o"), *GPT2_FLAGS]
    assert tool.main(argv) == 1
    assert "output directory" in capsys.readouterr().err


def test_runs_as_a_script_from_the_repository_root(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    script = [sys.executable, "tools/preprocess_data.py", *GPT2_FLAGS, "--append-eod"]
    ok = subprocess.run(
        [*script, "--input", str(CORPUS), "--output-prefix", str(tmp_path / "c")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "c_text_document.idx").is_file() and (tmp_path / "c_text_document.bin").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    failed = subprocess.run(
        [*script, "--input", str(bad), "--output-prefix", str(tmp_path / "b")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert f"preprocess_data: error: {bad}:2: not valid JSON" in failed.stderr
    assert not list(tmp_path.glob("b_*"))
