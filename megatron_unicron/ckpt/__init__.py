"""Megatron-LM checkpoints: read any layout, write any layout, in either on-disk format.

Library API (the CLI is ``unicron-convert`` / ``python tools/convert_checkpoint.py``, see ``convert``)::

    from megatron_unicron.ckpt import open_checkpoint, write_torch_dist, write_legacy

    with open_checkpoint("/ckpts/run1") as src:      # legacy (torch) or torch_dist, any TP/PP
        src.format, src.iteration, src.layout         # "torch" | "torch_dist", 1000, Layout(tp=2, pp=2)
        src.args                                      # argparse.Namespace of plain values (enums -> values)
        src.common                                    # CommonState: scheduler, optimizer groups/step, RNG
        src.tensors                                   # {key: TensorInfo(key, shape, dtype, stacked)}
        src.full_tensor("decoder.layers.self_attention.linear_qkv.weight")   # [layers, rows, hidden]
        src.read("decoder.layers.mlp.linear_fc1.weight", 3)                  # one layer's slab
        write_torch_dist(src, "/ckpts/run1_tp1", tp=1, pp=1)                 # -> ConversionReport

Keys are megatron-core 0.16.1's sharded keys (``GPTModel.sharded_state_dict()``): transformer layers stacked
under ``decoder.layers.<module>.<param>`` with the layer index as the first axis, LayerNorms under their
TE-style names (``self_attention.linear_qkv.layer_norm_weight``), the tied output layer stored once as
``embedding.word_embeddings.weight``, SwiGLU's fc1 as ``[gate; up]``, and the optimizer state as
``optimizer.state.{exp_avg,exp_avg_sq,fp32_param}.<key>``. Reads stream: one slab at a time.

Modules: ``safe_unpickle`` (restricted unpickler, placeholders for megatron globals), ``torch_zip`` (lazy
``torch.save`` reader, streaming writer), ``layout_rules`` / ``tp_rules`` (names and TP/PP splits),
``legacy_reader`` / ``legacy_optim`` / ``distopt_layout`` and ``dist_reader`` (the two formats),
``plan`` / ``common_out`` / ``writer_legacy`` / ``writer_dist`` (targets), ``report``, ``convert`` (CLI).
"""

from __future__ import annotations

from typing import Any

from megatron_unicron.ckpt.errors import CheckpointError, VerificationError
from megatron_unicron.ckpt.layout_rules import Layout, ModelSpec
from megatron_unicron.ckpt.source import (
    CheckpointSource,
    CommonState,
    OptimizerKind,
    OptimizerMeta,
    TensorInfo,
    open_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "CommonState",
    "Layout",
    "ModelSpec",
    "OptimizerKind",
    "OptimizerMeta",
    "TensorInfo",
    "VerificationError",
    "open_checkpoint",
    "write_legacy",
    "write_torch_dist",
]


def write_torch_dist(source: CheckpointSource, save_dir: str, **kwargs: Any) -> Any:
    """Write ``source`` as a torch_dist checkpoint (``tp=``, ``pp=``, ``no_optimizer=``; see ``convert``)."""
    from megatron_unicron.ckpt.convert import convert_source

    return convert_source(source, save_dir, fmt="torch_dist", **kwargs)


def write_legacy(source: CheckpointSource, save_dir: str, **kwargs: Any) -> Any:
    """Write ``source`` as a legacy (``torch``) checkpoint at ``tp=``/``pp=`` (as ``convert``)."""
    from megatron_unicron.ckpt.convert import convert_source

    return convert_source(source, save_dir, fmt="torch", **kwargs)
