"""A checkpoint opened for reading, in one description independent of its format and layout.

``CheckpointSource`` presents a Megatron-LM checkpoint (legacy ``torch`` or ``torch_dist``) as megatron-core's
sharded key space: ``tensors`` lists every full tensor (model parameters and the optimizer's
``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<key>``), ``read(key, layer)`` returns one layer's slab of a
stacked ``decoder.layers.*`` key (or a whole non-layer tensor), ``full_tensor(key)`` the stacked tensor;
``common`` holds the non-tensor state (args, iteration, scheduler, optimizer groups and step, RNG).
Readers stream: a slab is read when asked for, so memory is bounded by the largest slab.
"""

from __future__ import annotations

import argparse
import enum
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.layout_rules import Layout, ModelSpec
from megatron_unicron.ckpt.safe_unpickle import Placeholder

TRACKER = "latest_checkpointed_iteration.txt"


class OptimizerKind(enum.Enum):
    """Which megatron optimizer wrote the optimizer state."""

    ADAM = "adam"  # FP32Optimizer: torch Adam on the fp32 model params
    MIXED = "mixed"  # Float16OptimizerWithFloat16Params: fp32 main params for bf16/fp16 models
    DISTRIBUTED = "distributed"  # DistributedOptimizer


@dataclass(frozen=True)
class TensorInfo:
    """A full tensor of the checkpoint: key, global shape (layer axis first when stacked), dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stacked: bool

    @property
    def layers(self) -> list[int | None]:
        """The slabs of this tensor: layer indices when stacked, else ``[None]``."""
        return list(range(self.shape[0])) if self.stacked else [None]

    @property
    def numel(self) -> int:
        """Number of elements of the full tensor."""
        return math.prod(self.shape)


@dataclass(frozen=True, kw_only=True)
class OptimizerMeta:
    """The non-tensor optimizer state: kind, param groups (without params), shared Adam step, grad scaler."""

    kind: OptimizerKind
    param_groups: list[dict[str, Any]]
    step: Any
    grad_scaler: dict[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class CommonState:
    """Everything of a checkpoint that is not a sharded tensor."""

    iteration: int
    release: bool
    checkpoint_version: float
    args: argparse.Namespace
    opt_param_scheduler: dict[str, Any] | None
    optimizer: OptimizerMeta | None
    rng: dict[tuple[int, int], Any] | None  # (pp_rank, tp_rank) -> rng_state list, at ``layout``
    num_floating_point_operations_so_far: float | None
    rerun_state_machine: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def plain(value: Any) -> Any:
    """A value with placeholders, dtypes and namespaces replaced by plain Python values."""
    if isinstance(value, Placeholder):
        return plain(value.plain())
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, argparse.Namespace):
        return argparse.Namespace(**{k: plain(v) for k, v in vars(value).items()})
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


class CheckpointSource(ABC):
    """A Megatron-LM checkpoint opened for streaming reads (see the module docstring)."""

    format: str
    path: str
    layout: Layout
    spec: ModelSpec
    layer_spec: str  # "local" or "te": which layer spec's names a legacy file uses
    common: CommonState
    tensors: dict[str, TensorInfo]
    extra_states: dict[str, list[Any]]  # canonical ``*._extra_state`` key -> one object per layer (or one)
    layer_suffixes: list[str]  # per-layer canonical suffixes in module order
    notes: list[str]

    @property
    def iteration(self) -> int:
        """The checkpoint's iteration."""
        return self.common.iteration

    @property
    def args(self) -> argparse.Namespace:
        """``args`` with plain values (enums as values, dtypes as strings)."""
        args: argparse.Namespace = plain(self.common.args)
        return args

    @abstractmethod
    def read(self, key: str, layer: int | None) -> torch.Tensor:
        """One layer's slab of a stacked key (``layer`` index), or a whole non-layer tensor (``None``)."""

    def full_tensor(self, key: str) -> torch.Tensor:
        """The full tensor of ``key`` (stacked keys: layer axis first)."""
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"no tensor {key} in {self.path}")
        if not info.stacked:
            return self.read(key, None)
        return torch.stack([self.read(key, layer) for layer in info.layers])

    def slabs(self) -> Iterator[tuple[TensorInfo, int | None, torch.Tensor]]:
        """Every (tensor, layer, slab), key by key in ``tensors`` order, layers ascending."""
        for info in self.tensors.values():
            for layer in info.layers:
                yield info, layer, self.read(info.key, layer)

    def close(self) -> None:  # noqa: B027 - readers hold no open files; subclasses may override
        """Release resources."""

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass(frozen=True)
class CheckpointDir:
    """The directory of one iteration of a checkpoint, its format and iteration."""

    root: str
    path: str
    format: str
    iteration: int
    release: bool


