"""Reader of ``torch_dist`` checkpoints (megatron-core ``dist_checkpointing`` over PyTorch DCP), one process.

An iteration directory holds ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``), the DCP
``.metadata`` (every key's global shape and chunk list, and where each chunk's bytes are), ``__R_T.distcp``
files and the common state: ``common.pt`` (megatron-core 0.16.1 writes it) or, in newer releases, a
``common_state/shard_0_1`` byte object inside the DCP files; both are read.

No process group and no DCP planner run: ``.metadata`` is unpickled with the restricted unpickler, and a
slab is assembled from the stored chunks that intersect it, each chunk read by byte range (a ``torch.save``d
tensor, loaded with ``weights_only=True``). Byte objects (``_extra_state`` per layer, ``rng_state`` per
(PP, TP) rank) are ``torch.save``d lists, read with the restricted unpickler.
"""

from __future__ import annotations

import json
import os
import re
from typing import IO, Any, cast

import torch

from megatron_unicron.ckpt import safe_unpickle
from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.layout_rules import (
    LAYER_PREFIX,
    Layout,
    ModelSpec,
    check_extra_state_key,
    local_layer_order,
    optimizer_key,
    parse_optimizer_key,
    split_of,
)
from megatron_unicron.ckpt.source import (
    CheckpointDir,
    CheckpointSource,
    CommonState,
    OptimizerKind,
    OptimizerMeta,
    TensorInfo,
)
from megatron_unicron.ckpt.torch_zip import FileWindow, TorchZipReader, materialize

_OBJ_RE = re.compile(r"^(?P<key>.+)/shard_(?P<off>[\d.]+)_(?P<shape>[\d.]+)$")


class _Chunk:
    __slots__ = ("offsets", "sizes", "path", "offset", "length")

    def __init__(self, offsets: tuple[int, ...], sizes: tuple[int, ...], path: str, offset: int, length: int):
        self.offsets, self.sizes, self.path, self.offset, self.length = offsets, sizes, path, offset, length


