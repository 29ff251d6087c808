"""Converter features on megatron-written checkpoints: placeholders, vocabulary re-padding, TE names, API."""

from __future__ import annotations

import io
import os
import pickletools
import shutil
from typing import Any

import pytest
import torch
from checks import assert_tensors_equal_ref, check_dir, no_partial_output, reference
from conftest import Saved
from test_refusals import rewrite

from megatron_unicron.ckpt import open_checkpoint
from megatron_unicron.ckpt.convert import convert, main
from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.safe_unpickle import Placeholder, placeholder_class
from megatron_unicron.ckpt.torch_zip import TorchZipReader


def _ranks(root: str) -> list[str]:
    it = os.path.join(root, "iter_0000002")
    return [os.path.join(it, d, "model_optim_rng.pt") for d in sorted(os.listdir(it))]


def _globals(path: str) -> set[str]:
    reader = torch._C.PyTorchFileReader(path)
    out, strings = set(), []
    for op, arg, _ in pickletools.genops(bytes(reader.get_record("data.pkl"))):
        if op.name == "GLOBAL":
            out.add(str(arg).replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            out.add(f"{strings[-2]}.{strings[-1]}")
    return out


@pytest.mark.slow
def test_args_from_another_megatron_version(mcore_a: Saved, tmp_path: Any) -> None:
    """Enums the installed megatron-core lacks load as placeholders and are written back as themselves."""
    src = shutil.copytree(mcore_a.legacy, str(tmp_path / "in"))
    future = placeholder_class("megatron.training.future_enums", "SchedulerMode")
    renamed = placeholder_class("megatron.core.enums", "ModelTypeV2")
    for path in _ranks(src):
        rewrite(
            path,
            lambda o: (
                setattr(o["args"], "scheduler_mode", future(3)),
                setattr(o["args"], "model_type", renamed(1)),
            ),
        )
    assert "megatron.training.future_enums.SchedulerMode" in _globals(_ranks(src)[0])
    out = str(tmp_path / "out")
    report = convert(src, out, tp=1, pp=1, fmt="torch")
    assert report.ok
    path = _ranks(out)[0]
    assert {"megatron.training.future_enums.SchedulerMode", "megatron.core.enums.ModelTypeV2"} <= _globals(
        path
    )
    args = TorchZipReader(path).load()["args"]
    assert isinstance(args.scheduler_mode, Placeholder) and args.scheduler_mode.value == 3
    assert args.scheduler_mode.qualified_name == "megatron.training.future_enums.SchedulerMode"
    assert open_checkpoint(out).args.scheduler_mode == 3  # plain view
    check_dir(out, reference(mcore_a.ref))


@pytest.mark.slow
def test_vocab_repadding(mcore_a: Saved, tmp_path: Any) -> None:
    """A TP change that changes the padded vocabulary re-pads (zero rows) or trims rows and the arg."""
    ref = reference(mcore_a.ref)
    base = str(tmp_path / "tp1")
    assert convert(mcore_a.legacy, base, tp=1, pp=1, fmt="torch").ok
    for path in _ranks(base):  # as if trained with --make-vocab-size-divisible-by 128: TP1 pads 100 -> 128
        rewrite(path, lambda o: setattr(o["args"], "make_vocab_size_divisible_by", 128))
    wide = str(tmp_path / "tp2")
    report = convert(base, wide, tp=2, pp=1, fmt="torch_dist")  # TP2 pads 100 -> 256
    assert report.ok and report.keys["embedding.word_embeddings.weight"].status == "resized"
    src = open_checkpoint(wide)
    assert src.args.padded_vocab_size == 256
    for key in (
        "embedding.word_embeddings.weight",
        "optimizer.state.exp_avg.embedding.word_embeddings.weight",
    ):
        t = src.full_tensor(key)
        assert t.shape == (256, 64)
        assert torch.equal(t[:128], ref["full"][key]) and not t[128:].any()
    back = str(tmp_path / "back")
    assert convert(wide, back, tp=1, pp=1, fmt="torch").ok  # trims back to 128 rows: identical again
    check_dir(back, ref)
    # without the true vocabulary size the padded size is ambiguous
    for path in _ranks(base):
        rewrite(path, lambda o: delattr(o["args"], "vocab_size"))
    with pytest.raises(CheckpointError, match="pass --true-vocab-size"):
        convert(base, str(tmp_path / "x"), tp=2, pp=1)
    no_partial_output(str(tmp_path / "x"))
    assert convert(base, str(tmp_path / "y"), tp=2, pp=1, true_vocab_size=100).ok


@pytest.mark.slow
def test_transformer_engine_names(mcore_a: Saved, tmp_path: Any) -> None:
    """A TE-spec legacy checkpoint (fused norm names, core_attention extra state) converts both ways."""
    te = str(tmp_path / "te")
    assert convert(mcore_a.dist, te, fmt="torch", layer_spec="te").ok
    keys = list(TorchZipReader(_ranks(te)[0]).load()["model"])
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)
    src = open_checkpoint(te)
    assert src.layer_spec == "te"
    ref = reference(mcore_a.ref)
    assert_tensors_equal_ref(src, ref)
    local = str(tmp_path / "local")
    assert convert(te, local, tp=1, pp=2, layer_spec="local").ok
    assert "decoder.layers.0.input_layernorm.weight" in TorchZipReader(_ranks(local)[0]).load()["model"]
    check_dir(local, ref)


