"""Datasets (mock and indexed, through megatron-core's builder), tokenizers and the DP sampler.

Run as a script (`python tests/test_data.py --worker ...`), this file is also one rank of the
multi-process test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a worker script
    sys.path.insert(0, str(REPO))

from megatron_unicron.megatron.data import (  # noqa: E402
    BATCH_KEYS,
    DatasetExhaustedError,
    GPT2BPETokenizer,
    NullTokenizer,
    build_datasets,
    build_tokenizer,
    eval_microbatches_for_rank,
    global_batch_tokens,
    microbatch_sample_indices,
    microbatches_for_rank,
    padded_vocab_size,
)
from megatron_unicron.megatron.preprocess import preprocess  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
VOCAB = str(FIXTURES / "gpt2_tiny" / "vocab.json")
MERGES = str(FIXTURES / "gpt2_tiny" / "merges.txt")
CORPUS = FIXTURES / "tiny_corpus.jsonl"
SEQ = 16


def corpus_texts() -> list[str]:
    with open(CORPUS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def build_indexed(prefix: str, cache: str, **overrides):
    kwargs = dict(
        data_path=[prefix],
        mock=False,
        split="80,20,0",
        seq_length=SEQ,
        seed=1234,
        tokenizer=GPT2BPETokenizer(VOCAB, MERGES),
        train_samples=64,
        valid_samples=16,
        test_samples=0,
        data_cache_path=cache,
    )
    kwargs.update(overrides)
    return build_datasets(**kwargs)


def build_mock(seed: int = 1234, **overrides):
    kwargs = dict(
        data_path=None,
        mock=True,
        split="1,1,1",
        seq_length=SEQ,
        seed=seed,
        tokenizer=NullTokenizer(255),
        train_samples=256,
        valid_samples=32,
        test_samples=32,
        data_cache_path=None,
    )
    kwargs.update(overrides)
    return build_datasets(**kwargs)


@pytest.fixture(scope="module")
def indexed_prefix(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("indexed") / "corpus"
    preprocess(
        input_path=str(CORPUS),
        output_prefix=str(out),
        tokenizer=GPT2BPETokenizer(VOCAB, MERGES),
        append_eod=True,
    )
    return f"{out}_text_document"


@pytest.fixture(scope="module")
def mock():
    return build_mock()


# ---------------------------------------------------------------- tokenizers and vocab padding


@pytest.mark.parametrize(
    "vocab, divisible_by, tp, padded",
    [  # as Megatron-LM logs them: "padded vocab (size: 50257) with 47 dummy tokens (new size: 50304)"
        (50257, 128, 1, 50304),
        (50257, 128, 2, 50432),
        (50257, 128, 4, 50688),
        (50257, 128, 8, 51200),
        (32000, 128, 1, 32000),
        (32001, 128, 1, 32128),
        (256, 128, 1, 256),
        (1025, 128, 2, 1280),
        (101, 1, 1, 101),
    ],
)
def test_padded_vocab_size_table(vocab: int, divisible_by: int, tp: int, padded: int) -> None:
    assert padded_vocab_size(vocab, divisible_by, tp) == padded


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300_000), st.integers(1, 1024), st.integers(1, 16))
def test_padded_vocab_size_is_the_smallest_multiple_at_or_above(
    vocab: int, divisible_by: int, tp: int
) -> None:
    after = vocab  # Megatron-LM's original loop
    while after % (divisible_by * tp):
        after += 1
    assert padded_vocab_size(vocab, divisible_by, tp) == after


def test_padded_vocab_size_rejects_non_positive() -> None:
    with pytest.raises(ValueError, match="--tensor-model-parallel-size must be a positive integer"):
        padded_vocab_size(50257, 128, 0)


def test_null_tokenizer_matches_megatron() -> None:
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=100, vocab_file=None, merge_file=None)
    assert (tokenizer.vocab_size, tokenizer.eod) == (101, 100)
    assert tokenizer.tokenize("5 0  99\n100") == [5, 0, 99, 100]
    assert tokenizer.detokenize([5, 0, 99]) == "5 0 99"
    assert tokenizer.tokenize("") == []
    with pytest.raises(ValueError, match=r"token id 101 is outside \[0, 101\)"):
        tokenizer.tokenize("1 101")
    with pytest.raises(ValueError, match="'a1' is not an integer token id"):
        tokenizer.tokenize("a1")


def test_gpt2_tokenizer_on_the_fixture(tmp_path: Path) -> None:
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_size=None, vocab_file=VOCAB, merge_file=MERGES)
    vocab = json.loads(Path(VOCAB).read_text(encoding="utf-8"))
    assert tokenizer.vocab_size == len(vocab) == 472
    assert tokenizer.eod == vocab["<|endoftext|>"] == len(vocab) - 1
    for text in corpus_texts():
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < tokenizer.eod for i in ids)
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.tokenize("The the") == [vocab["The"], vocab["Ġthe"]]  # GPT-2: space joins the next word
    # The dataset cache key follows the files' content, not their path.
    shutil.copy(VOCAB, tmp_path / "v.json")
    shutil.copy(MERGES, tmp_path / "m.txt")
    moved = GPT2BPETokenizer(str(tmp_path / "v.json"), str(tmp_path / "m.txt"))
    assert moved.unique_identifiers == tokenizer.unique_identifiers
    (tmp_path / "m.txt").write_text("#version: 0.2\nh e\n", encoding="utf-8")
    changed = GPT2BPETokenizer(str(tmp_path / "v.json"), str(tmp_path / "m.txt"))
    assert changed.unique_identifiers != tokenizer.unique_identifiers


def test_build_tokenizer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported --tokenizer-type 'Llama'; choose one of GPT2BPE"):
        build_tokenizer("Llama", vocab_size=None, vocab_file=None, merge_file=None)
    with pytest.raises(ValueError, match="NullTokenizer needs --vocab-size"):
        build_tokenizer("NullTokenizer", vocab_size=None, vocab_file=None, merge_file=None)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        build_tokenizer("NullTokenizer", vocab_size=0, vocab_file=None, merge_file=None)
    no_eod = tmp_path / "vocab.json"
    no_eod.write_text(json.dumps({"a": 0, "b": 1}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no <\|endoftext\|> token"):
        build_tokenizer("GPT2BPETokenizer", vocab_size=None, vocab_file=str(no_eod), merge_file=MERGES)
    no_eod.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        build_tokenizer("GPT2BPETokenizer", vocab_size=None, vocab_file=str(no_eod), merge_file=MERGES)
    with pytest.raises(FileNotFoundError, match="merge file not found"):
        build_tokenizer("GPT2BPETokenizer", vocab_size=None, vocab_file=VOCAB, merge_file=str(tmp_path / "x"))


# ---------------------------------------------------------------- the sampler


def megatron_sampler_microbatches(consumed: int, micro: int, dp_rank: int, dp_size: int, count: int):
    """MegatronPretrainingSampler's iteration, restated: walk the samples from `consumed` in
    groups of micro × dp and give this rank its slice of each group."""
    group: list[int] = []
    out = []
    index = consumed
    while len(out) < count:
        group.append(index)
        index += 1
        if len(group) == micro * dp_size:
            out.append(group[dp_rank * micro : (dp_rank + 1) * micro])
            group = []
    return out


@settings(max_examples=200, deadline=None)
@given(
    consumed=st.integers(0, 1000),
    micro=st.integers(1, 4),
    dp_size=st.integers(1, 8),
    count=st.integers(1, 6),
    data=st.data(),
)
def test_sample_indices_follow_megatron_pretraining_sampler(consumed, micro, dp_size, count, data) -> None:
    dp_rank = data.draw(st.integers(0, dp_size - 1))
    got = microbatch_sample_indices(
        consumed_samples=consumed,
        global_batch_size=count * micro * dp_size,
        micro_batch_size=micro,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    assert [list(r) for r in got] == megatron_sampler_microbatches(consumed, micro, dp_rank, dp_size, count)


def test_sample_indices_example() -> None:
    ranks = [
        microbatch_sample_indices(
            consumed_samples=16, global_batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=2
        )
        for r in range(2)
    ]
    assert [[list(m) for m in rank] for rank in ranks] == [[[16, 17], [20, 21]], [[18, 19], [22, 23]]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=4), "not divisible by micro"),
        (dict(global_batch_size=8, micro_batch_size=2, dp_rank=2, dp_size=2), r"rank 2 is outside \[0, 2\)"),
        (dict(global_batch_size=8, micro_batch_size=0, dp_rank=0, dp_size=2), "micro batch size must be"),
    ],
)
def test_sampler_rejects_bad_layouts(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        microbatch_sample_indices(consumed_samples=0, **kwargs)


def rank_major(dataset, consumed: int, gbs: int, micro: int, dp: int) -> torch.Tensor:
    per_rank = [
        microbatches_for_rank(
            dataset,
            consumed_samples=consumed,
            global_batch_size=gbs,
            micro_batch_size=micro,
            dp_rank=r,
            dp_size=dp,
        )
        for r in range(dp)
    ]
    count = len(per_rank[0])
    return torch.cat([per_rank[r][m]["tokens"] for m in range(count) for r in range(dp)])


@pytest.mark.parametrize("dp, micro", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_global_batch_is_the_same_for_any_dp(mock, dp: int, micro: int) -> None:
    for consumed in (0, 8, 40):
        expected = global_batch_tokens(mock.train, consumed, 8)
        assert torch.equal(rank_major(mock.train, consumed, 8, micro, dp), expected)
    first, second = global_batch_tokens(mock.train, 0, 8), global_batch_tokens(mock.train, 8, 8)
    assert not torch.equal(first, second)


def test_microbatch_format_is_megatrons_get_batch(mock) -> None:
    batches = microbatches_for_rank(
        mock.train, consumed_samples=24, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2
    )
    assert len(batches) == 2
    for batch in batches:
        assert tuple(batch) == BATCH_KEYS
        tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        mask, positions = batch["attention_mask"], batch["position_ids"]
        assert tokens.shape == labels.shape == loss_mask.shape == positions.shape == (2, SEQ)
        assert tokens.dtype == labels.dtype == positions.dtype == torch.int64
        assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
        assert torch.equal(loss_mask, torch.ones(2, SEQ))
        assert torch.equal(positions, torch.arange(SEQ).expand(2, SEQ))
        assert mask.dtype == torch.bool and mask.shape == (2, 1, SEQ, SEQ)
        assert torch.equal(mask[0, 0], torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1))  # True = masked
        assert int(tokens.max()) < 256  # NullTokenizer(255): ids below vocab_size 256
    no_mask = build_mock(create_attention_mask=False)
    batch = microbatches_for_rank(
        no_mask.train, consumed_samples=0, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1
    )[0]
    assert batch["attention_mask"] is None and batch["tokens"].shape == (2, SEQ)


def test_mock_data_is_deterministic_for_a_seed(mock) -> None:
    again = build_mock()
    other = build_mock(seed=4321)
    for consumed in (0, 64, 248):
        assert torch.equal(
            global_batch_tokens(mock.train, consumed, 8), global_batch_tokens(again.train, consumed, 8)
        )
    assert not torch.equal(global_batch_tokens(mock.train, 0, 8), global_batch_tokens(other.train, 0, 8))
    assert torch.equal(global_batch_tokens(mock.valid, 0, 8), global_batch_tokens(again.valid, 0, 8))


def test_eval_batches_and_exhaustion(mock) -> None:
    for consumed in (0, 8, 24):
        got = eval_microbatches_for_rank(
            mock.valid,
            consumed_valid_samples=consumed,
            global_batch_size=8,
            micro_batch_size=2,
            dp_rank=0,
            dp_size=2,
        )
        expected = global_batch_tokens(mock.valid, consumed, 8)
        assert torch.equal(torch.cat([got[0]["tokens"], got[1]["tokens"]]), expected[[0, 1, 4, 5]])
    end = len(mock.valid)
    with pytest.raises(
        DatasetExhaustedError, match=f"consumed_valid_samples={end - 4} needs samples up to {end + 4}"
    ):
        eval_microbatches_for_rank(
            mock.valid,
            consumed_valid_samples=end - 4,
            global_batch_size=8,
            micro_batch_size=2,
            dp_rank=0,
            dp_size=2,
        )
    with pytest.raises(DatasetExhaustedError, match="consumed_samples"):
        global_batch_tokens(mock.train, len(mock.train) - 1, 2)


# ---------------------------------------------------------------- indexed datasets


def test_indexed_samples_are_windows_of_the_documents(indexed_prefix: str, tmp_path: Path) -> None:
    tokenizer = GPT2BPETokenizer(VOCAB, MERGES)
    texts = corpus_texts()
    bodies = {tuple(tokenizer.tokenize(t)): t for t in texts}
    datasets = build_indexed(indexed_prefix, str(tmp_path / "cache"), seq_length=64, train_samples=32)
    assert datasets.test is None  # --split 80,20,0
    assert len(datasets.train) >= 32 and len(datasets.valid) >= 16
    whole = set()
    for dataset in (datasets.train, datasets.valid):
        for i in range(len(dataset)):
            sample = dataset[i]
            stream = sample["tokens"].tolist() + sample["labels"][-1:].tolist()
            pieces = _split_at(stream, tokenizer.eod)
            for piece in pieces[1:-1]:  # between two eods: a whole document
                assert piece in bodies, tokenizer.detokenize(list(piece))
                whole.add(piece)
            for edge in (pieces[0], pieces[-1]):  # a document's end or start
                assert any(_contains(body, edge) for body in bodies), (
                    f"sample {i}: {tokenizer.detokenize(list(edge))!r} is in no document"
                )
    assert len(whole) >= 5
    assert all(tokenizer.detokenize(list(body)) == bodies[body] for body in whole)


def _split_at(stream: list[int], separator: int) -> list[tuple[int, ...]]:
    pieces: list[tuple[int, ...]] = [()]
    for token in stream:
        if token == separator:
            pieces.append(())
        else:
            pieces[-1] += (token,)
    return pieces


def _contains(body: tuple[int, ...], part: tuple[int, ...]) -> bool:
    return any(body[k : k + len(part)] == part for k in range(len(body) - len(part) + 1))


def test_indexed_dp_invariance_and_determinism(indexed_prefix: str, tmp_path: Path) -> None:
    first = build_indexed(indexed_prefix, str(tmp_path / "a"))
    second = build_indexed(indexed_prefix, str(tmp_path / "b"))  # built from scratch again
    for consumed in (0, 16, 48):
        expected = global_batch_tokens(first.train, consumed, 16)
        assert torch.equal(global_batch_tokens(second.train, consumed, 16), expected)
        for dp, micro in ((1, 2), (2, 2), (4, 1), (4, 4)):
            assert torch.equal(rank_major(first.train, consumed, 16, micro, dp), expected)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(data_path=None), ValueError, "no data: give --data-path"),
        (dict(mock=True), ValueError, "either --mock-data or --data-path"),
        (
            dict(data_path=["/nonexistent/corpus"]),
            FileNotFoundError,
            r"/nonexistent/corpus.bin and .*idx not found",
        ),
        (dict(split="80;20"), ValueError, "--split '80;20' must be up to three"),
        (dict(split="0,1,0"), ValueError, "gives the train split no data"),
        (dict(split="99,1,0"), ValueError, "leaves the valid split none of them: change --split"),
        (dict(split="99,1,0", valid_samples=0), ValueError, "leaves the valid split none of them"),
        (dict(seq_length=0), ValueError, "--seq-length must be positive"),
        (dict(train_samples=-1), ValueError, "train samples must be >= 0"),
    ],
)
@pytest.mark.timeout(60)  # megatron-core alone would loop forever on an empty split
def test_build_datasets_rejects_bad_input(indexed_prefix, tmp_path, overrides, error, message) -> None:
    with pytest.raises(error, match=message):
        build_indexed(indexed_prefix, str(tmp_path / "cache"), **overrides)


def test_a_split_of_weight_zero_is_none(indexed_prefix: str, tmp_path: Path) -> None:
    datasets = build_indexed(indexed_prefix, str(tmp_path / "c"), split="100,0,0", valid_samples=0)
    assert datasets.valid is None and datasets.test is None
    assert datasets.train is not None and len(datasets.train) >= 64


# ---------------------------------------------------------------- several processes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_gloo_ranks_build_once_and_agree(indexed_prefix: str, tmp_path: Path) -> None:
    """Rank 0 builds the index cache, rank 1 reads it after megatron's barrier; each rank's DP=2
    micro-batches, joined rank-major, are the global batches a single process builds on its own;
    then a lone process without any process group (a restarted worker) reads the same cache."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="error")
    cache = tmp_path / "cache"

    def worker(rank: int, world: int) -> subprocess.Popen:
        argv = [sys.executable, str(Path(__file__)), "--worker", str(rank), str(world), str(store.port)]
        argv += [indexed_prefix, str(cache), str(tmp_path / f"rank{rank}-of-{world}.pt")]
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [worker(r, 2) for r in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out
    index_files = sorted(cache.rglob("*.npy"))
    assert index_files, "rank 0 wrote no index cache"
    stamps = [f.stat().st_mtime_ns for f in index_files]
    lone = worker(0, 1)
    out, _ = lone.communicate(timeout=240)
    assert lone.returncode == 0, out
    assert [f.stat().st_mtime_ns for f in index_files] == stamps  # read, not rebuilt

    reference = build_indexed(indexed_prefix, str(tmp_path / "own"))
    mock_reference = build_mock()
    results = [torch.load(tmp_path / f"rank{r}-of-2.pt") for r in range(2)]
    alone = torch.load(tmp_path / "rank0-of-1.pt")
    for name, dataset in (("indexed", reference.train), ("mock", mock_reference.train)):
        for consumed in (0, 8):
            expected = global_batch_tokens(dataset, consumed, 8)
            joined = torch.cat([results[r][name][consumed][m] for m in range(2) for r in range(2)])
            assert torch.equal(joined, expected), (name, consumed)
            assert torch.equal(torch.cat(alone[name][consumed]), expected), (name, consumed)


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rank", type=int)
    parser.add_argument("world", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("prefix")
    parser.add_argument("cache")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.world > 1:
        store = torch.distributed.TCPStore(
            "127.0.0.1", args.port, is_master=False, timeout=timedelta(seconds=60)
        )
        torch.distributed.init_process_group(
            "gloo", store=store, rank=args.rank, world_size=args.world, timeout=timedelta(seconds=60)
        )
    datasets = {
        "indexed": build_indexed(args.prefix, args.cache).train,
        "mock": build_mock().train,
    }
    dp_rank, dp_size = (args.rank, args.world)
    result = {
        name: {
            consumed: [
                batch["tokens"]
                for batch in microbatches_for_rank(
                    dataset,
                    consumed_samples=consumed,
                    global_batch_size=8,
                    micro_batch_size=2,
                    dp_rank=dp_rank,
                    dp_size=dp_size,
                )
            ]
            for consumed in (0, 8)
        }
        for name, dataset in datasets.items()
    }
    torch.save(result, args.out)
    if args.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker_main(sys.argv[2:])
