"""Derived defaults and checks of the GPT pretraining arguments that need no world size.

Each check raises a one-line :class:`~megatron_unicron.errors.ConfigError` that names the settings as
the user wrote them (``args.spelled(name)``: the flag, the YAML key, or the derived value) and the fix.
Meanings follow Megatron-LM's ``validate_args`` and ``get_optimizer_param_scheduler`` (core_v0.16.1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from megatron_unicron.errors import ConfigError

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs

__all__ = ["check_files", "check_values", "derive", "split_blend"]

LEGACY_SPLIT = "969, 30, 1"
"""Megatron-LM's split when --data-path is given without --split (it warns and uses this)."""

_POSITIVE = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "num_query_groups",
    "kv_channels",
    "seq_length",
    "max_position_embeddings",
    "make_vocab_size_divisible_by",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "micro_batch_size",
    "global_batch_size",
    "train_iters",
    "lr_decay_iters",
    "vocab_size",
    "save_interval",
    "log_interval",
    "eval_interval",
    "exit_interval",
    "distributed_timeout_minutes",
    "adam_eps",
)
_NON_NEGATIVE = ("lr", "min_lr", "lr_warmup_iters", "weight_decay", "clip_grad", "eval_iters")
_PROBABILITY = ("hidden_dropout", "attention_dropout", "adam_beta1", "adam_beta2", "lr_warmup_fraction")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def derive(values: dict[str, Any], spelled: dict[str, str]) -> None:
    """Fill, in place, the defaults Megatron-LM derives from other settings before any world size."""
    for name in ("hidden_size", "num_attention_heads"):
        if values[name] <= 0:
            raise ConfigError(f"{spelled[name]}: must be positive")
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    if "ffn_hidden_size" not in values:
        if values.get("swiglu"):
            ffn = int((4 * hidden * 2 / 3) / 64) * 64
            if ffn <= 0:
                raise ConfigError(
                    f"{spelled['swiglu']} with {spelled['hidden_size']} gives an MLP size of 0 "
                    "(Megatron-LM rounds 8/3 x hidden down to a multiple of 64); give "
                    "--ffn-hidden-size explicitly"
                )
            spelled["ffn_hidden_size"] = f"--ffn-hidden-size {ffn} (8/3 x hidden rounded down to 64s)"
        else:
            ffn = 4 * hidden
            spelled["ffn_hidden_size"] = f"--ffn-hidden-size {ffn} (4 x hidden)"
        values["ffn_hidden_size"] = ffn
    if "kv_channels" not in values:
        if hidden % heads:
            raise ConfigError(
                f"{spelled['hidden_size']} is not divisible by "
                f"{spelled['num_attention_heads']}; use a hidden size that is a multiple of "
                f"{heads}, or set --kv-channels"
            )
        values["kv_channels"] = hidden // heads
        spelled["kv_channels"] = f"--kv-channels {hidden // heads} (hidden / heads)"
    if "num_query_groups" not in values:
        gqa = bool(values.get("group_query_attention"))
        values["num_query_groups"] = 1 if gqa else heads
        spelled["num_query_groups"] = (
            "--num-query-groups 1 (the default with --group-query-attention)"
            if gqa
            else f"--num-query-groups {heads} (one per head)"
        )
    if "lr_decay_iters" not in values:
        values["lr_decay_iters"] = values["train_iters"]
        spelled["lr_decay_iters"] = f"--lr-decay-iters {values['train_iters']} (= --train-iters)"
    if values.get("data_path") and values.get("split") is None:
        values["split"] = LEGACY_SPLIT
        spelled["split"] = f"--split '{LEGACY_SPLIT}' (Megatron-LM's default with --data-path)"


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def split_blend(data_path: Sequence[str], where: str) -> tuple[list[str], list[float] | None]:
    """Split Megatron's ``--data-path`` blend into (prefixes, weights or None), as megatron-core reads it.

    An even number of items whose every other item, from the first, is a number is ``W1 P1 W2 P2 ...``;
    anything else is a list of prefixes.
    """
    items = list(data_path)
    if not items:
        raise ConfigError(f"{where}: give at least one dataset prefix (or use --mock-data)")
    if len(items) % 2 == 0:
        weights = [_float_or_none(w) for w in items[0::2]]
        numeric = [w for w in weights if w is not None]
        if len(numeric) == len(weights):
            if any(w < 0 for w in numeric) or sum(numeric) <= 0:
                raise ConfigError(f"{where}: blend weights must be non-negative and not all zero")
            return items[1::2], numeric
        if numeric:
            raise ConfigError(
                f"{where}: mixes weighted and unweighted prefixes; give either P1 P2 ... or W1 P1 W2 P2 ..."
            )
    return items, None


