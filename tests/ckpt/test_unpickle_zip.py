"""The restricted unpickler, placeholders, the lazy torch.save reader and the streaming writer."""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import random
import signal
import subprocess
from typing import Any

import numpy as np
import pytest
import torch

from megatron_unicron.ckpt import safe_unpickle
from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.safe_unpickle import Placeholder, placeholder_class
from megatron_unicron.ckpt.torch_zip import LazyTensor, TorchZipReader, materialize
from megatron_unicron.ckpt.zip_writer import TorchZipWriter


class _Payload:
    def __init__(self, fn: Any, arg: str) -> None:
        self.fn, self.arg = fn, arg

    def __reduce__(self) -> Any:
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("fn", [os.system, eval, subprocess.check_output, getattr])
def test_foreign_globals_refused_without_running(tmp_path: Any, fn: Any) -> None:
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil.pt")
    torch.save({"args": argparse.Namespace(x=_Payload(fn, f"touch {marker}"))}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        TorchZipReader(path).load()
    with pytest.raises(CheckpointError, match="refusing"):
        torch.load(path, weights_only=False, pickle_module=safe_unpickle)
    assert not marker.exists()


def test_checkpoint_data_types_load(tmp_path: Any) -> None:
    obj = {
        "args": argparse.Namespace(dt=torch.bfloat16, sig=signal.SIGTERM, n=3, s={1, 2}, t=(1.0, "a")),
        "rng": {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state()},
        "od": collections.OrderedDict(
            a=torch.arange(6.0).view(2, 3)[:, 1:], p=torch.nn.Parameter(torch.ones(2))
        ),
        "bytes": io.BytesIO(b"te-extra-state"),
    }
    path = str(tmp_path / "ok.pt")
    torch.save(obj, path)
    got = materialize(TorchZipReader(path).load())
    assert got["args"].dt is torch.bfloat16 and got["args"].sig is signal.SIGTERM and got["args"].s == {1, 2}
    assert got["rng"]["random"] == obj["rng"]["random"]
    assert np.array_equal(got["rng"]["np"][1], obj["rng"]["np"][1])
    assert torch.equal(got["od"]["a"], obj["od"]["a"]) and torch.equal(got["od"]["p"], torch.ones(2))
    assert got["bytes"].getvalue() == b"te-extra-state"


def test_placeholders_round_trip(tmp_path: Any) -> None:
    """Unknown megatron enums load as placeholders and pickle back as the same global with the same value."""
    enum_cls = placeholder_class("megatron.training.newer_enums", "Mode")
    member = enum_cls(2)
    data = safe_unpickle.dumps({"m": member, "k": enum_cls})
    assert b"megatron.training.newer_enums" in data
    got = safe_unpickle.loads(data)
    assert isinstance(got["m"], Placeholder) and got["m"].value == 2 and got["m"] == member
    assert got["m"].qualified_name == "megatron.training.newer_enums.Mode"
    with pytest.raises(pickle.PicklingError):  # the plain pickler cannot write it; ours can
        pickle.dumps(member)
    # an installed megatron enum also comes back as a placeholder and goes out as the real global
    from megatron.core.enums import ModelType

    path = str(tmp_path / "args.pt")
    torch.save({"args": argparse.Namespace(model_type=ModelType.encoder_or_decoder)}, path)
    args = TorchZipReader(path).load()["args"]
    assert (
        isinstance(args.model_type, Placeholder)
        and args.model_type.value == ModelType.encoder_or_decoder.value
    )
    out = str(tmp_path / "out.pt")
    TorchZipWriter(out).finish({"args": args})
    assert torch.load(out, weights_only=False)["args"].model_type is ModelType.encoder_or_decoder


def test_lazy_reader_reads_only_on_demand(tmp_path: Any) -> None:
    big = torch.randn(64, 32)
    path = str(tmp_path / "t.pt")
    torch.save({"w": big, "view": big[3:9, ::2], "bf": big.to(torch.bfloat16), "s": torch.tensor(7)}, path)
    obj = TorchZipReader(path).load()
    assert all(isinstance(v, LazyTensor) for v in obj.values())
    assert obj["view"].shape == (6, 16) and obj["view"].stride == (32, 2)
    assert torch.equal(obj["view"].materialize(), big[3:9, ::2])
    assert torch.equal(obj["bf"].materialize(), big.to(torch.bfloat16))
    assert torch.equal(obj["w"].read_flat(100, 140), big.reshape(-1)[100:140])
    assert obj["s"].materialize().item() == 7


def test_truncated_and_garbage_files_refused(tmp_path: Any) -> None:
    path = str(tmp_path / "t.pt")
    torch.save({"w": torch.randn(1000)}, path)
    data = open(path, "rb").read()
    for name, blob in (("half", data[: len(data) // 2]), ("garbage", os.urandom(4096)), ("empty", b"")):
        bad = str(tmp_path / f"{name}.pt")
        with open(bad, "wb") as f:
            f.write(blob)
        with pytest.raises(CheckpointError):
            materialize(TorchZipReader(bad).load())


def test_streaming_writer_is_a_torch_save_file(tmp_path: Any) -> None:
    path = str(tmp_path / "w.pt")
    w = TorchZipWriter(path)
    a = w.add(torch.arange(12, dtype=torch.float32).view(3, 4)[:, 1:])  # a non-contiguous view
    b = w.add(torch.ones(5, dtype=torch.bfloat16))
    w.finish(
        {"model": collections.OrderedDict(a=a, b=b), "small": torch.tensor(3.0), "args": argparse.Namespace()}
    )
    for mmap in (False, True):
        got = torch.load(path, weights_only=False, mmap=mmap)
        assert torch.equal(got["model"]["a"], torch.arange(12.0).view(3, 4)[:, 1:])
        assert got["model"]["b"].dtype == torch.bfloat16 and got["small"].item() == 3.0