@pytest.mark.slow
def test_library_api(mcore_a: Saved) -> None:
    """``open_checkpoint``: format, iteration, plain args, common state, full tensors in sharded key space."""
    ref = reference(mcore_a.ref)
    for path, fmt in ((mcore_a.legacy, "torch"), (mcore_a.dist, "torch_dist")):
        with open_checkpoint(path) as src:
            assert src.format == fmt and src.iteration == 2
            assert src.args.tensor_model_parallel_size == 2 and src.args.params_dtype == "float32"
            key = "decoder.layers.mlp.linear_fc1.weight"
            assert src.tensors[key].stacked and src.tensors[key].shape == (4, 512, 64)
            assert torch.equal(src.full_tensor(key), ref["full"][key])
            assert torch.equal(src.read(key, 3), ref["full"][key][3])
            assert src.common.opt_param_scheduler is not None
            assert src.spec.swiglu and src.spec.num_query_groups == 2 and src.spec.tied


@pytest.mark.slow
def test_no_optimizer_and_json(mcore_a: Saved, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    out = str(tmp_path / "m")
    rc = main(
        [
            "--load-dir",
            mcore_a.dist,
            "--save-dir",
            out,
            "--target-tensor-parallel-size",
            "1",
            "--target-pipeline-parallel-size",
            "1",
            "--ckpt-format",
            "torch",
            "--no-optimizer",
            "--json",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["totals"]["peak_rss_bytes"] > 0 and report["totals"]["gb_per_s"] > 0
    statuses = {k: v["status"] for k, v in report["tensors"].items()}
    assert statuses["embedding.word_embeddings.weight"] == "identical"
    assert all(s == "dropped" for k, s in statuses.items() if k.startswith("optimizer."))
    sd = TorchZipReader(_ranks(out)[0]).load()
    assert "optimizer" not in sd and sd["args"].no_save_optim is True
    check_dir(out, reference(mcore_a.ref), optimizer=False)


def test_synthetic_legacy_writer_round_trip(tmp_path: Any) -> None:
    """A checkpoint from the test-only legacy writer: Adam ids map to the right parameters at every layout.

    The writer sets exp_avg = 1e-3 * param and exp_avg_sq = 1e-3 * param**2 per rank, so a wrong id -> name
    mapping anywhere (groups, module order, the tied copy on the last stage) breaks the identity.
    """
    import synth_legacy

    src = str(tmp_path / "synth")
    synth_legacy.write(src, tp=2, pp=2, layers=4, hidden=64, heads=4, ffn=256, vocab=500, seq=32)
    for tp, pp, fmt in ((1, 1, "torch_dist"), (4, 2, "torch")):
        out = str(tmp_path / f"o{tp}{pp}")
        assert convert(src, out, tp=tp, pp=pp, fmt=fmt).ok
        with open_checkpoint(out) as ck:
            for key in (k for k in ck.tensors if not k.startswith("optimizer.")):
                p = ck.full_tensor(key)
                assert torch.equal(ck.full_tensor(f"optimizer.state.exp_avg.{key}"), p * 1e-3), key
                assert torch.equal(ck.full_tensor(f"optimizer.state.exp_avg_sq.{key}"), p.square() * 1e-3), (
                    key
                )


@pytest.mark.slow
def test_dist_common_state_object(mcore_a: Saved, tmp_path: Any) -> None:
    """Newer megatron-core keeps the common state in a ``common_state/shard_0_1`` object, not common.pt."""
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    src = shutil.copytree(mcore_a.dist, str(tmp_path / "in"))
    it = os.path.join(src, "iter_0000002")
    common = torch.load(os.path.join(it, "common.pt"), weights_only=False)
    blob = io.BytesIO()
    torch.save([common], blob)
    with open(os.path.join(it, "__9_0.distcp"), "wb") as f:
        f.write(blob.getvalue())
    with open(os.path.join(it, ".metadata"), "rb") as f:
        meta = pickle.load(f)
    meta.state_dict_metadata["common_state/shard_0_1"] = BytesStorageMetadata()
    meta.storage_data[MetadataIndex("common_state/shard_0_1")] = _StorageInfo(
        "__9_0.distcp", 0, len(blob.getvalue())
    )
    with open(os.path.join(it, ".metadata"), "wb") as f:
        pickle.dump(meta, f)
    os.remove(os.path.join(it, "common.pt"))
    with open_checkpoint(src) as ck:
        assert (
            ck.iteration == 2 and ck.common.optimizer is not None and float(ck.common.optimizer.step) == 2.0
        )
        assert_tensors_equal_ref(ck, reference(mcore_a.ref))


@pytest.mark.slow
def test_never_stepped_optimizer(mcore_a: Saved, tmp_path: Any) -> None:
    """A checkpoint saved before the first step has no Adam state: the model converts, with a note."""
    src = shutil.copytree(mcore_a.legacy, str(tmp_path / "in"))
    for path in _ranks(src):
        rewrite(path, lambda o: o["optimizer"].update(state={}))
    report = convert(src, str(tmp_path / "out"), tp=1, pp=1, fmt="torch_dist")
    assert report.ok and any("never stepped" in n for n in report.notes)
    with open_checkpoint(str(tmp_path / "out")) as ck:
        assert ck.common.optimizer is None and not any(k.startswith("optimizer.") for k in ck.tensors)
        assert ck.args.no_save_optim is True
