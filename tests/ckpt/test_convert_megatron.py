"""Conversions of megatron-written checkpoints across layouts and formats, checked two ways.

1. Every hop of a chain of re-layouts gives full tensors identical to the live run's (our readers), and
   the last hop gives back the original legacy files tensor for tensor (model, Adam state, DistOpt
   buffers).
2. megatron-core itself loads the converted checkpoints at the target layout (legacy: ``load_state_dict``
   of the rank's file into a real GPTModel and megatron optimizer, as Megatron-LM's ``load_checkpoint``
   does; torch_dist: ``dist_checkpointing.load``) and the full tensors are bit-identical, the eval loss of
   a fixed batch and the next two training losses equal the uninterrupted run's (fp32 tolerance; bf16
   across a TP change).
"""

from __future__ import annotations

import os
from typing import Any

import helpers
import pytest
import torch
from checks import assert_loaded_like_ref, check_dir, reference
from conftest import Saved

from megatron_unicron.ckpt import open_checkpoint
from megatron_unicron.ckpt.convert import convert
from megatron_unicron.ckpt.torch_zip import TorchZipReader, materialize


def _hop(src: str, dst: str, tp: int, pp: int, fmt: str, **kw: Any) -> str:
    report = convert(src, dst, tp=tp, pp=pp, fmt=fmt, **kw)
    assert report.ok, report.to_text()
    return dst


def _rank_files(root: str) -> dict[str, Any]:
    it = os.path.join(root, "iter_0000002")
    out = {}
    for d in sorted(os.listdir(it)):
        for f in sorted(os.listdir(os.path.join(it, d))):
            out[f"{d}/{f}"] = materialize(TorchZipReader(os.path.join(it, d, f)).load())
    return out


def _dcp_layout(root: str) -> dict[str, Any]:
    """Key -> global shape (tensors) or "bytes" (objects) of a torch_dist checkpoint's DCP metadata."""
    import pickle

    with open(os.path.join(root, "iter_0000002", ".metadata"), "rb") as f:
        meta = pickle.load(f)
    return {k: tuple(getattr(v, "size", ())) or "bytes" for k, v in meta.state_dict_metadata.items()}


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), (path, list(a)[:8], list(b)[:8])
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


@pytest.mark.slow
def test_chain_a_swiglu_gqa_exact(mcore_a: Saved, tmp_path: Any) -> None:
    """legacy TP2PP2 -> dist TP1PP1 -> legacy TP2PP1 -> dist TP1PP2 -> legacy TP2PP2 (GQA: TP <= 2)."""
    ref = reference(mcore_a.ref)
    d11 = _hop(mcore_a.legacy, str(tmp_path / "d11"), 1, 1, "torch_dist")
    check_dir(d11, ref)
    l21 = _hop(d11, str(tmp_path / "l21"), 2, 1, "torch")
    check_dir(l21, ref)
    d12 = _hop(l21, str(tmp_path / "d12"), 1, 2, "torch_dist")
    check_dir(d12, ref)
    l22 = _hop(d12, str(tmp_path / "l22"), 2, 2, "torch")
    dist_opt = _hop(mcore_a.legacy, str(tmp_path / "do21"), 2, 1, "torch", target_optimizer="distributed")
    check_dir(l22, ref)
    # the RNG state cannot survive a layout change (its streams belong to TP/PP ranks): compare the rest
    back = _rank_files(l22)
    assert all("rng_state" not in f for f in back.values())
    orig = _rank_files(mcore_a.legacy)
    for name, a in orig.items():
        b = back[name]
        for key in ("model", "optimizer", "opt_param_scheduler", "iteration", "checkpoint_version"):
            _assert_same(a[key], b[key], f"{name}:{key}")
        assert b["args"].no_save_rng is True
        assert {k: v for k, v in vars(a["args"]).items() if k != "no_save_rng"} == {
            k: v for k, v in vars(b["args"]).items() if k != "no_save_rng"
        }
    # megatron's torch_dist -> legacy -> our torch_dist: megatron's keys, global shapes and objects
    back = _hop(
        _hop(mcore_a.dist, str(tmp_path / "ml"), 2, 2, "torch"), str(tmp_path / "md"), 2, 2, "torch_dist"
    )
    check_dir(back, ref)
    assert _dcp_layout(back) == _dcp_layout(mcore_a.dist)
    # megatron-core loads the hops at their layouts (world of 4 ranks; DP fills the rest)
    results = helpers.load_run(
        4,
        mcore_a.cfg,
        mcore_a.ref,
        [
            ("torch_dist", d11, 1, 1),
            ("torch", l21, 2, 1),
            ("torch_dist", d12, 1, 2),
            ("torch", dist_opt, 2, 1, "distopt"),
        ],
        str(tmp_path / "loads.json"),
    )
    assert_loaded_like_ref(results)


