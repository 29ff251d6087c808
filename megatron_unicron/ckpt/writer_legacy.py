"""Writer of Megatron-LM legacy (``--ckpt-format torch``) checkpoints at a target TP/PP.

Writes ``iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt`` for every (TP, PP) rank as Megatron-LM's
``save_checkpoint`` does (``generate_state_dict``): ``args`` rewritten for the target, ``checkpoint_version``
3.0, ``iteration``, ``model`` with stage-local names in module order (``*._extra_state`` after each module's
parameters), ``optimizer`` with param ids in megatron-core's group order (``common_out``), the scheduler, and
``rng_state`` when the layout is unchanged. With tied embeddings and PP > 1 the last stage gets its own
``output_layer.weight`` copy of the word embeddings, with their Adam moments. A distributed-optimizer target
also gets ``distrib_optim.pt`` (``distopt_layout``).

Slabs stream from the ``Pipeline``: each TP shard is written as a record of its rank's file at once, so memory
is bounded by one slab, except for a distributed-optimizer target, whose flat per-rank buffers (three fp32
vectors of the stage's size) are filled in memory and written at the end.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Any

import torch

from megatron_unicron.ckpt import tp_rules
from megatron_unicron.ckpt.common_out import assign_ids, step_tensor
from megatron_unicron.ckpt.distopt_layout import BufferLayout, BufferParam, buffer_layout
from megatron_unicron.ckpt.layout_rules import (
    LAYER_PREFIX,
    canonical_to_local,
    local_to_canonical,
    optimizer_key,
    parse_optimizer_key,
    stage_param_names,
)
from megatron_unicron.ckpt.plan import Pipeline, Target, target_args
from megatron_unicron.ckpt.report import ConversionReport
from megatron_unicron.ckpt.source import CheckpointSource, OptimizerKind
from megatron_unicron.ckpt.zip_writer import TensorRef, TorchZipWriter, WriteQueue

WORD = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
Rank = tuple[int, int]  # (tp, pp)


def iteration_dir(target: Target) -> str:
    """``iter_NNNNNNN`` or ``release``."""
    return "release" if target.release else f"iter_{target.iteration:07d}"


class LegacyWriter:
    """Streams a ``Pipeline`` into legacy rank files under ``root``; see the module docstring."""

    def __init__(
        self,
        root: str,
        source: CheckpointSource,
        target: Target,
        pipeline: Pipeline,
        report: ConversionReport,
    ) -> None:
        self.root = root
        self.source = source
        self.target = target
        self.pipeline = pipeline
        self.report = report
        self.layout = target.layout
        self.stages = self.layout.stage_layers(source.spec.num_layers)
        self.top_keys = {
            k for k in pipeline.tensors if not k.startswith(LAYER_PREFIX) and parse_optimizer_key(k) is None
        }
        self.params: dict[int, list[tuple[str, int | None]]] = {
            pp: stage_param_names(
                source.spec,
                self.stages[pp],
                first=pp == 0,
                last=pp == self.layout.pp - 1,
                top_keys=self.top_keys,
                layer_suffixes=source.layer_suffixes,
            )
            for pp in range(self.layout.pp)
        }
        self.refs: dict[Rank, dict[tuple[str, int | None], TensorRef]] = collections.defaultdict(dict)
        self.writers: dict[Rank, TorchZipWriter] = {}
        self.buffers: dict[Rank, dict[str, torch.Tensor]] = {}
        self.buffer_layouts: dict[Rank, BufferLayout] = {}
        self._queue: WriteQueue | None = None

    # ------------------------------------------------------------------ streaming
    def _path(self, rank: Rank) -> str:
        return os.path.join(self.root, iteration_dir(self.target), self.layout.rank_dir(*rank))

    def _writer(self, rank: Rank) -> TorchZipWriter:
        if rank not in self.writers:
            os.makedirs(self._path(rank), exist_ok=True)
            self.writers[rank] = TorchZipWriter(
                os.path.join(self._path(rank), "model_optim_rng.pt"), self._queue
            )
        return self.writers[rank]

    def _destinations(self, key: str, layer: int | None) -> list[tuple[int, str]]:
        parsed = parse_optimizer_key(key)
        model_key = parsed[1] if parsed else key
        last = self.layout.pp - 1
        if layer is not None:
            per = len(self.stages[0])
            return [(layer // per, key)]
        if model_key.startswith("embedding."):
            out = [(0, key)]
            if model_key == WORD and self.source.spec.tied and self.layout.pp > 1:
                out.append((last, optimizer_key(parsed[0], OUTPUT) if parsed else OUTPUT))
            return out
        return [(last, key)]

    def write(self) -> None:
        """Stream every target slab into the rank files, then finish them."""
        try:
            with WriteQueue() as self._queue:  # a slab's write overlaps reading the next one
                tp = self.layout.tp
                for key, info in self.pipeline.tensors.items():
                    split = self.pipeline.split(key)
                    for layer in info.layers:
                        shards = tp_rules.split_full(split, self.pipeline.slab(key, layer), tp, key)
                        for pp, dest in self._destinations(key, layer):
                            for t in range(tp):
                                self._put((t, pp), dest, layer, shards[t])
                        del shards  # release the slab before the next one is read
                for pp in range(self.layout.pp):
                    for t in range(tp):
                        self._finish((t, pp))
        finally:
            for w in self.writers.values():  # no-op for finished files; the caller deletes the rest
                with contextlib.suppress(Exception):
                    w.close()

    def _put(self, rank: Rank, key: str, layer: int | None, shard: torch.Tensor) -> None:
        parsed = parse_optimizer_key(key)
        if parsed is not None and self.target.optimizer is OptimizerKind.DISTRIBUTED:
            state, model_key = parsed
            name = canonical_to_local(model_key, layer, self.stages[rank[1]].start, self.target.layer_spec)
            lo, hi = self._buffer_layout(rank).ranges[name]
            buf = self.buffers.setdefault(rank, {})
            world = "param" if state == "fp32_param" else state
            if world not in buf:
                buf[world] = torch.zeros(self._buffer_layout(rank).numel_unpadded, dtype=torch.float32)
            buf[world][lo:hi] = shard.reshape(-1)
            return
        self.refs[rank][(key, layer)] = self._writer(rank).add(shard)

    def _shard_shape(self, key: str, layer: int | None) -> tuple[int, ...]:
        info = self.pipeline.tensors[key]
        full = info.shape[1:] if info.stacked else info.shape
        return tp_rules.shard_shape(self.pipeline.split(key), full, self.layout.tp)

    def _names(
        self, pp: int
    ) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, tuple[str, int | None]]]:
        names, shapes, canon = [], {}, {}
        for key, layer in self.params[pp]:
            name = canonical_to_local(key, layer, self.stages[pp].start, self.target.layer_spec)
            names.append(name)
            shapes[name] = self._shard_shape(WORD if key == OUTPUT and self.source.spec.tied else key, layer)
            canon[name] = (key, layer)
        return names, shapes, canon

    def _buffer_layout(self, rank: Rank) -> BufferLayout:
        if rank not in self.buffer_layouts:
            pp = rank[1]
            names, shapes, _ = self._names(pp)
            first, last = pp == 0, pp == self.layout.pp - 1
            tied = self.source.spec.tied and self.layout.pp > 1
            params = []
            for n in names:
                numel = 1
                for s in shapes[n]:
                    numel *= s
                shared = tied and ((first and not last and n == WORD) or (last and not first and n == OUTPUT))
                params.append(BufferParam(n, numel, shared))
            args = self.source.common.args
            bucket = None
            if getattr(args, "overlap_grad_reduce", False) and pp == 0:
                size = getattr(args, "ddp_bucket_size", None)
                dp = int(getattr(args, "data_parallel_size", 1) or 1)
                bucket = int(size) if size else max(40_000_000, 1_000_000 * dp)
            self.buffer_layouts[rank] = buffer_layout(params, bucket)
        return self.buffer_layouts[rank]

    # ------------------------------------------------------------------ finishing one rank
    def _model(self, rank: Rank) -> collections.OrderedDict[str, Any]:
        pp = rank[1]
        extra = self.source.extra_states
        model: collections.OrderedDict[str, Any] = collections.OrderedDict()
        last = pp == self.layout.pp - 1
        offset = self.stages[pp].start

        spec = self.target.layer_spec

        def emit_extra(local_module: str) -> None:
            local = f"{local_module}._extra_state"
            key, layer = local_to_canonical(local, offset)
            if local_module.endswith(".core_attention"):  # a TE module: present with the TE spec only
                if spec == "te":
                    model[local] = extra[key][layer or 0] if key in extra else None
            elif key in extra:
                model[local] = extra[key][layer or 0]

        entries = [(canonical_to_local(k, layer, offset, spec), k, layer) for k, layer in self.params[pp]]
        for n, (name, key, layer) in enumerate(entries):
            module = name.rsplit(".", 1)[0]
            if layer is not None and key == LAYER_PREFIX + self.source.layer_suffixes[0]:
                emit_extra(f"decoder.layers.{layer - offset}.self_attention.core_attention")
            model[name] = self.refs[rank][(key, layer)]
            nxt = entries[n + 1][0].rsplit(".", 1)[0] if n + 1 < len(entries) else None
            if nxt != module:  # a module's extra state follows its parameters
                if layer is not None:
                    emit_extra(module)
                elif module != "output_layer" and f"{module}._extra_state" in extra:
                    model[f"{module}._extra_state"] = extra[f"{module}._extra_state"][0]
        if last and extra:  # the output layer module exists on the last stage even when its weight is tied
            model["output_layer._extra_state"] = extra.get("output_layer._extra_state", [None])[0]
        return model

    def _optimizer(self, rank: Rank) -> dict[str, Any] | None:
        meta = self.source.common.optimizer
        kind = self.target.optimizer
        if kind is None or meta is None:
            return None
        names, shapes, canon = self._names(rank[1])
        decoupled = getattr(self.source.common.args, "decoupled_lr", None) is not None
        groups, members = assign_ids(meta, names, shapes, decoupled)
        if kind is OptimizerKind.DISTRIBUTED:
            out: dict[str, Any] = {
                "optimizer": {"param_groups": [dict(g, step=float(meta.step or 0.0)) for g in groups]}
            }
            if meta.grad_scaler is not None:
                out["grad_scaler"] = meta.grad_scaler
            return out

        def ref(state: str, name: str) -> TensorRef:
            key, layer = canon[name]
            return self.refs[rank][(optimizer_key(state, key), layer)]

        state: dict[int, dict[str, Any]] = {}
        param_groups, fp32 = [], []
        pid = 0
        for g, mem in zip(groups, members):
            ids = []
            for name in mem:
                state[pid] = {
                    "step": step_tensor(meta),
                    "exp_avg": ref("exp_avg", name),
                    "exp_avg_sq": ref("exp_avg_sq", name),
                }
                ids.append(pid)
                pid += 1
            param_groups.append(dict(g, params=ids))
            fp32.append([ref("fp32_param", n) for n in mem] if kind is OptimizerKind.MIXED else [])
        inner = {"state": state, "param_groups": param_groups}
        if kind is OptimizerKind.ADAM:
            return inner
        out = {"optimizer": inner, "fp32_from_fp16_params": fp32}
        if meta.grad_scaler is not None:
            out["grad_scaler"] = meta.grad_scaler
        return out

    def _finish(self, rank: Rank) -> None:
        common = self.source.common
        sd: dict[str, Any] = {
            "args": target_args(self.source, self.target),
            "checkpoint_version": 3.0,
            "iteration": common.iteration,
            "model": self._model(rank),
        }
        opt = self._optimizer(rank)
        if opt is not None:  # Megatron-LM saves the scheduler together with the optimizer
            sd["optimizer"] = opt
            if common.opt_param_scheduler is not None:
                sd["opt_param_scheduler"] = common.opt_param_scheduler
        if self.target.keep_rng and common.rng is not None:
            if common.rerun_state_machine is not None:
                sd["rerun_state_machine"] = common.rerun_state_machine
            sd["rng_state"] = common.rng[(rank[1], rank[0])]
        if common.num_floating_point_operations_so_far is not None:
            sd["num_floating_point_operations_so_far"] = common.num_floating_point_operations_so_far
        sd.update(common.extra)
        writer = self._writer(rank)
        writer.finish(sd)
        self.report.bytes_written += writer.nbytes
        if self.target.optimizer is OptimizerKind.DISTRIBUTED and opt is not None:
            self._write_distopt(rank)

    def _write_distopt(self, rank: Rank) -> None:
        layout = self._buffer_layout(rank)
        buf = self.buffers.pop(rank, {})
        world = {
            k: buf.get(k, torch.zeros(layout.numel_unpadded)) for k in ("param", "exp_avg", "exp_avg_sq")
        }
        dtype = self.source.tensors[WORD].dtype
        grad_dtype = (
            torch.float32
            if getattr(self.source.common.args, "accumulate_allreduce_grads_in_fp32", True)
            else dtype
        )
        w = TorchZipWriter(os.path.join(self._path(rank), "distrib_optim.pt"))
        try:
            w.finish(
                {
                    "buckets_coalesced": True,
                    0: {(dtype, grad_dtype): {**world, "numel_unpadded": layout.numel_unpadded}},
                }
            )
        finally:
            w.close()
        self.report.bytes_written += w.nbytes
