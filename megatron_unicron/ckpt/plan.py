"""What a conversion writes: the target description and the slab pipeline from source to writer.

``Target`` is the requested layout, format, optimizer kind and layer spec, checked against the model.
``Pipeline`` lists the target's full tensors and produces each target slab on demand: it reads the source
slab, re-pads vocabulary rows for the target TP, derives fp32 main params when the target optimizer needs
them and the source has none (fp32 models: a copy of the parameter), and feeds the report's ``before`` and
``written`` checksums as the slabs stream by.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import torch

from megatron_unicron.ckpt import tp_rules
from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.layout_rules import Layout, Split, optimizer_key, parse_optimizer_key, split_of
from megatron_unicron.ckpt.report import ConversionReport, TensorStats
from megatron_unicron.ckpt.source import CheckpointSource, OptimizerKind, TensorInfo

FORMATS = ("torch", "torch_dist")


@dataclass(frozen=True, kw_only=True)
class Target:
    """The checkpoint to write: layout, format, optimizer kind (None: no optimizer), layer spec, vocab."""

    layout: Layout
    format: str
    optimizer: OptimizerKind | None
    layer_spec: str
    padded_vocab_size: int
    keep_rng: bool
    iteration: int
    release: bool

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CheckpointError(f"--ckpt-format {self.format!r}: choose torch or torch_dist")
        if self.layer_spec not in ("local", "te"):
            raise CheckpointError(f"layer spec {self.layer_spec!r}: choose local or te")
        if self.padded_vocab_size % self.layout.tp:
            raise CheckpointError(
                f"padded vocabulary {self.padded_vocab_size} does not divide by TP={self.layout.tp}"
            )


def make_target(
    source: CheckpointSource,
    *,
    tp: int,
    pp: int,
    fmt: str,
    no_optimizer: bool = False,
    target_optimizer: str = "same",
    layer_spec: str | None = None,
) -> Target:
    """Check the requested target against the source's model and derive what it needs."""
    layout = Layout(tp, pp)
    layout.check(source.spec)
    padded = source.spec.padded_vocab(tp)
    if (
        source.spec.true_vocab_size is not None
        and source.spec.padded_vocab(source.layout.tp) != source.spec.padded_vocab_size
    ):
        raise CheckpointError(
            f"vocabulary size {source.spec.true_vocab_size} does not pad to the checkpoint's "
            f"padded_vocab_size {source.spec.padded_vocab_size} at TP={source.layout.tp}"
        )
    meta = source.common.optimizer
    kind: OptimizerKind | None = None
    if not no_optimizer and meta is not None:
        dtype = source.tensors["embedding.word_embeddings.weight"].dtype
        if target_optimizer == "same":
            kind = meta.kind
        elif target_optimizer == "distributed":
            kind = OptimizerKind.DISTRIBUTED
        elif target_optimizer == "plain":
            kind = OptimizerKind.ADAM if dtype == torch.float32 else OptimizerKind.MIXED
        else:
            raise CheckpointError(
                f"--target-optimizer {target_optimizer!r}: choose same, plain or distributed"
            )
    return Target(
        layout=layout,
        format=fmt,
        optimizer=kind,
        layer_spec=layer_spec or source.layer_spec,
        padded_vocab_size=padded,
        keep_rng=source.common.rng is not None and layout == source.layout,
        iteration=source.iteration,
        release=source.common.release,
    )


def target_args(source: CheckpointSource, target: Target) -> argparse.Namespace:
    """The source's ``args`` (original objects) rewritten for the target layout and format."""
    args = copy.copy(source.common.args)
    dp = int(getattr(args, "data_parallel_size", 1) or 1)
    updates = {
        "tensor_model_parallel_size": target.layout.tp,
        "pipeline_model_parallel_size": target.layout.pp,
        "padded_vocab_size": target.padded_vocab_size,
        "ckpt_format": target.format,
        "world_size": target.layout.tp * target.layout.pp * dp,
        "decoder_first_pipeline_num_layers": None,
        "decoder_last_pipeline_num_layers": None,
    }
    if target.optimizer is not None:
        updates["use_distributed_optimizer"] = target.optimizer is OptimizerKind.DISTRIBUTED
        if target.optimizer is OptimizerKind.DISTRIBUTED and target.format == "torch_dist":
            updates["dist_ckpt_optim_fully_reshardable"] = True
    else:  # Megatron-LM then skips the optimizer and scheduler on load
        updates["no_save_optim"] = True
    if not target.keep_rng:
        updates["no_save_rng"] = True
    if target.layer_spec != source.layer_spec:
        updates["transformer_impl"] = "transformer_engine" if target.layer_spec == "te" else "local"
    for k, v in updates.items():
        setattr(args, k, v)
    return args


