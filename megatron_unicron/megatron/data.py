"""GPT pretraining data on megatron-core: tokenizers, train/valid/test datasets and the DP sampler.

Datasets come from megatron-core's `BlendedMegatronDatasetBuilder`: `GPTDataset` over Megatron
indexed files (`<prefix>.bin/.idx`, written by `tools/preprocess_data.py`) or `MockGPTDataset`.
They do not depend on the parallel layout: every rank builds the whole train/valid/test datasets once
per process, and a sample is named by its global index alone. So a change of TP/PP/DP never rebuilds
them, and a restarted process gets the same samples from the index cache the first start wrote.
Which samples a DP rank trains on is `sampler.py`'s (Megatron-LM's `MegatronPretrainingSampler`);
this module re-exports it and the tokenizers, so the training script needs this one import.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from megatron_unicron.megatron.sampler import (
    BATCH_KEYS,
    Batch,
    DatasetExhaustedError,
    SampleDataset,
    eval_microbatches_for_rank,
    global_batch_tokens,
    microbatch_sample_indices,
    microbatches_for_rank,
    num_microbatches,
)
from megatron_unicron.megatron.tokenizer import (
    TOKENIZER_TYPES,
    GPT2BPETokenizer,
    NullTokenizer,
    Tokenizer,
    build_tokenizer,
    padded_vocab_size,
)

__all__ = [
    "BATCH_KEYS",
    "TOKENIZER_TYPES",
    "Batch",
    "DatasetExhaustedError",
    "Datasets",
    "GPT2BPETokenizer",
    "NullTokenizer",
    "SampleDataset",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "eval_microbatches_for_rank",
    "global_batch_tokens",
    "microbatch_sample_indices",
    "microbatches_for_rank",
    "num_microbatches",
    "padded_vocab_size",
]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


@dataclass(frozen=True)
class Datasets:
    """The three splits built by `build_datasets`; a split is None when `--split` gives it no data."""

    train: SampleDataset | None
    valid: SampleDataset | None
    test: SampleDataset | None


def build_datasets(
    *,
    data_path: list[str] | None,
    mock: bool,
    split: str,
    seq_length: int,
    seed: int,
    tokenizer: Tokenizer,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    data_cache_path: str | None,
    create_attention_mask: bool = True,
) -> Datasets:
    """Build train/valid/test GPT datasets through megatron-core's `BlendedMegatronDatasetBuilder`.

    `data_path` is Megatron-LM's `--data-path`: prefixes, or alternating weights and prefixes.
    `mock` builds `MockGPTDataset` instead (megatron-core then splits its mock documents 1:1:1 and
    ignores `split`). Each split has at least the requested number of samples (megatron repeats epochs).

    Call it on every rank once per process after `torch.distributed` is initialised: rank 0 builds the
    index cache (`data_cache_path`, default `<data dir>/cache`) and the others read it after a barrier
    on the default group. A process that starts alone (a restarted worker) may call it before joining
    the process group instead: it then reads the cache without any collective.
    """
    sizes = [train_samples, valid_samples, test_samples]
    _check_arguments(data_path, mock, seq_length, seed, sizes)
    # Imported here so that tokenizers and the sampler work without loading megatron-core.
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.core.datasets.utils import get_blend_from_list

    blend = None
    if not mock:
        _check_split(split)
        blend = get_blend_from_list(data_path)
        _check_blend(blend, split)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
        num_dataset_builder_threads=1,
    )
    dataset_class = MockGPTDataset if mock else GPTDataset
    train, valid, test = BlendedMegatronDatasetBuilder(dataset_class, sizes, lambda: True, config).build()
    if train is None and train_samples > 0:
        raise ValueError(
            f"--split {split!r} gives the train split no data, but {train_samples} train samples are needed"
        )
    logger.info(
        "built %s datasets: train %s, valid %s, test %s samples",
        dataset_class.__name__,
        *(None if d is None else len(d) for d in (train, valid, test)),
    )
    return Datasets(train=train, valid=valid, test=test)


def _check_arguments(
    data_path: list[str] | None, mock: bool, seq_length: int, seed: int, sizes: list[int]
) -> None:
    if mock and data_path:
        raise ValueError("give either --mock-data or --data-path, not both")
    if not mock and not data_path:
        raise ValueError("no data: give --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
    if seq_length < 1:
        raise ValueError(f"--seq-length must be positive, got {seq_length}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    for name, size in zip(SPLIT_NAMES, sizes):
        if size < 0:
            raise ValueError(f"{name} samples must be >= 0, got {size}")


def _check_split(split: str) -> None:
    parts = [part.strip() for part in split.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"--split {split!r} must be up to three non-negative comma-separated weights for "
            "train,valid,test with a positive sum, e.g. 969,30,1"
        )


def _check_blend(blend: tuple[list[str], list[float] | None], split: str) -> None:
    """Reject missing files, bad weights, and a split that would get no tokens.

    megatron-core loops forever adding epochs to a split without tokens (even when no sample of it is
    asked for), so this is checked first, with the builder's own split arithmetic.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, weights = blend
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"--data-path weights {weights} must be non-negative with a positive sum")
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for prefix in prefixes:
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"--data-path prefix {prefix!r}: {' and '.join(missing)} not found "
                "(make them with tools/preprocess_data.py; the prefix ends in _text_document)"
            )
        indexed = IndexedDataset(prefix)  # keep it alive: its lengths are a view of its mmap
        lengths = indexed.sequence_lengths
        for name, bounds in zip(SPLIT_NAMES, matrix):
            if bounds is None:
                continue
            begin, end = (int(round(b * float(len(lengths)))) for b in bounds)
            if int(lengths[begin:end].sum()) == 0:
                raise ValueError(
                    f"--data-path prefix {prefix!r} has {len(lengths)} documents, and --split {split!r} "
                    f"leaves the {name} split none of them: change --split (a weight of 0 drops a split) "
                    "or add documents"
                )
        del lengths, indexed