def check_values(args: MegatronArgs) -> None:
    """Check the settings against each other (no file system, no world size)."""
    s = args.spelled
    for name in _POSITIVE:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"{s(name)}: must be positive")
    for name in _NON_NEGATIVE:
        if getattr(args, name) < 0:
            raise ConfigError(f"{s(name)}: must be zero or positive")
    for name in _PROBABILITY:
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"{s(name)}: must be at least 0 and below 1")
    if args.fp16 and args.bf16:
        raise ConfigError(f"{s('fp16')} and {s('bf16')} cannot be combined; keep one of them")
    _check_layout(args)
    if args.global_batch_size is not None and args.global_batch_size % args.micro_batch_size:
        raise ConfigError(
            f"{s('global_batch_size')} is not divisible by {s('micro_batch_size')}; use a "
            f"multiple of {args.micro_batch_size}"
        )
    if args.seq_length > args.max_position_embeddings:
        raise ConfigError(
            f"{s('seq_length')} is longer than {s('max_position_embeddings')}; raise "
            f"--max-position-embeddings to at least {args.seq_length} or shorten --seq-length"
        )
    _check_schedule(args)
    _check_data(args)
    if args.save is not None and args.save_interval is None:
        raise ConfigError(f"{s('save')} needs --save-interval N (iterations between checkpoints)")
    if args.save is None and args.save_interval is not None:
        raise ConfigError(f"{s('save_interval')} has no effect without --save DIR; add --save DIR or drop it")
    if args.tokenizer_type == "GPT2BPETokenizer" and (args.vocab_file is None or args.merge_file is None):
        raise ConfigError(
            f"{s('tokenizer_type')} needs --vocab-file and --merge-file (GPT-2's vocab.json and merges.txt)"
        )
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise ConfigError(
            f"{s('tokenizer_type')} needs --vocab-size N (token ids 0..N-1; the tokenizer "
            "adds end-of-document id N)"
        )


def _check_layout(args: MegatronArgs) -> None:
    s = args.spelled
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    heads, groups = args.num_attention_heads, args.num_query_groups
    if not args.group_query_attention and groups != heads:
        raise ConfigError(
            f"{s('num_query_groups')} needs --group-query-attention; add it, or drop --num-query-groups"
        )
    if heads % tp:
        raise ConfigError(
            f"{s('tensor_model_parallel_size')} does not divide {s('num_attention_heads')}; "
            f"use a tensor-parallel size that divides {heads}: {_divisors(heads)}"
        )
    if heads % groups:
        raise ConfigError(
            f"{s('num_query_groups')} does not divide {s('num_attention_heads')}; use a "
            f"number of query groups that divides {heads}: {_divisors(heads)}"
        )
    if groups % tp:
        raise ConfigError(
            f"{s('tensor_model_parallel_size')} does not divide {s('num_query_groups')}; use "
            f"a tensor-parallel size that divides {groups}: {_divisors(groups)}"
        )
    if args.ffn_hidden_size % tp:
        raise ConfigError(
            f"{s('tensor_model_parallel_size')} does not divide {s('ffn_hidden_size')}; use a "
            f"tensor-parallel size that divides it, or another --ffn-hidden-size"
        )
    if args.num_layers % pp:
        layers = args.num_layers
        raise ConfigError(
            f"{s('pipeline_model_parallel_size')} does not divide {s('num_layers')}; use a "
            f"pipeline-parallel size that divides {layers}: {_divisors(layers)}"
        )


def _check_schedule(args: MegatronArgs) -> None:
    s = args.spelled
    if args.min_lr > args.lr:
        raise ConfigError(
            f"{s('min_lr')} is above {s('lr')}; the learning rate decays from --lr down to "
            "--min-lr, so use --min-lr <= --lr"
        )
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ConfigError(
                f"{s('lr_warmup_fraction')} and {s('lr_warmup_iters')} both set the warmup; keep one of them"
            )
    elif args.lr_warmup_iters >= args.lr_decay_iters:
        raise ConfigError(
            f"{s('lr_warmup_iters')} must be shorter than {s('lr_decay_iters')}; shorten the "
            "warmup or lengthen the decay"
        )


def _check_data(args: MegatronArgs) -> None:
    s = args.spelled
    if args.mock_data and args.data_path is not None:
        raise ConfigError(f"{s('mock_data')} and {s('data_path')} both choose the training data; keep one")
    if not args.mock_data and args.data_path is None:
        raise ConfigError(
            "no training data: give --data-path PREFIX (a preprocessed Megatron dataset, "
            "PREFIX.bin and PREFIX.idx) or --mock-data"
        )
    if args.data_path is not None:
        split_blend(args.data_path, s("data_path"))


def check_files(args: MegatronArgs) -> None:
    """Check that the files the arguments name exist: dataset prefixes and tokenizer files."""
    if args.data_path is not None:
        prefixes, _ = split_blend(args.data_path, args.spelled("data_path"))
        for prefix in prefixes:
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise ConfigError(
                        f"{args.spelled('data_path')}: {prefix}{suffix} not found; --data-path takes the "
                        "prefix P of a preprocessed dataset (P.bin and P.idx, made by Megatron-LM's "
                        "tools/preprocess_data.py)"
                    )
    if args.tokenizer_type == "GPT2BPETokenizer":
        for name in ("vocab_file", "merge_file"):
            path = getattr(args, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{args.spelled(name)}: file not found; give the path of an existing file")
