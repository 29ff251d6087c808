"""Corrupt, truncated and inconsistent inputs are refused with one line, and nothing is written.

Each case starts from a copy of a checkpoint megatron-core wrote (``mcore_a``), breaks one thing, runs the CLI
entry point and checks: exit status 2, a single stderr line naming the problem, no traceback, and neither the
``--save-dir`` nor a temporary sibling of it left behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
from checks import no_partial_output
from conftest import Saved

from megatron_unicron.ckpt.convert import main
from megatron_unicron.ckpt.torch_zip import TorchZipReader, materialize
from megatron_unicron.ckpt.zip_writer import TorchZipWriter

RANK = os.path.join("iter_0000002", "mp_rank_01_001", "model_optim_rng.pt")


def rewrite(path: str, fn: Callable[[dict[str, Any]], None]) -> None:
    """Load a legacy rank file fully, let ``fn`` change it, write it back."""
    obj = materialize(TorchZipReader(path).load())
    fn(obj)
    w = TorchZipWriter(path)
    w.finish(obj)


def refused(capsys: pytest.CaptureFixture[str], load: str, save: str, *extra: str) -> str:
    rc = main(["--load-dir", load, "--save-dir", save, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    no_partial_output(save)
    return err


@pytest.fixture
def legacy(mcore_a: Saved, tmp_path: Any) -> str:
    return shutil.copytree(mcore_a.legacy, str(tmp_path / "in"))


@pytest.fixture
def dist(mcore_a: Saved, tmp_path: Any) -> str:
    return shutil.copytree(mcore_a.dist, str(tmp_path / "in"))


@pytest.mark.slow
def test_missing_shard(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(os.path.join(legacy, "iter_0000002", "mp_rank_01_001"))
    assert "missing shard mp_rank_01_001" in refused(capsys, legacy, legacy + "_out")


@pytest.mark.slow
def test_duplicated_shard(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    it = os.path.join(legacy, "iter_0000002")
    shutil.copytree(os.path.join(it, "mp_rank_00_000"), os.path.join(it, "mp_rank_00"))
    assert "duplicated shard mp_rank_00_000" in refused(capsys, legacy, legacy + "_out")


@pytest.mark.slow
def test_truncated_file(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(legacy, RANK)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    err = refused(capsys, legacy, legacy + "_out")
    assert "mp_rank_01_001" in err and ("truncated" in err or "not a readable" in err), err


@pytest.mark.slow
def test_foreign_pickled_code(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    class Payload:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned > /dev/null",))

    rewrite(os.path.join(legacy, RANK), lambda o: setattr(o["args"], "hook", Payload()))
    err = refused(capsys, legacy, legacy + "_out")
    assert "refusing to unpickle global posix.system" in err or "os.system" in err, err


@pytest.mark.slow
def test_unknown_checkpoint_version(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite(os.path.join(legacy, RANK), lambda o: o.update(checkpoint_version=4.0))
    assert "unknown checkpoint_version 4.0" in refused(capsys, legacy, legacy + "_out")


@pytest.mark.slow
def test_args_inconsistent_with_shards(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    for d in os.listdir(os.path.join(legacy, "iter_0000002")):
        rewrite(
            os.path.join(legacy, "iter_0000002", d, "model_optim_rng.pt"),
            lambda o: setattr(o["args"], "tensor_model_parallel_size", 4),
        )
    assert "args say TP=4 PP=2 but the shards are TP2PP2" in refused(capsys, legacy, legacy + "_out")


@pytest.mark.slow
def test_args_disagree_between_files(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite(os.path.join(legacy, RANK), lambda o: setattr(o["args"], "hidden_size", 128))
    assert "args.hidden_size = 128" in refused(capsys, legacy, legacy + "_out")


@pytest.mark.slow
def test_tp_replicas_differ(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    def bump(o: dict[str, Any]) -> None:
        o["model"]["decoder.final_layernorm.weight"] += 1.0

    rewrite(os.path.join(legacy, RANK), bump)
    assert "different copy of a replicated tensor" in refused(capsys, legacy, legacy + "_out")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("what", "fn", "message"),
    [
        ("moe", lambda o: setattr(o["args"], "num_experts", 8), "MoE checkpoints"),
        ("vpp", lambda o: o.update(model0=o["model"]), "virtual pipeline"),
        ("type", lambda o: setattr(o["args"], "model_type", 2), "unsupported model type"),
    ],
)
def test_unsupported_models(
    legacy: str, capsys: pytest.CaptureFixture[str], what: str, fn: Any, message: str
) -> None:
    for d in os.listdir(os.path.join(legacy, "iter_0000002")):
        rewrite(os.path.join(legacy, "iter_0000002", d, "model_optim_rng.pt"), fn)
    assert message in refused(capsys, legacy, legacy + "_out"), what


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tp", "pp", "message"),
    [
        ("3", "1", "TP=3 does not divide num_attention_heads=4"),
        ("4", "1", "TP=4 does not divide num_query_groups=2"),
        ("1", "3", "PP=3 does not divide num_layers=4"),
    ],
)
def test_target_layout_refused(
    legacy: str, capsys: pytest.CaptureFixture[str], tp: str, pp: str, message: str
) -> None:
    err = refused(
        capsys,
        legacy,
        legacy + "_out",
        "--target-tensor-parallel-size",
        tp,
        "--target-pipeline-parallel-size",
        pp,
    )
    assert message in err


@pytest.mark.slow
def test_save_dir_not_empty(legacy: str, capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("keep me")
    rc = main(["--load-dir", legacy, "--save-dir", str(out)])
    assert rc == 2 and "exists and is not empty" in capsys.readouterr().err
    assert (out / "x").read_text() == "keep me"


@pytest.mark.slow
def test_dist_missing_file(dist: str, capsys: pytest.CaptureFixture[str]) -> None:
    os.remove(os.path.join(dist, "iter_0000002", "__1_0.distcp"))
    assert "missing file __1_0.distcp" in refused(capsys, dist, dist + "_out")


@pytest.mark.slow
def test_dist_truncated_metadata(dist: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(dist, "iter_0000002", ".metadata")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    assert "corrupt DCP metadata" in refused(capsys, dist, dist + "_out")


@pytest.mark.slow
def test_dist_corrupt_chunk(dist: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(dist, "iter_0000002", "__0_0.distcp")
    with open(path, "r+b") as f:  # wipe the whole file: every chunk in it is unreadable
        f.write(b"\0" * os.path.getsize(path))
    err = refused(capsys, dist, dist + "_out")
    assert "corrupt" in err, err


@pytest.mark.slow
def test_dist_unknown_backend(dist: str, capsys: pytest.CaptureFixture[str]) -> None:
    with open(os.path.join(dist, "iter_0000002", "metadata.json"), "w") as f:
        f.write('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    assert "sharded backend 'zarr' is not supported" in refused(capsys, dist, dist + "_out")


@pytest.mark.slow
def test_bad_tracker_and_missing_iteration(legacy: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no iteration 7" in refused(capsys, legacy, legacy + "_out", "--iteration", "7")
    with open(os.path.join(legacy, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("banana")
    assert "expected an iteration number" in refused(capsys, legacy, legacy + "_out")


@pytest.mark.slow
def test_dp_reshardable_optimizer_refused(
    dist: str, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """Bucket-space DistOpt state cannot change layout: refused, and --no-optimizer converts the model."""
    import pickle

    path = os.path.join(dist, "iter_0000002", ".metadata")
    with open(path, "rb") as f:
        meta = pickle.load(f)
    key = "optimizer.state.exp_avg.decoder.final_layernorm.weight"
    bucket = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_float32.bucket_idx_0.exp_avg"
    meta.state_dict_metadata[bucket] = meta.state_dict_metadata.pop(key)
    for index in [i for i in meta.storage_data if i.fqn == key]:
        meta.storage_data[type(index)(bucket, index.offset, index.index)] = meta.storage_data.pop(index)
    with open(path, "wb") as f:
        pickle.dump(meta, f)
    assert "only model-space optimizer state can change layout" in refused(capsys, dist, dist + "_out")
    out = str(tmp_path / "model_only")
    assert main(["--load-dir", dist, "--save-dir", out, "--no-optimizer"]) == 0