@pytest.mark.slow
def test_chain_b_distopt_exact(mcore_b: Saved, tmp_path: Any) -> None:
    """DistOpt legacy files: TP2PP2 -> TP1PP1 -> TP4PP1 -> TP2PP2 gives the same files back."""
    ref = reference(mcore_b.ref)
    l11 = _hop(mcore_b.legacy, str(tmp_path / "l11"), 1, 1, "torch")
    check_dir(l11, ref)
    l41 = _hop(l11, str(tmp_path / "l41"), 4, 1, "torch")
    check_dir(l41, ref)
    l22 = _hop(l41, str(tmp_path / "l22"), 2, 2, "torch")
    orig, back = _rank_files(mcore_b.legacy), _rank_files(l22)
    assert list(orig) == list(back)
    for name, a in orig.items():
        b = back[name]
        if name.endswith("distrib_optim.pt"):
            _assert_same(a, b, name)  # the flat per-bucket buffers, bit for bit
        else:
            for key in ("model", "optimizer", "opt_param_scheduler", "iteration"):
                _assert_same(a[key], b[key], f"{name}:{key}")
    # torch_dist by megatron (DistOpt fully_reshardable) -> our torch_dist at PP4 and plain-Adam legacy
    d14 = _hop(mcore_b.dist, str(tmp_path / "d14"), 1, 4, "torch_dist")
    p12 = _hop(mcore_b.dist, str(tmp_path / "p12"), 1, 2, "torch", target_optimizer="plain")
    results = helpers.load_run(
        4,
        mcore_b.cfg,
        mcore_b.ref,
        [
            ("torch", l41, 4, 1),
            ("torch_dist", d14, 1, 4),
            ("torch", p12, 1, 2, "plain"),
            ("torch", l22, 2, 2),
        ],
        str(tmp_path / "loads.json"),
    )
    assert_loaded_like_ref(results)
    assert results[-1]["traj"] == results[-1]["ref_traj"]  # same layout: bit-identical continuation


@pytest.mark.slow
def test_mixed_precision_c(mcore_c: Saved, tmp_path: Any) -> None:
    """bf16 params with fp32 main params: legacy -> TP1PP2, and -> torch_dist for a distributed optimizer."""
    ref = reference(mcore_c.ref)
    l12 = _hop(mcore_c.legacy, str(tmp_path / "l12"), 1, 2, "torch")
    check_dir(l12, ref)
    dd = _hop(mcore_c.legacy, str(tmp_path / "dd21"), 2, 1, "torch_dist", target_optimizer="distributed")
    check_dir(dd, ref)
    results = helpers.load_run(
        2,
        mcore_c.cfg,
        mcore_c.ref,
        [("torch", l12, 1, 2), ("torch_dist", dd, 2, 1, "distopt")],
        str(tmp_path / "loads.json"),
    )
    for r in results:
        assert r["diffs"] == {} and r["extra_keys"] == [], r["ckpt"]
    assert_loaded_like_ref(results[1:])  # same TP: exact
    assert_loaded_like_ref(results[:1], tol=1e-4)  # bf16 matmuls re-associate across a TP change


@pytest.mark.slow
def test_distopt_several_buckets_d(mcore_d: Saved, tmp_path: Any) -> None:
    """``distrib_optim.pt`` with several padded buckets: offsets skip the bucket padding.

    The reference's optimizer tensors cannot serve here: megatron-core 0.16.1's ``fully_reshardable`` sharded
    state dict indexes the unpadded world buffers with padded offsets once a buffer has several buckets, so
    its optimizer tensors (and megatron's own torch_dist save) are shifted. The oracles are the fp32 main
    params (equal to the fp32 parameters), the model tensors, bit-identical files after a round trip, and the
    next two training losses after megatron-core loads the converted files.
    """
    src = open_checkpoint(mcore_d.legacy)
    for key in src.tensors:
        if key.startswith("optimizer.state.fp32_param."):
            assert torch.equal(src.full_tensor(key), src.full_tensor(key.split(".", 3)[3])), key
    ref = reference(mcore_d.ref)
    for key, value in ref["full"].items():
        if not key.startswith("optimizer."):
            assert torch.equal(src.full_tensor(key), value), key
    l11 = _hop(mcore_d.legacy, str(tmp_path / "l11"), 1, 1, "torch")
    l12 = _hop(l11, str(tmp_path / "l12"), 1, 2, "torch")
    orig, back = _rank_files(mcore_d.legacy), _rank_files(l12)
    for name, a in orig.items():
        if name.endswith("distrib_optim.pt"):
            _assert_same(a, back[name], name)
    results = helpers.load_run(
        2,
        mcore_d.cfg,
        mcore_d.ref,
        [("torch", l11, 1, 1), ("torch", l12, 1, 2)],
        str(tmp_path / "loads.json"),
    )
    for r in results:
        assert not [k for k in r["diffs"] if not k.startswith("optimizer.")], r["ckpt"]
    assert_loaded_like_ref(
        [dict(r, diffs={}) for r in results]  # optimizer diffs are the reference's (see above)
    )