def _read_range(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise CheckpointError(
            f"{path}: truncated (wanted {length} bytes at offset {offset}, got {len(data)})"
        )
    return data


class DistSource(CheckpointSource):
    """A torch_dist checkpoint opened for streaming reads; see the module docstring."""

    format = "torch_dist"

    def __init__(
        self, where: CheckpointDir, *, true_vocab_size: int | None = None, load_optimizer: bool = True
    ) -> None:
        self.path = where.path
        self.notes = []
        self._check_config()
        self._meta = self._read_metadata()
        self._storage = self._storage_index()
        common = self._read_common()
        args = common.get("args")
        self.spec = ModelSpec.from_args(args, true_vocab_size=true_vocab_size)
        self.layout = Layout(
            int(getattr(args, "tensor_model_parallel_size", 1) or 1),
            int(getattr(args, "pipeline_model_parallel_size", 1) or 1),
        )
        impl = getattr(args, "transformer_impl", "local")
        self.layer_spec = (
            "te" if str(getattr(impl, "plain", lambda: impl)()) == "transformer_engine" else "local"
        )
        self._chunks: dict[str, list[_Chunk]] = {}
        self.tensors = self._index_tensors(load_optimizer)
        objects = self._index_objects()
        self.extra_states = self._extra_states(objects)
        suffixes = {k[len(LAYER_PREFIX) :] for k in self.tensors if k.startswith(LAYER_PREFIX)}
        self.layer_suffixes = local_layer_order(self.layer_spec, suffixes)
        unknown = suffixes - set(self.layer_suffixes)
        if unknown:
            raise CheckpointError(f"unsupported layer parameters {sorted(unknown)[:3]}")
        self.common = self._common(common, objects, where, load_optimizer)

    # ------------------------------------------------------------------ files
    def _check_config(self) -> None:
        path = os.path.join(self.path, "metadata.json")
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from None
        if config.get("sharded_backend") != "torch_dist":
            raise CheckpointError(
                f"{path}: sharded backend {config.get('sharded_backend')!r} is not supported "
                "(only torch_dist)"
            )
        if config.get("sharded_backend_version", 1) != 1:
            raise CheckpointError(
                f"{path}: unknown torch_dist version {config.get('sharded_backend_version')}"
            )

    def _read_metadata(self) -> Any:
        path = os.path.join(self.path, ".metadata")
        if not os.path.isfile(path):
            raise CheckpointError(f"{self.path}: missing .metadata (incomplete torch_dist checkpoint)")
        with open(path, "rb") as f:
            data = f.read()
        try:
            meta = safe_unpickle.loads(data, source=path, extra_globals=safe_unpickle.dcp_metadata_globals())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: corrupt DCP metadata ({type(e).__name__}: {e})") from None
        if not hasattr(meta, "state_dict_metadata") or not hasattr(meta, "storage_data"):
            raise CheckpointError(f"{path}: not DCP metadata")
        return meta

    def _storage_index(self) -> dict[tuple[str, tuple[int, ...] | None], Any]:
        index: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        for mi, info in (self._meta.storage_data or {}).items():
            if getattr(info, "transform_descriptors", None):
                raise CheckpointError(
                    f"{self.path}: DCP stream transforms {info.transform_descriptors} are not supported"
                )
            index[(mi.fqn, tuple(mi.offset) if mi.offset is not None else None)] = info
        return index

    def _bytes_of(self, fqn: str, offsets: tuple[int, ...] | None) -> bytes:
        info = self._storage.get((fqn, offsets))
        if info is None:
            raise CheckpointError(f"{self.path}: no stored data for {fqn} at {offsets} (missing shard)")
        path = os.path.join(self.path, info.relative_path)
        if not os.path.isfile(path):
            raise CheckpointError(f"{self.path}: missing file {info.relative_path} (missing shards)")
        return _read_range(path, info.offset, info.length)

    def _object(self, fqn: str) -> Any:
        obj = materialize(TorchZipReader(self._bytes_of(fqn, None), name=f"{self.path}:{fqn}").load())
        if not isinstance(obj, list) or len(obj) != 1:
            raise CheckpointError(f"{self.path}: object {fqn} is not a one-element list")
        return obj[0]

    def _read_common(self) -> dict[str, Any]:
        path = os.path.join(self.path, "common.pt")
        if os.path.isfile(path):
            common = materialize(TorchZipReader(path).load())
        elif "common_state/shard_0_1" in self._meta.state_dict_metadata:
            common = self._object("common_state/shard_0_1")
        else:
            raise CheckpointError(
                f"{self.path}: neither common.pt nor a common_state object (incomplete checkpoint)"
            )
        if not isinstance(common, dict) or "args" not in common:
            raise CheckpointError(f"{self.path}: common state has no args")
        version = common.get("checkpoint_version")
        if version not in (3.0, None):
            raise CheckpointError(f"{self.path}: unknown checkpoint_version {version!r} (supported: 3.0)")
        return common

    # ------------------------------------------------------------------ index
    def _index_tensors(self, load_optimizer: bool) -> dict[str, TensorInfo]:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        infos: dict[str, TensorInfo] = {}
        for fqn, md in self._meta.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                continue
            if fqn.startswith("optimizer."):
                parsed = parse_optimizer_key(fqn)
                if parsed is None:
                    if not load_optimizer:
                        continue
                    raise CheckpointError(
                        f"optimizer tensor {fqn}: only model-space optimizer state can change layout "
                        "(save with "
                        "--dist-ckpt-optim-fully-reshardable), or pass --no-optimizer"
                    )
                if not load_optimizer:
                    continue
                state, model_key = parsed
                key = optimizer_key(state, model_key)
            else:
                model_key = key = fqn
            split_of(model_key, self.spec.swiglu)
            shape = tuple(int(s) for s in md.size)
            stacked = model_key.startswith(LAYER_PREFIX)
            if stacked and (not shape or shape[0] != self.spec.num_layers):
                raise CheckpointError(
                    f"{fqn}: global shape {list(shape)} has no layer axis of {self.spec.num_layers}"
                )
            chunks = []
            volume = 0
            for c in md.chunks:
                info = self._storage.get((fqn, tuple(c.offsets)))
                if info is None:
                    raise CheckpointError(
                        f"{fqn}: chunk at {list(c.offsets)} has no stored data (missing shard)"
                    )
                chunks.append(
                    _Chunk(
                        tuple(c.offsets),
                        tuple(c.sizes),
                        os.path.join(self.path, info.relative_path),
                        info.offset,
                        info.length,
                    )
                )
                n = 1
                for s in c.sizes:
                    n *= int(s)
                volume += n
            numel = 1
            for s in shape:
                numel *= s
            if volume != numel:
                raise CheckpointError(
                    f"{fqn}: stored chunks cover {volume} of {numel} elements (missing or duplicated shards)"
                )
            self._chunks[key] = chunks
            infos[key] = TensorInfo(key, shape, md.properties.dtype, stacked)
        if "embedding.word_embeddings.weight" not in infos:
            raise CheckpointError(f"{self.path}: no embedding.word_embeddings.weight (not a GPT checkpoint)")
        emb = infos["embedding.word_embeddings.weight"].shape
        if emb != (self.spec.padded_vocab_size, self.spec.hidden_size):
            raise CheckpointError(
                f"embedding shape {list(emb)} disagrees with args padded_vocab_size="
                f"{self.spec.padded_vocab_size}, hidden_size={self.spec.hidden_size}"
            )
        return dict(sorted(infos.items(), key=lambda kv: (kv[0].startswith("optimizer."), kv[0])))

    def _index_objects(self) -> dict[str, list[tuple[tuple[int, ...], tuple[int, ...], str]]]:
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        objects: dict[str, list[tuple[tuple[int, ...], tuple[int, ...], str]]] = {}
        for fqn, md in self._meta.state_dict_metadata.items():
            if not isinstance(md, BytesStorageMetadata):
                continue
            m = _OBJ_RE.match(fqn)
            if m is None:
                self.notes.append(f"byte object {fqn} dropped (unknown naming)")
                continue
            off = tuple(int(x) for x in m.group("off").split("."))
            shape = tuple(int(x) for x in m.group("shape").split("."))
            objects.setdefault(m.group("key"), []).append((off, shape, fqn))
        return objects

    def _extra_states(self, objects: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for key, entries in objects.items():
            if not key.endswith("._extra_state"):
                continue
            check_extra_state_key(key)
            n = self.spec.num_layers if key.startswith(LAYER_PREFIX) else 1
            values: list[Any] = [None] * n
            seen = set()
            for off, _shape, fqn in entries:
                values[off[0]] = self._object(fqn)
                seen.add(off[0])
            if seen != set(range(n)):
                raise CheckpointError(
                    f"{key}: extra state missing for layers {sorted(set(range(n)) - seen)[:4]}"
                )
            out[key] = values
        return out

    # ------------------------------------------------------------------ common
    def _common(
        self,
        common: dict[str, Any],
        objects: dict[str, list[Any]],
        where: CheckpointDir,
        load_optimizer: bool,
    ) -> CommonState:
        rng: dict[tuple[int, int], Any] | None = None
        if "rng_state" in objects:
            rng = {}
            for off, shape, fqn in objects["rng_state"]:
                if tuple(shape) != (self.layout.pp, self.layout.tp):
                    self.notes.append(
                        f"rng_state saved at PP,TP={shape}, args say {self.layout}: RNG dropped"
                    )
                    rng = None
                    break
                rng[(off[0], off[1])] = self._object(fqn)
        for key in objects:
            if not key.endswith("._extra_state") and key not in ("rng_state", "common_state"):
                self.notes.append(f"sharded object {key} dropped (rank-specific state)")
        meta = None
        opt = common.get("optimizer")
        has_opt_tensors = any(k.startswith("optimizer.") for k in self.tensors)
        if load_optimizer and isinstance(opt, dict) and has_opt_tensors:
            meta = self._optimizer_meta(opt)
        known = {
            "args",
            "checkpoint_version",
            "iteration",
            "optimizer",
            "opt_param_scheduler",
            "num_floating_point_operations_so_far",
            "rerun_state_machine",
            "content_metadata",
            "model",
        }
        return CommonState(
            iteration=int(common.get("iteration", where.iteration)),
            release=where.release,
            checkpoint_version=float(common.get("checkpoint_version") or 3.0),
            args=common["args"],
            opt_param_scheduler=common.get("opt_param_scheduler"),
            optimizer=meta,
            rng=rng,
            num_floating_point_operations_so_far=common.get("num_floating_point_operations_so_far"),
            rerun_state_machine=common.get("rerun_state_machine"),
            extra={k: v for k, v in common.items() if k not in known},
        )

    def _optimizer_meta(self, opt: dict[str, Any]) -> OptimizerMeta:
        def step_of(state: Any) -> Any:
            s = state.get("common_step") if isinstance(state, dict) else None
            return s.item() if isinstance(s, torch.Tensor) else s

        if "param_state_sharding_type" in opt:
            kind = opt["param_state_sharding_type"]
            if kind not in ("fully_reshardable", "fully_sharded_model_space"):
                raise CheckpointError(
                    f"distributed-optimizer format {kind!r} cannot change layout (save with "
                    "--dist-ckpt-optim-fully-reshardable), or pass --no-optimizer"
                )
            groups = opt["optimizer"]["param_groups"]
            steps = {float(g["step"]) for g in groups if "step" in g}
            return OptimizerMeta(
                kind=OptimizerKind.DISTRIBUTED,
                param_groups=[{k: v for k, v in g.items() if k not in ("step", "params")} for g in groups],
                step=steps.pop() if len(steps) == 1 else 0.0,
                grad_scaler=opt.get("grad_scaler"),
            )
        if "optimizer" in opt and isinstance(opt["optimizer"], dict):
            inner = opt["optimizer"]
            return OptimizerMeta(
                kind=OptimizerKind.MIXED,
                param_groups=[{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]],
                step=step_of(inner.get("state")),
                grad_scaler=opt.get("grad_scaler"),
            )
        if "param_groups" not in opt:
            raise CheckpointError("common optimizer state has no param_groups (unknown optimizer format)")
        return OptimizerMeta(
            kind=OptimizerKind.ADAM,
            param_groups=[{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
            step=step_of(opt.get("state")),
            grad_scaler=None,
        )

    # ------------------------------------------------------------------ reads
    def read(self, key: str, layer: int | None) -> torch.Tensor:
        """Assemble one slab from the stored chunks that intersect it (an equal chunk is returned as is)."""
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"no tensor {key} in {self.path}")
        if info.stacked:
            if layer is None or not 0 <= layer < info.shape[0]:
                raise CheckpointError(f"{key}: layer {layer} out of range")
            lo = (layer,) + (0,) * (len(info.shape) - 1)
            hi = (layer + 1,) + info.shape[1:]
        else:
            lo, hi = (0,) * len(info.shape), info.shape
        box = tuple(h - low for low, h in zip(lo, hi))
        out: torch.Tensor | None = None
        covered = 0
        for c in self._chunks[key]:
            inter = [(max(a, o), min(b, o + s)) for a, b, o, s in zip(lo, hi, c.offsets, c.sizes)]
            if any(a >= b for a, b in inter):
                continue
            data = self._chunk(key, c)
            if c.offsets == lo and c.sizes == box:  # the common case: one stored chunk per slab
                out, covered = data, data.numel()
                break
            if out is None:
                out = torch.empty(box, dtype=info.dtype)
            src = data[tuple(slice(a - o, b - o) for (a, b), o in zip(inter, c.offsets))]
            out[tuple(slice(a - low, b - low) for (a, b), low in zip(inter, lo))] = src
            n = 1
            for a, b in inter:
                n *= b - a
            covered += n
        if out is None or covered != out.numel():
            raise CheckpointError(
                f"{key} (layer {layer}): stored chunks cover {covered} elements of the slab"
            )
        return out[0] if info.stacked else out

    @staticmethod
    def _chunk(key: str, c: _Chunk) -> torch.Tensor:
        try:
            with FileWindow(c.path, c.offset, c.length) as window:  # reads only this tensor's bytes
                data = torch.load(cast(IO[bytes], window), map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as e:  # corrupt bytes raise anything from RuntimeError to UnpicklingError
            raise CheckpointError(
                f"{key}: corrupt chunk at {list(c.offsets)} in {c.path} ({type(e).__name__})"
            ) from None
        if not isinstance(data, torch.Tensor) or tuple(data.shape) != c.sizes:
            raise CheckpointError(
                f"{key}: stored chunk at {list(c.offsets)} has shape "
                f"{list(getattr(data, 'shape', []))}, metadata says {list(c.sizes)}"
            )
        return data
