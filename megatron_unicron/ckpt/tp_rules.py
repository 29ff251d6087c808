"""Merging tensor-parallel shards into full tensors and splitting full tensors into shards.

Full tensors are in megatron-core's sharded layout (what ``dist_checkpointing`` stores): the concatenation
of the TP shards along the split dim, except for SwiGLU's fc1 whose full tensor is ``[gate; up]`` (all gate
rows, then all up rows) while each TP shard holds ``[gate_t; up_t]``: re-splitting it is not a plain concat.
Vocabulary-split tensors may change their padded row count with TP (``resize_rows``).
"""

from __future__ import annotations

import torch

from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.layout_rules import Split


def merge(split: Split, shards: list[torch.Tensor], name: str) -> torch.Tensor:
    """The full tensor from its TP shards (shard order = TP rank)."""
    if split is Split.REPLICATED:
        first = shards[0]
        for t, s in enumerate(shards[1:], start=1):
            if s.shape != first.shape or not torch.equal(s, first):
                raise CheckpointError(
                    f"{name}: TP rank {t} holds a different copy of a replicated tensor (inconsistent shards)"
                )
        return first
    if split in (Split.DIM0, Split.VOCAB):
        return torch.cat(shards, dim=0)
    if split is Split.DIM1:
        return torch.cat(shards, dim=1)
    halves = []
    for t, s in enumerate(shards):
        if s.shape[0] % 2:
            raise CheckpointError(
                f"{name}: SwiGLU fc1 shard of TP rank {t} has an odd row count {s.shape[0]}"
            )
        halves.append(s.chunk(2, dim=0))
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def split_full(split: Split, full: torch.Tensor, tp: int, name: str) -> list[torch.Tensor]:
    """The TP shards of a full tensor (each contiguous)."""
    if split is Split.REPLICATED:
        return [full] * tp
    dim = 1 if split is Split.DIM1 else 0
    size = full.shape[dim] // (2 if split is Split.SWIGLU else 1)
    if size % tp:
        raise CheckpointError(f"{name}: dimension {full.shape[dim]} does not divide by TP={tp}")
    if split is Split.SWIGLU:
        gate, up = full.chunk(2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]
    return [c.contiguous() for c in full.chunk(tp, dim=dim)]


def shard_shape(split: Split, full_shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """Shape of one TP shard of a tensor of ``full_shape``."""
    shape = list(full_shape)
    if split is Split.DIM1:
        shape[1] //= tp
    elif split is not Split.REPLICATED:
        shape[0] //= tp
    return tuple(shape)


def resize_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """Trim or zero-pad the rows (padded vocabulary) of a vocabulary-split tensor to ``rows``."""
    if full.shape[0] == rows:
        return full
    if full.shape[0] > rows:
        return full[:rows].contiguous()
    pad = torch.zeros((rows - full.shape[0], *full.shape[1:]), dtype=full.dtype)
    return torch.cat([full, pad], dim=0)