def read_tracker(root: str) -> tuple[int, bool] | None:
    """The iteration in ``latest_checkpointed_iteration.txt`` (``release`` -> (0, True)); None if absent."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return 0, True
    if not re.fullmatch(r"\d+", text):
        raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}")
    return int(text), False


def _format_of(path: str) -> str | None:
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return "torch_dist"
    if any(name.startswith("mp_rank_") for name in os.listdir(path)):
        return "torch"
    if os.path.isfile(os.path.join(path, ".metadata")):
        return "torch_dcp"
    return None


def locate(load_dir: str, iteration: int | None = None) -> CheckpointDir:
    """Find the iteration directory to read: ``--iteration``, else the tracker, else ``load_dir`` itself."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load-dir {load_dir} is not a directory")
    release = False
    if iteration is not None:
        path = os.path.join(load_dir, f"iter_{iteration:07d}")
        if not os.path.isdir(path):
            raise CheckpointError(
                f"no iteration {iteration} in {load_dir} (missing {os.path.basename(path)})"
            )
    else:
        tracked = read_tracker(load_dir)
        if tracked is not None:
            iteration, release = tracked
            path = os.path.join(load_dir, "release" if release else f"iter_{iteration:07d}")
            if not os.path.isdir(path):
                raise CheckpointError(
                    f"{TRACKER} names iteration {'release' if release else iteration} but "
                    f"{os.path.basename(path)} is missing in {load_dir}"
                )
        else:
            m = re.fullmatch(r"iter_(\d{7})", os.path.basename(os.path.normpath(load_dir)))
            if m is None and os.path.basename(os.path.normpath(load_dir)) != "release":
                raise CheckpointError(
                    f"{load_dir}: no {TRACKER} and not an iter_NNNNNNN directory; pass --iteration"
                )
            path = load_dir
            release = m is None
            iteration = int(m.group(1)) if m else 0
    fmt = _format_of(path)
    if fmt is None:
        raise CheckpointError(
            f"{path}: neither a legacy (mp_rank_*) nor a torch_dist (metadata.json) checkpoint"
        )
    if fmt == "torch_dcp":
        raise CheckpointError(f"{path}: torch_dcp checkpoints are not supported (only torch and torch_dist)")
    root = load_dir if path != load_dir else os.path.dirname(os.path.normpath(load_dir))
    return CheckpointDir(root=root, path=path, format=fmt, iteration=iteration, release=release)


def open_checkpoint(
    load_dir: str,
    iteration: int | None = None,
    *,
    true_vocab_size: int | None = None,
    load_optimizer: bool = True,
) -> CheckpointSource:
    """Open a Megatron-LM checkpoint (legacy or torch_dist, any TP/PP) for streaming reads."""
    where = locate(load_dir, iteration)
    if where.format == "torch":
        from megatron_unicron.ckpt.legacy_reader import LegacySource

        return LegacySource(where, true_vocab_size=true_vocab_size, load_optimizer=load_optimizer)
    from megatron_unicron.ckpt.dist_reader import DistSource

    return DistSource(where, true_vocab_size=true_vocab_size, load_optimizer=load_optimizer)
