"""Assertions shared by the checkpoint tests."""

from __future__ import annotations

import os
from typing import Any

import torch

from megatron_unicron.ckpt.source import CheckpointSource, open_checkpoint


def reference(path: str) -> dict[str, Any]:
    """The reference file of a save run, with DistOpt's ``param`` keys named ``fp32_param``."""
    ref: dict[str, Any] = torch.load(path, weights_only=False)
    ref["full"] = {
        k.replace("optimizer.state.param.", "optimizer.state.fp32_param."): v for k, v in ref["full"].items()
    }
    return ref


def assert_tensors_equal_ref(src: CheckpointSource, ref: dict[str, Any], *, optimizer: bool = True) -> None:
    """Every reference tensor is in ``src`` with the same shape and bit-identical values."""
    full = ref["full"]
    expected = {k for k in full if optimizer or not k.startswith("optimizer.")}
    got = {k for k in src.tensors if optimizer or not k.startswith("optimizer.")}
    assert got == expected, (sorted(got - expected)[:5], sorted(expected - got)[:5])
    for k in sorted(expected):
        t = src.full_tensor(k)
        assert t.dtype == full[k].dtype, k
        assert t.shape == full[k].shape, (k, t.shape, full[k].shape)
        assert torch.equal(t, full[k]), (k, float((t.double() - full[k].double()).abs().max()))


def check_dir(path: str, ref: dict[str, Any], **kw: Any) -> CheckpointSource:
    """Open ``path`` and compare it with ``ref``."""
    src = open_checkpoint(path)
    assert_tensors_equal_ref(src, ref, **kw)
    return src


def no_partial_output(save_dir: str) -> None:
    """Neither ``save_dir`` nor a temporary sibling of it exists."""
    parent = os.path.dirname(os.path.abspath(save_dir))
    assert not os.path.exists(save_dir), save_dir
    if os.path.isdir(parent):
        leftovers = [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(save_dir)}.partial-")]
        assert not leftovers, leftovers


def assert_loaded_like_ref(results: list[dict[str, Any]], *, tol: float = 2e-6) -> None:
    """Megatron-core load results: identical full tensors, eval loss and next losses within ``tol``."""
    for r in results:
        assert r["diffs"] == {}, (r["ckpt"], list(r["diffs"].items())[:3])
        assert r["extra_keys"] == [], (r["ckpt"], r["extra_keys"][:3])
        assert abs(r["eval"] - r["ref_eval"]) <= tol * abs(r["ref_eval"]), (
            r["ckpt"],
            r["eval"],
            r["ref_eval"],
        )
        for a, b in zip(r["traj"], r["ref_traj"]):
            assert abs(a - b) <= tol * abs(b), (r["ckpt"], r["traj"], r["ref_traj"])
