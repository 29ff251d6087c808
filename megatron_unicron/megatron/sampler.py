"""Megatron-LM's `MegatronPretrainingSampler` as arithmetic: which samples each DP rank trains on.

The global batch that starts at `consumed_samples` holds the samples `consumed_samples + k`,
k < global_batch_size; micro-batch m of data-parallel rank r holds
`consumed_samples + m*micro*dp + r*micro + j`, j < micro. For any DP size the union over ranks of one
global batch is the same samples, and concatenating the ranks' micro-batches rank-major per micro-batch
gives them in global order. Nothing here depends on the parallel layout beyond (dp_rank, dp_size), so
after a change of DP the next global batch is the same samples in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

# The keys of Megatron-LM's `get_batch` for GPT, in its order.
BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")

Batch = dict[str, torch.Tensor | None]
"""One micro-batch: `BATCH_KEYS` to [micro, seq] tensors ([micro, 1, seq, seq] bool attention mask,
True where attention is masked, or None when the datasets were built without it)."""


class SampleDataset(Protocol):
    """A megatron-core GPT dataset as the sampler sees it (GPTDataset, MockGPTDataset, BlendedDataset)."""

    def __len__(self) -> int:
        """Number of samples."""
        ...

    def __getitem__(self, idx: int) -> Mapping[str, Any]:
        """Sample `idx` as a dict of tensors (tokens, labels, loss_mask, position_ids, ...)."""
        ...


class DatasetExhaustedError(IndexError):
    """A global batch reaches past the end of its dataset."""


def num_microbatches(*, global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
    """Micro-batches per rank in one global batch: global / (micro × DP), which must divide exactly."""
    for name, value in (
        ("global batch size", global_batch_size),
        ("micro batch size", micro_batch_size),
        ("data-parallel size", dp_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by micro batch size {micro_batch_size} "
            f"x data-parallel size {dp_size}"
        )
    return global_batch_size // (micro_batch_size * dp_size)


def microbatch_sample_indices(
    *, consumed_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[range]:
    """Global sample indices of each micro-batch of `dp_rank` in the global batch at `consumed_samples`."""
    count = num_microbatches(
        global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, dp_size=dp_size
    )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is outside [0, {dp_size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed samples must be >= 0, got {consumed_samples}")
    stride = micro_batch_size * dp_size
    first = consumed_samples + dp_rank * micro_batch_size
    return [range(first + m * stride, first + m * stride + micro_batch_size) for m in range(count)]


def microbatches_for_rank(
    dataset: SampleDataset,
    *,
    consumed_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> list[Batch]:
    """This DP rank's micro-batches of the global batch that starts at `consumed_samples`.

    Each is a dict like Megatron-LM's `get_batch` gives to `forward_step` (see `Batch`).
    """
    _check_room(dataset, consumed_samples, global_batch_size, "consumed_samples")
    indices = microbatch_sample_indices(
        consumed_samples=consumed_samples,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return [_collate([dataset[i] for i in micro]) for micro in indices]


def eval_microbatches_for_rank(
    dataset: SampleDataset,
    *,
    consumed_valid_samples: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> list[Batch]:
    """One evaluation iteration's micro-batches for this DP rank, from the valid (or test) dataset.

    As in Megatron-LM, evaluation keeps its own position: `consumed_valid_samples` grows by the global
    batch size for each of the `--eval-iters` iterations of every evaluation, and a training run asks
    `eval_samples = (train_iters // eval_interval + 1) * eval_iters * global_batch_size` valid samples.
    """
    _check_room(dataset, consumed_valid_samples, global_batch_size, "consumed_valid_samples")
    return microbatches_for_rank(
        dataset,
        consumed_samples=consumed_valid_samples,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )


def global_batch_tokens(
    dataset: SampleDataset, consumed_samples: int, global_batch_size: int
) -> torch.Tensor:
    """The tokens of every sample of one global batch, in global order: [global_batch_size, seq]."""
    if global_batch_size < 1 or consumed_samples < 0:
        raise ValueError(
            "need global_batch_size >= 1 and consumed_samples >= 0, "
            f"got {global_batch_size} and {consumed_samples}"
        )
    _check_room(dataset, consumed_samples, global_batch_size, "consumed_samples")
    return torch.stack(
        [dataset[i]["tokens"] for i in range(consumed_samples, consumed_samples + global_batch_size)]
    )


def _collate(samples: Sequence[Mapping[str, Any]]) -> Batch:
    batch: Batch = {}
    for key in BATCH_KEYS:
        present = key in samples[0] and samples[0][key] is not None
        batch[key] = torch.stack([sample[key] for sample in samples]) if present else None
    return batch


def _check_room(dataset: SampleDataset, consumed: int, global_batch_size: int, what: str) -> None:
    if consumed + global_batch_size > len(dataset):
        raise DatasetExhaustedError(
            f"the global batch at {what}={consumed} needs samples up to {consumed + global_batch_size}, "
            f"but the dataset has {len(dataset)}: build it with more samples (train/eval iterations)"
        )
