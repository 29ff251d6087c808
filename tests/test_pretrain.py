"""GPT pretraining through unicron-run: layouts agree, runs are reproducible, resume is exact, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_unicron.megatron.pretrain import report_once
from megatron_unicron.testing.harness import JobResult, assert_no_leaks, run_job

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples/gpt/pretrain_gpt.py")
YAML = str(ROOT / "examples/gpt/configs/tiny_gpt.yaml")
ITERS = 10
# gloo keeps one transport device per process once a group existed (an event loop, its wake-up pipe and
# a listening socket: 4 descriptors, replaced, never accumulated, by later groups); 2 more of slack.
FD_SLACK = 6
# The tiny job of tiny_gpt.yaml written as flags (the YAML must give the same run).
TINY_FLAGS = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--hidden-dropout", "0.0",
    "--attention-dropout", "0.0", "--init-method-std", "0.02", "--transformer-impl", "local",
    "--seq-length", "32", "--max-position-embeddings", "32", "--position-embedding-type", "learned_absolute",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--make-vocab-size-divisible-by", "32",
    "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8", "--seed", "1234", "--lr", "3.0e-3",
    "--min-lr", "3.0e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "3", "--weight-decay", "0.01",
    "--clip-grad", "1.0", "--log-interval", "1",
]  # fmt: skip


def train(
    tmp: Path, name: str, nproc: int, *extra: str, use_yaml: bool = True, iters: int = ITERS
) -> list[dict]:
    metrics = tmp / f"{name}.jsonl"
    config = ["--yaml-cfg", YAML] if use_yaml else TINY_FLAGS
    argv = [SCRIPT, *config, "--train-iters", str(iters), "--unicron-metrics-log", str(metrics), *extra]
    result = run_job(argv, nproc_per_node=nproc, timeout_s=240)
    assert result.returncode == 0, result.output[-3000:]
    assert_no_leaks(result, fd_slack=FD_SLACK)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def losses(records: list[dict]) -> list[float]:
    return [r["lm_loss"] for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """TP2 PP2 on 4 ranks, saving a checkpoint at iteration 5."""
    tmp = tmp_path_factory.mktemp("reference")
    records = train(tmp, "tp2pp2", 4, "--save", str(tmp / "ckpt"), "--save-interval", "5")
    return tmp, records


@pytest.mark.timeout(600)
def test_loss_falls_and_is_logged_in_megatrons_format(reference: tuple[Path, list[dict]]) -> None:
    _, records = reference
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    assert records[-1]["lm_loss"] < records[0]["lm_loss"] - 0.3
    assert records[0]["lm_loss"] == pytest.approx(math.log(128), abs=0.05)  # uniform over the vocabulary
    assert [r["consumed_samples"] for r in records] == [8 * i for i in range(1, ITERS + 1)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "name, nproc, tp, pp",
    [("tp1pp1", 1, 1, 1), ("tp2pp1", 2, 2, 1), ("tp1pp2", 2, 1, 2), ("dp2", 2, 1, 1)],
)
def test_layouts_give_the_same_loss_curve(
    reference: tuple[Path, list[dict]], tmp_path: Path, name: str, nproc: int, tp: int, pp: int
) -> None:
    _, base = reference
    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    records = train(tmp_path, name, nproc, *layout)
    assert losses(records) == pytest.approx(losses(base), rel=2e-6, abs=2e-6)


@pytest.mark.timeout(600)
def test_same_seed_twice_is_bit_identical(reference: tuple[Path, list[dict]], tmp_path: Path) -> None:
    _, base = reference
    records = train(tmp_path, "again", 4)
    assert losses(records) == losses(base)
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in base]


@pytest.mark.timeout(600)
def test_yaml_config_and_flags_give_the_same_run(reference: tuple[Path, list[dict]], tmp_path: Path) -> None:
    _, base = reference
    flags = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    records = train(tmp_path, "flags", 4, *flags, use_yaml=False)
    assert losses(records) == losses(base)


@pytest.mark.timeout(600)
def test_resume_from_checkpoint_is_exact(reference: tuple[Path, list[dict]], tmp_path: Path) -> None:
    tmp, base = reference
    ckpt = tmp / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    resume = tmp_path / "resume"
    resume.mkdir()
    (resume / "iter_0000005").symlink_to(ckpt / "iter_0000005")
    (resume / "latest_checkpointed_iteration.txt").write_text("5")
    records = train(tmp_path, "resumed", 4, "--load", str(resume))
    assert [r["iteration"] for r in records] == list(range(6, ITERS + 1))
    for resumed, original in zip(records, base[5:]):
        for key in ("lm_loss", "grad_norm", "lr", "consumed_samples"):
            assert resumed[key] == original[key], key


def bad_run(*flags: str, nproc: int = 4, use_yaml: bool = True) -> JobResult:
    config = ["--yaml-cfg", YAML] if use_yaml else []
    return run_job([SCRIPT, *config, "--train-iters", "4", *flags], nproc_per_node=nproc, timeout_s=120)


def error_lines(result: JobResult) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line and "unicron-run" not in line]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "flags, nproc, must_name",
    [
        (["--no-such-flag"], 4, "--no-such-flag"),
        (["--tensor-model-parallel-size", "3"], 4, "--tensor-model-parallel-size 3"),
        (["--num-layers", "3"], 4, "--num-layers"),
        (["--global-batch-size", "5"], 4, "--global-batch-size"),
        (
            [
                "--tensor-model-parallel-size",
                "1",
                "--pipeline-model-parallel-size",
                "1",
                "--global-batch-size",
                "6",
            ],
            4,
            "--global-batch-size",
        ),
        (
            ["--mock-data", "--data-path", "/nonexistent/corpus_text_document"],
            4,
            "/nonexistent/corpus_text_document",
        ),
        (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 3, "3"),
        (
            [
                "--global-batch-size",
                "2",
                "--micro-batch-size",
                "2",
                "--tensor-model-parallel-size",
                "1",
                "--pipeline-model-parallel-size",
                "1",
            ],
            4,
            "--global-batch-size",
        ),
    ],
    ids=[
        "unknown-flag",
        "tp-heads",
        "pp-layers",
        "batch-micro",
        "batch-dp",
        "missing-data",
        "world",
        "more-ranks",
    ],
)
def test_bad_input_is_one_line_naming_the_flag(flags: list[str], nproc: int, must_name: str) -> None:
    result = bad_run(*flags, nproc=nproc)
    assert result.returncode != 0
    assert "Traceback" not in result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert must_name in lines[0], lines[0]


def test_a_message_every_rank_finds_is_printed_once_per_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ranks of one launch attempt: error files <attempt>/<local_rank>/error.json, as both launchers lay out.
    for local_rank in (1, 0, 2):
        error_dir = tmp_path / "attempt_0" / str(local_rank)
        error_dir.mkdir(parents=True)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_dir / "error.json"))
        report_once(f"error: from local rank {local_rank}")
    (tmp_path / "attempt_1" / "0").mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "attempt_1" / "0" / "error.json"))
    report_once("error: next attempt")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    report_once("error: no launcher")
    report_once("error: no launcher")
    printed = capsys.readouterr().err.splitlines()
    assert printed == [
        "error: from local rank 1",
        "error: next attempt",
        "error: no launcher",
        "error: no launcher",
    ]


@pytest.mark.timeout(600)
def test_bad_yaml_key_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text(Path(YAML).read_text().replace("num_layers: 4", "num_layer: 4"))
    result = run_job(
        [SCRIPT, "--yaml-cfg", str(config), "--train-iters", "4"], nproc_per_node=4, timeout_s=120
    )
    assert result.returncode != 0 and "Traceback" not in result.output
    lines = error_lines(result)
    assert len(lines) == 1 and "num_layer" in lines[0] and "num_layers" in lines[0], result.stderr
