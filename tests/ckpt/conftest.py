"""Session fixtures: real megatron-core runs that wrote Megatron-LM checkpoints (legacy and torch_dist).

Each fixture trains a tiny GPT (4 layers, hidden 64, 4 heads, seq 32) for 2 iterations at its layout and
writes the same state in both formats plus a reference (full tensors, eval loss, next losses). Configs:

* ``mcore_a``: TP2PP2, SwiGLU, GQA (2 query groups), tied embeddings, RoPE, RMSNorm, no biases, vocab 100
  (padded to 128), fp32, megatron Adam;
* ``mcore_b``: TP2PP2, DistributedOptimizer (legacy ``distrib_optim.pt``), tied embeddings, learned absolute
  positions, LayerNorm with biases, vocab 128, fp32;
* ``mcore_c``: TP2PP1, bf16 parameters with fp32 main params (Float16Optimizer), untied embeddings, vocab 100;
* ``mcore_d``: TP1PP2, DistributedOptimizer with ``overlap_grad_reduce`` and 6000-element buckets (several
  padded buckets per grad buffer), tied embeddings (a bucket of their own on both stages).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers  # noqa: E402

CFG_A = dict(swiglu=True, groups=2, tied=True, vocab=100, make_div=32, pos="rope", norm="RMSNorm", bias=False)
CFG_B = dict(distopt=True, tied=True, vocab=128, make_div=32)
CFG_C = dict(dtype="bf16", tied=False, vocab=100, make_div=64)
CFG_D = dict(distopt=True, tied=True, vocab=128, make_div=32, overlap=True, bucket=6000)


@dataclass(frozen=True)
class Saved:
    root: str
    cfg: dict[str, Any]
    layout: tuple[int, int]

    @property
    def legacy(self) -> str:
        return os.path.join(self.root, "legacy")

    @property
    def dist(self) -> str:
        return os.path.join(self.root, "dist")

    @property
    def ref(self) -> str:
        return os.path.join(self.root, "ref.pt")


def _save(
    tmp_path_factory: pytest.TempPathFactory, name: str, cfg: dict[str, Any], layout: tuple[int, int]
) -> Saved:
    root = str(tmp_path_factory.mktemp(name))
    helpers.save_run(root, cfg, layout)
    return Saved(root, cfg, layout)


@pytest.fixture(scope="session")
def mcore_a(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _save(tmp_path_factory, "mcore_a", CFG_A, (2, 2))


@pytest.fixture(scope="session")
def mcore_b(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _save(tmp_path_factory, "mcore_b", CFG_B, (2, 2))


@pytest.fixture(scope="session")
def mcore_c(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _save(tmp_path_factory, "mcore_c", CFG_C, (2, 1))


@pytest.fixture(scope="session")
def mcore_d(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return _save(tmp_path_factory, "mcore_d", CFG_D, (1, 2))