class Pipeline:
    """Produces target slabs from the source and records their checksums in the report."""

    def __init__(self, source: CheckpointSource, target: Target, report: ConversionReport) -> None:
        self.source = source
        self.target = target
        self.report = report
        self.tensors: dict[str, TensorInfo] = {}
        self._derived: set[str] = set()
        self._before: dict[str, TensorStats] = {}
        self._written: dict[str, TensorStats] = {}
        self._transformed: set[str] = set()  # keys whose written slabs differ from the source's
        model_keys = [k for k in source.tensors if parse_optimizer_key(k) is None]
        for k in model_keys:
            self.tensors[k] = self._target_info(source.tensors[k])
        if target.optimizer is not None:
            states = ["exp_avg", "exp_avg_sq"]
            if target.optimizer in (OptimizerKind.MIXED, OptimizerKind.DISTRIBUTED):
                states.append("fp32_param")
            for k in model_keys:
                for state in states:
                    key = optimizer_key(state, k)
                    if key in source.tensors:
                        self.tensors[key] = self._target_info(source.tensors[key])
                    elif state == "fp32_param":
                        info = self._target_info(source.tensors[k])
                        self.tensors[key] = TensorInfo(key, info.shape, torch.float32, info.stacked)
                        self._derived.add(key)
                    else:
                        raise CheckpointError(
                            f"the source has no {state} for {k} (incomplete optimizer state)"
                        )
        for k in source.tensors:
            if k not in self.tensors:
                why = "--no-optimizer" if target.optimizer is None else "not used by the target optimizer"
                report.key(k).note = f"dropped: {why}"
        for k, info in self.tensors.items():
            if k not in self._derived:
                self._before[k] = TensorStats(source.tensors[k].shape, source.tensors[k].dtype)
            self._written[k] = TensorStats(info.shape, info.dtype)
            if info.shape != source.tensors.get(k, info).shape:
                report.key(k).note = f"vocabulary re-padded to {self.target.padded_vocab_size} rows"
            elif k in self._derived:
                report.key(k).note = "fp32 main params derived from the fp32 parameters"
            report.largest_tensor_bytes = max(report.largest_tensor_bytes, info.numel * info.dtype.itemsize)

    def _target_info(self, info: TensorInfo) -> TensorInfo:
        parsed = parse_optimizer_key(info.key)
        model_key = parsed[1] if parsed else info.key
        if split_of(model_key, self.source.spec.swiglu) is Split.VOCAB:
            return TensorInfo(
                info.key, (self.target.padded_vocab_size, *info.shape[1:]), info.dtype, info.stacked
            )
        return info

    def split(self, key: str) -> Split:
        """TP split of a target key."""
        parsed = parse_optimizer_key(key)
        return split_of(parsed[1] if parsed else key, self.source.spec.swiglu)

    def slab(self, key: str, layer: int | None) -> torch.Tensor:
        """The target slab of ``key`` (layer ``layer``), read from the source and checksummed."""
        info = self.tensors[key]
        if key in self._derived:
            model_key = key.split(".", 3)[3]
            src = self.source.read(model_key, layer).to(torch.float32)
            self.report.bytes_read += src.numel() * self.source.tensors[model_key].dtype.itemsize
        else:
            src = self.source.read(key, layer)
            self.report.bytes_read += src.numel() * src.element_size()
            self._before[key].add(src, layer)
        self.report.largest_slab_bytes = max(self.report.largest_slab_bytes, src.numel() * src.element_size())
        out = src
        if self.split(key) is Split.VOCAB and src.shape[0] != info.shape[0]:
            out = tp_rules.resize_rows(src, info.shape[0])
        expected = info.shape[1:] if info.stacked else info.shape
        if tuple(out.shape) != tuple(expected):
            raise CheckpointError(
                f"{key} (layer {layer}): slab shape {list(out.shape)}, expected {list(expected)}"
            )
        if out is not src or key in self._derived:
            self._transformed.add(key)
            self._written[key].add(out, layer)
        return out

    def finish(self) -> None:
        """Move the accumulated checksums into the report."""
        for k in self.tensors:
            entry = self.report.key(k)
            if k in self._before:
                entry.before = self._before[k].digest()
            # an untransformed key was written as read: its written checksum is the source's
            entry.written = self._written[k].digest() if k in self._transformed else entry.before
