"""``python tools/convert_checkpoint.py`` from the repository root, as a user runs it."""

from __future__ import annotations

import json
from typing import Any

import helpers
import pytest
from checks import check_dir, no_partial_output, reference
from conftest import Saved


@pytest.mark.slow
def test_cli_converts_and_reports_json(mcore_a: Saved, tmp_path: Any) -> None:
    out = str(tmp_path / "out")
    p = helpers.convert(
        "--load-dir",
        mcore_a.legacy,
        "--save-dir",
        out,
        "--target-tensor-parallel-size",
        "1",
        "--target-pipeline-parallel-size",
        "2",
        "--ckpt-format",
        "torch_dist",
        "--json",
    )
    report = json.loads(p.stdout)
    assert (
        report["ok"] and report["target"]["layout"] == "TP1PP2" and report["target"]["format"] == "torch_dist"
    )
    totals = report["totals"]
    assert totals["status"] == {"identical": len(report["tensors"])}
    assert totals["peak_rss_bytes"] > totals["largest_tensor_bytes"] > 0
    emb = report["tensors"]["embedding.word_embeddings.weight"]
    assert emb["before"]["sha256"] == emb["after"]["sha256"] and emb["before"]["shape"] == [128, 64]
    check_dir(out, reference(mcore_a.ref))


@pytest.mark.slow
def test_cli_refusal_is_one_line(tmp_path: Any) -> None:
    missing = str(tmp_path / "nope")
    p = helpers.convert("--load-dir", missing, "--save-dir", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [
        f"unicron-convert: error: --load-dir {missing} is not a directory"
    ]
    no_partial_output(str(tmp_path / "o"))
    assert helpers.convert("--help").stdout.startswith("usage: unicron-convert")
