"""Reader of Megatron-LM legacy (``--ckpt-format torch``) checkpoints at any TP/PP.

Layout (Megatron-LM ``megatron/training/checkpointing.py``):
``iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt`` per (TP, PP) rank, each one ``torch.save``d dict
(``args``, ``checkpoint_version`` 3.0, ``iteration``, ``model``
with stage-local names, ``optimizer``, ``opt_param_scheduler``, ``rng_state``, ...), plus ``distrib_optim.pt``
with the distributed optimizer. Every file is opened lazily (``torch_zip``): only the pickle is parsed up
front; a slab's shards are read when the slab is asked for. Refused with one line: missing or duplicated
rank directories, unknown checkpoint versions, virtual pipeline chunks, expert parallelism, args that
disagree with the shards or between files, TP replicas that differ.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from megatron_unicron.ckpt import tp_rules
from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.layout_rules import (
    LAYER_PREFIX,
    Layout,
    ModelSpec,
    check_extra_state_key,
    is_extra_state,
    local_to_canonical,
    optimizer_key,
    split_of,
)
from megatron_unicron.ckpt.legacy_optim import RankOptimizer, map_rank_optimizer
from megatron_unicron.ckpt.source import (
    CheckpointDir,
    CheckpointSource,
    CommonState,
    OptimizerMeta,
    TensorInfo,
)
from megatron_unicron.ckpt.torch_zip import LazyRange, LazyTensor, TorchZipReader, materialize

_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_SUPPORTED_VERSIONS = (3.0,)
_ARGS_MUST_AGREE = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "padded_vocab_size",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "swiglu",
    "untie_embeddings_and_output_weights",
    "use_distributed_optimizer",
)

Lazy = LazyTensor | LazyRange


def _discover(path: str) -> tuple[Layout, dict[tuple[int, int], str]]:
    found: dict[tuple[int, int], str] = {}
    has_pp_suffix: set[bool] = set()
    for name in sorted(os.listdir(path)):
        m = _RANK_RE.match(name)
        if m is None:
            continue
        if m.group(3) is not None:
            raise CheckpointError(f"{path}/{name}: expert-parallel checkpoints are not supported")
        tp, pp = int(m.group(1)), int(m.group(2) or 0)
        has_pp_suffix.add(m.group(2) is not None)
        if (tp, pp) in found:
            raise CheckpointError(
                f"{path}: duplicated shard {name} (also {os.path.basename(found[(tp, pp)])})"
            )
        found[(tp, pp)] = os.path.join(path, name)
    if not found:
        raise CheckpointError(f"{path}: no mp_rank_* directories")
    if len(has_pp_suffix) > 1:
        raise CheckpointError(f"{path}: mixes mp_rank_TT and mp_rank_TT_PPP directories (duplicated shards)")
    layout = Layout(max(t for t, _ in found) + 1, max(p for _, p in found) + 1)
    for pp in range(layout.pp):
        for tp in range(layout.tp):
            d = found.get((tp, pp))
            if d is None:
                raise CheckpointError(
                    f"{path}: missing shard {layout.rank_dir(tp, pp)} for TP={layout.tp} PP={layout.pp}"
                )
            if not os.path.isfile(os.path.join(d, "model_optim_rng.pt")):
                raise CheckpointError(f"{d}: missing model_optim_rng.pt")
    return layout, found


class LegacySource(CheckpointSource):
    """A legacy checkpoint opened lazily; see the module docstring."""

    format = "torch"

    def __init__(
        self, where: CheckpointDir, *, true_vocab_size: int | None = None, load_optimizer: bool = True
    ) -> None:
        self.path = where.path
        self.notes = []
        self.layout, dirs = _discover(where.path)
        files = {rank: self._open(d) for rank, d in dirs.items()}
        first = files[(0, 0)]
        args = first["args"]
        self._check_files(files, args, where)
        self.spec = ModelSpec.from_args(args, true_vocab_size=true_vocab_size)
        if (
            getattr(args, "tensor_model_parallel_size", 1),
            getattr(args, "pipeline_model_parallel_size", 1),
        ) != (self.layout.tp, self.layout.pp):
            raise CheckpointError(
                f"{where.path}: args say TP={getattr(args, 'tensor_model_parallel_size', 1)} "
                f"PP={getattr(args, 'pipeline_model_parallel_size', 1)} but the shards are {self.layout}"
            )
        self._offsets = self._stage_offsets(files)
        self.layer_spec = (
            "local"
            if any(".input_layernorm." in k or ".pre_mlp_layernorm." in k for k in first["model"])
            else "te"
        )
        self._shards: dict[tuple[str, int | None], list[Lazy | None]] = {}
        self.extra_states = {}
        self.layer_suffixes = []
        self._tied_copy: list[Lazy | None] = [None] * self.layout.tp
        optimizers = self._index(files, args, load_optimizer)
        self.tensors = self._tensor_infos()
        self._check_shapes()
        self.common = self._common(files, optimizers, where)

    # ------------------------------------------------------------------ opening and checks
    @staticmethod
    def _open(rank_dir: str) -> dict[str, Any]:
        path = os.path.join(rank_dir, "model_optim_rng.pt")
        obj = TorchZipReader(path).load()
        if not isinstance(obj, dict):
            raise CheckpointError(
                f"{path}: top-level object is a {type(obj).__name__}, not a checkpoint dict"
            )
        version = obj.get("checkpoint_version")
        if version not in _SUPPORTED_VERSIONS:
            raise CheckpointError(f"{path}: unknown checkpoint_version {version!r} (supported: 3.0)")
        if any(k.startswith("model") and k[5:].isdigit() for k in obj):
            raise CheckpointError(f"{path}: virtual pipeline chunks (model0, model1, ...) are not supported")
        if not isinstance(obj.get("model"), dict):
            raise CheckpointError(f"{path}: no model state dict")
        return obj

    def _check_files(
        self, files: dict[tuple[int, int], dict[str, Any]], args: Any, where: CheckpointDir
    ) -> None:
        its = {f.get("iteration") for f in files.values()}
        if len(its) != 1:
            raise CheckpointError(
                f"{where.path}: rank files disagree on the iteration {sorted(map(str, its))}"
            )
        it = its.pop()
        if not where.release and it != where.iteration:
            raise CheckpointError(
                f"{where.path}: files hold iteration {it}, the directory says {where.iteration}"
            )
        for rank, f in files.items():
            a = f.get("args")
            for name in _ARGS_MUST_AGREE:
                if getattr(a, name, None) != getattr(args, name, None):
                    raise CheckpointError(
                        f"{self.layout.rank_dir(*rank)}: args.{name} = {getattr(a, name, None)!r} "
                        f"differs from rank 0's {getattr(args, name, None)!r}"
                    )

    def _stage_offsets(self, files: dict[tuple[int, int], dict[str, Any]]) -> list[int]:
        counts = []
        for pp in range(self.layout.pp):
            idx = {
                int(m.group(1))
                for k in files[(0, pp)]["model"]
                if (m := re.match(r"decoder\.layers\.(\d+)\.", k))
            }
            if idx != set(range(len(idx))):
                raise CheckpointError(
                    f"{self.layout.rank_dir(0, pp)}: layer indices {sorted(idx)} are not 0..n-1"
                )
            counts.append(len(idx))
        if sum(counts) != self.spec.num_layers:
            raise CheckpointError(f"stages hold {counts} layers, args.num_layers is {self.spec.num_layers}")
        return [sum(counts[:s]) for s in range(self.layout.pp)]

    # ------------------------------------------------------------------ index
    def _index(
        self, files: dict[tuple[int, int], dict[str, Any]], args: Any, load_optimizer: bool
    ) -> dict[tuple[int, int], RankOptimizer]:
        tp_n, pp_n = self.layout.tp, self.layout.pp
        optimizers: dict[tuple[int, int], RankOptimizer] = {}
        suffixes: list[str] = []
        for (tp, pp), f in sorted(files.items(), key=lambda x: (x[0][1], x[0][0])):
            names, shapes = [], {}
            first, last = pp == 0, pp == pp_n - 1
            for name, value in f["model"].items():
                key, layer = local_to_canonical(name, self._offsets[pp])
                if is_extra_state(name):
                    check_extra_state_key(key)
                    if tp == 0:
                        self.extra_states.setdefault(
                            key, [None] * (self.spec.num_layers if layer is not None else 1)
                        )
                        self.extra_states[key][layer or 0] = materialize(value)
                    continue
                if not isinstance(value, LazyTensor):
                    raise CheckpointError(
                        f"{self.layout.rank_dir(tp, pp)}: model entry {name} is a "
                        f"{type(value).__name__}, not a tensor"
                    )
                names.append(name)
                shapes[name] = value.shape
                if name == "output_layer.weight" and self.spec.tied:
                    if first:
                        raise CheckpointError(
                            f"{name} on the first stage with tied embeddings "
                            "(args inconsistent with the shards)"
                        )
                    self._tied_copy[tp] = value  # the last stage's copy of the word embeddings
                    continue
                split_of(key, self.spec.swiglu)
                if layer is not None and tp == 0 and pp == 0 and layer == 0:
                    suffixes.append(key[len(LAYER_PREFIX) :])
                self._shards.setdefault((key, layer), [None] * tp_n)[tp] = value
            if load_optimizer and "optimizer" in f:
                ro = map_rank_optimizer(
                    f["optimizer"],
                    args,
                    names,
                    shapes,
                    rank_dir=self._dir(tp, pp),
                    first=first,
                    last=last,
                    tied=self.spec.tied,
                    pp=pp_n,
                    pp_rank=pp,
                )
                if ro is None:
                    continue
                optimizers[(tp, pp)] = ro
                for name, states in ro.states.items():
                    key, layer = local_to_canonical(name, self._offsets[pp])
                    if name == "output_layer.weight" and self.spec.tied:
                        continue
                    for state, lazy in states.items():
                        self._shards.setdefault((optimizer_key(state, key), layer), [None] * tp_n)[tp] = lazy
        self.layer_suffixes = suffixes
        for (key, layer), shards in self._shards.items():
            missing = [t for t, s in enumerate(shards) if s is None]
            if missing:
                raise CheckpointError(
                    f"{key} (layer {layer}) is missing on TP rank {missing[0]} (inconsistent shards)"
                )
        if load_optimizer and not optimizers and any("optimizer" in f for f in files.values()):
            self.notes.append("the optimizer never stepped (no Adam state): optimizer not converted")
        if optimizers and len(optimizers) != len(files):
            raise CheckpointError("only some rank files hold optimizer state (inconsistent shards)")
        if self.spec.tied and pp_n > 1 and any(c is None for c in self._tied_copy):
            raise CheckpointError("tied embeddings with PP > 1 but the last stage lacks output_layer.weight")
        if self.spec.tied and pp_n > 1:
            self.notes.append(
                "tied output_layer.weight copy of the last stage dropped (it duplicates the "
                "word embeddings and their Adam moments)"
            )
        return optimizers

    def _dir(self, tp: int, pp: int) -> str:
        return os.path.join(self.path, self.layout.rank_dir(tp, pp))

    def _tensor_infos(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        keys: dict[str, list[int | None]] = {}
        for key, layer in self._shards:
            keys.setdefault(key, []).append(layer)
        for key, layers in keys.items():
            model_key = key.split(".", 3)[3] if key.startswith("optimizer.state.") else key
            split = split_of(model_key, self.spec.swiglu)
            shard0 = self._shards[(key, layers[0])][0]
            assert shard0 is not None
            shape = list(shard0.shape)
            if split is tp_rules.Split.DIM1:
                shape[1] *= self.layout.tp
            elif split is not tp_rules.Split.REPLICATED:
                shape[0] *= self.layout.tp
            stacked = layers[0] is not None
            if stacked:
                if sorted(x for x in layers if x is not None) != list(range(self.spec.num_layers)):
                    raise CheckpointError(
                        f"{key}: layers {sorted(map(str, layers))} do not cover 0..{self.spec.num_layers - 1}"
                    )
                shape = [self.spec.num_layers, *shape]
            infos[key] = TensorInfo(key, tuple(shape), shard0.dtype, stacked)
        return dict(sorted(infos.items(), key=lambda kv: (kv[0].startswith("optimizer."), kv[0])))

    def _check_shapes(self) -> None:
        s = self.spec
        emb = self.tensors.get("embedding.word_embeddings.weight")
        if emb is None:
            raise CheckpointError("no embedding.word_embeddings.weight in the checkpoint")
        if emb.shape != (s.padded_vocab_size, s.hidden_size):
            raise CheckpointError(
                f"embedding shape {list(emb.shape)} disagrees with args padded_vocab_size="
                f"{s.padded_vocab_size}, hidden_size={s.hidden_size}"
            )
        qkv = self.tensors.get(LAYER_PREFIX + "self_attention.linear_qkv.weight")
        if qkv is not None and qkv.shape[2] != s.hidden_size:
            raise CheckpointError(
                f"linear_qkv shape {list(qkv.shape)} disagrees with hidden_size={s.hidden_size}"
            )

    # ------------------------------------------------------------------ common state
    def _common(
        self,
        files: dict[tuple[int, int], dict[str, Any]],
        optimizers: dict[tuple[int, int], RankOptimizer],
        where: CheckpointDir,
    ) -> CommonState:
        first = files[(0, 0)]
        meta = None
        if optimizers:
            ro = optimizers[(0, 0)]
            steps = {o.step for o in optimizers.values()}
            if len(steps) > 1:
                raise CheckpointError(f"rank files disagree on the Adam step {sorted(steps)}")
            meta = OptimizerMeta(
                kind=ro.kind,
                param_groups=materialize(ro.groups),
                step=ro.step,
                grad_scaler=materialize(ro.grad_scaler),
            )
        rng = None
        if all("rng_state" in f for f in files.values()):
            rng = {(pp, tp): materialize(f["rng_state"]) for (tp, pp), f in files.items()}
        known = {
            "args",
            "checkpoint_version",
            "iteration",
            "model",
            "optimizer",
            "opt_param_scheduler",
            "rng_state",
            "num_floating_point_operations_so_far",
            "rerun_state_machine",
        }
        return CommonState(
            iteration=int(first.get("iteration", where.iteration)),
            release=where.release,
            checkpoint_version=float(first["checkpoint_version"]),
            args=first["args"],
            opt_param_scheduler=materialize(first.get("opt_param_scheduler")),
            optimizer=meta,
            rng=rng,
            num_floating_point_operations_so_far=first.get("num_floating_point_operations_so_far"),
            rerun_state_machine=materialize(first.get("rerun_state_machine")),
            extra={k: materialize(v) for k, v in first.items() if k not in known},
        )

    # ------------------------------------------------------------------ reads
    def read(self, key: str, layer: int | None) -> torch.Tensor:
        """Merge the TP shards of one slab, reading each shard's bytes straight into place where possible."""
        shards = self._shards.get((key, layer))
        if shards is None:
            raise CheckpointError(f"no tensor {key} (layer {layer}) in {self.path}")
        model_key = key.split(".", 3)[3] if key.startswith("optimizer.state.") else key
        split = split_of(model_key, self.spec.swiglu)
        lazy = [s for s in shards if s is not None]
        name = f"{key}[{layer}]"
        if split is tp_rules.Split.REPLICATED:  # every rank's copy is read: inconsistent shards are caught
            first = lazy[0].materialize()
            for t, s in enumerate(lazy[1:], start=1):
                other = s.materialize()
                if other.shape != first.shape or not torch.equal(other, first):
                    raise CheckpointError(
                        f"{name}: TP rank {t} holds a different copy of a replicated tensor "
                        "(inconsistent shards)"
                    )
            return first
        if split is tp_rules.Split.DIM1:  # columns: one shard in memory besides the output
            rows, cols = lazy[0].shape[0], lazy[0].shape[1]
            out = torch.empty((rows, cols * len(lazy), *lazy[0].shape[2:]), dtype=lazy[0].dtype)
            for t, s in enumerate(lazy):
                out[:, t * cols : (t + 1) * cols] = s.materialize()
            return out
        return self._read_rows(split, lazy)

    @staticmethod
    def _read_rows(split: tp_rules.Split, lazy: list[Lazy]) -> torch.Tensor:
        """Row-split shards read straight into the full tensor (SwiGLU: gate rows, then up rows)."""
        tp, rows = len(lazy), lazy[0].shape[0]
        shape = (rows * tp, *lazy[0].shape[1:])
        out = torch.empty(shape, dtype=lazy[0].dtype)
        flat = out.view(-1)
        per_row = out[0].numel() if rows else 0
        half = rows // 2
        for t, s in enumerate(lazy):
            if tuple(s.shape) != tuple(lazy[0].shape):
                raise CheckpointError(
                    f"TP shard {t} has shape {list(s.shape)}, shard 0 {list(lazy[0].shape)}"
                )
            if split is tp_rules.Split.SWIGLU:
                pieces = [(0, half, t * half), (half, rows, tp * half + t * half)]
            else:
                pieces = [(0, rows, t * rows)]
            for a, b, dst in pieces:
                s.read_flat_into(a * per_row, b * per_row, flat[dst * per_row : (dst + b - a) * per_row])
        return out
