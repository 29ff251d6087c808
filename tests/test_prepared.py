"""Datasets prepared ahead (by a warm spare): served only for the same request, once, and quietly absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_unicron.megatron import data, prepared
from megatron_unicron.megatron.args import parse_args, resolve_world

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--yaml-cfg", str(ROOT / "examples/gpt/configs/tiny_gpt.yaml"), "--train-iters", "6"]


def _request(*more: str) -> prepared.DatasetRequest:
    return prepared.DatasetRequest.for_args(resolve_world(parse_args([*FLAGS, *more]), 4))


def test_prepared_datasets_are_served_once_for_the_same_request_only() -> None:
    assert prepared.prepare_from_argv(FLAGS, 4)
    assert prepared.waiting() == 1
    assert prepared.take(_request("--seed", "7")) is None  # other samples: the worker builds its own
    assert prepared.waiting() == 0
    assert prepared.prepare_from_argv(FLAGS, 4)
    ready = prepared.take(_request())
    assert ready is not None and prepared.take(_request()) is None  # once
    own = _request().build(data.build_tokenizer("NullTokenizer", vocab_size=127))
    assert ready.train is not None and own.train is not None and len(ready.train) == len(own.train) >= 6 * 8
    for index in (0, 17, 47):
        assert (ready.train[index]["tokens"] == own.train[index]["tokens"]).all()


def test_a_command_line_the_spare_cannot_use_prepares_nothing_and_says_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert not prepared.prepare_from_argv([*FLAGS, "--no-such-flag"], 4)
    assert not prepared.prepare_from_argv(FLAGS, 3)  # TP2 PP2 does not divide 3 ranks
    assert prepared.waiting() == 0
    assert capsys.readouterr() == ("", "")
