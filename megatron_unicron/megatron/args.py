"""Megatron-LM's command line for GPT pretraining, as a frozen value: :class:`MegatronArgs`.

The flags keep Megatron-LM's names, defaults and meanings (reference: Megatron-LM ``core_v0.16.1``,
``megatron/training/arguments.py`` and the config dataclasses it generates flags from), so a Megatron-LM
GPT command line runs here unchanged as far as the flags below go. Field names are Megatron's ``args.``
names. ``--unicron*`` flags come from :class:`megatron_unicron.config.UnicronConfig`.

Precedence: **defaults < YAML (``--yaml-cfg FILE``) < flags on the command line**: a flag given on the
command line overrides the same setting in the YAML file. (Megatron-LM's experimental ``--yaml-cfg``
instead ignores every other flag.) The YAML file takes Megatron-LM's layout: flat keys with ``args.``
names, plus the ``language_model:`` and ``model_parallel:`` sections of Megatron-LM's
``examples/gpt3/gpt_config.yaml``, plus a ``unicron:`` section; ``null`` means "not set"; ``${VAR}`` in a
string is replaced by the environment variable. Unknown flags and keys are errors, never ignored.

Differences from Megatron-LM: ``--transformer-impl`` defaults to None, meaning "transformer_engine when it
imports with CUDA, else local" (Megatron-LM: transformer_engine); settings Megatron-LM rejects late
(missing ``--lr``, ``--train-iters``, ``--tokenizer-type``) are rejected at parse time; bad input raises
:class:`~megatron_unicron.errors.ConfigError` (one line naming the flag and the fix) instead of an
AssertionError. Checks that need the world size live in :func:`resolve_world`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, NoReturn

from megatron_unicron import configtree
from megatron_unicron.config import UnicronConfig
from megatron_unicron.errors import ConfigError
from megatron_unicron.megatron import args_checks, args_yaml

__all__ = [
    "MegatronArgs",
    "build_parser",
    "data_parallel_size",
    "megatron_namespace",
    "parse_args",
    "resolve_world",
]

MODEL, TOKENIZER, PARALLEL, TRAINING = "model", "tokenizer", "parallelism and precision", "training"
OPTIMIZER, DATA, CHECKPOINT, LOGGING = "learning rate and optimizer", "data", "checkpointing", "logging"
LM, MP = "language_model", "model_parallel"  # sections of Megatron-LM's YAML job config


def _arg(
    default: Any = MISSING,
    *,
    help: str,
    group: str,
    section: str | None = None,
    flag: str | None = None,
    derived: bool = False,
    metavar: str | None = None,
) -> Any:
    """A MegatronArgs field; no default means required, unless ``derived`` (the parser computes it)."""
    meta = {
        "help": help,
        "group": group,
        "section": section,
        "flag": flag,
        "derived": derived,
        "metavar": metavar,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class MegatronArgs:
    """Parsed and checked arguments of a GPT pretraining job (Megatron-LM names and meanings).

    Build it with :func:`parse_args`; :func:`resolve_world` fills ``global_batch_size`` once the world
    size is known. ``provenance`` records how each value was given (for error messages) and takes no part
    in comparisons.
    """

    num_layers: int = _arg(help="Number of transformer layers.", group=MODEL, section=LM)
    hidden_size: int = _arg(help="Transformer hidden size.", group=MODEL, section=LM)
    ffn_hidden_size: int = _arg(
        help="MLP hidden size (default: 4 x --hidden-size; with --swiglu, 2/3 of that rounded down to a "
        "multiple of 64).",
        group=MODEL,
        section=LM,
        derived=True,
    )
    num_attention_heads: int = _arg(help="Number of attention heads.", group=MODEL, section=LM)
    group_query_attention: bool = _arg(False, help="Use grouped-query attention.", group=MODEL)
    num_query_groups: int = _arg(
        help="Key/value groups with --group-query-attention (default 1); without it, one per head.",
        group=MODEL,
        section=LM,
        derived=True,
    )
    kv_channels: int = _arg(
        help="Projection size per head (default: --hidden-size / --num-attention-heads).",
        group=MODEL,
        section=LM,
        derived=True,
    )
    seq_length: int = _arg(help="Sequence length of a training sample.", group=MODEL)
    max_position_embeddings: int = _arg(
        help="Size of the position embedding table (at least --seq-length).", group=MODEL
    )
    position_embedding_type: Literal["learned_absolute", "rope"] = _arg(
        "learned_absolute", help="Position embedding: learned_absolute or rope.", group=MODEL
    )
    normalization: Literal["LayerNorm", "RMSNorm"] = _arg(
        "LayerNorm", help="Normalization layer: LayerNorm or RMSNorm.", group=MODEL, section=LM
    )
    swiglu: bool = _arg(False, help="Use a SwiGLU MLP (gated SiLU) instead of GeLU.", group=MODEL)
    add_bias_linear: bool = _arg(
        True,
        help="Drop the bias of every linear layer.",
        group=MODEL,
        section=LM,
        flag="--disable-bias-linear",
    )
    untie_embeddings_and_output_weights: bool = _arg(
        False, help="Give the output layer its own weights instead of the input embedding's.", group=MODEL
    )
    hidden_dropout: float = _arg(
        0.1, help="Dropout probability of the hidden state.", group=MODEL, section=LM
    )
    attention_dropout: float = _arg(0.1, help="Dropout probability after attention.", group=MODEL, section=LM)
    init_method_std: float = _arg(
        0.02, help="Standard deviation of the normal weight initialisation.", group=MODEL, section=LM
    )
    transformer_impl: Literal["local", "transformer_engine"] | None = _arg(
        None,
        help="local or transformer_engine (default: transformer_engine when it imports with CUDA, "
        "else local).",
        group=MODEL,
        section=LM,
    )

    tokenizer_type: Literal["GPT2BPETokenizer", "NullTokenizer"] = _arg(
        help="GPT2BPETokenizer (with --vocab-file, --merge-file) or NullTokenizer (with --vocab-size).",
        group=TOKENIZER,
    )
    vocab_file: str | None = _arg(None, help="Vocabulary file of GPT2BPETokenizer.", group=TOKENIZER)
    merge_file: str | None = _arg(None, help="BPE merge file of GPT2BPETokenizer.", group=TOKENIZER)
    vocab_size: int | None = _arg(
        None,
        help="Number of token ids of NullTokenizer, before its end-of-document id and padding.",
        group=TOKENIZER,
    )
    make_vocab_size_divisible_by: int = _arg(
        128,
        help="Pad the vocabulary to a multiple of this (times the tensor-parallel size).",
        group=TOKENIZER,
    )

    tensor_model_parallel_size: int = _arg(1, help="Tensor-parallel size (TP).", group=PARALLEL, section=MP)
    pipeline_model_parallel_size: int = _arg(
        1, help="Pipeline-parallel size (PP).", group=PARALLEL, section=MP
    )
    use_distributed_optimizer: bool = _arg(
        False, help="Shard the optimizer state over data-parallel ranks.", group=PARALLEL
    )
    overlap_grad_reduce: bool = _arg(
        False, help="Overlap the gradient reduction with the backward pass.", group=PARALLEL
    )
    use_tp_pp_dp_mapping: bool = _arg(
        False,
        help="Rank order tp-cp-ep-pp-dp instead of tp-cp-ep-dp-pp (consecutive ranks form pipelines, so "
        "DP replicas of a stage sit on different nodes; always on with --unicron).",
        group=PARALLEL,
    )
    bf16: bool = _arg(False, help="Train in bfloat16 mixed precision.", group=PARALLEL, section=MP)
    fp16: bool = _arg(False, help="Train in float16 mixed precision.", group=PARALLEL, section=MP)
    distributed_timeout_minutes: int = _arg(
        10, help="Timeout of collective operations, in minutes.", group=PARALLEL
    )

    micro_batch_size: int = _arg(help="Samples per micro batch on one model replica.", group=TRAINING)
    global_batch_size: int | None = _arg(
        None,
        help="Samples per iteration over all replicas (default: --micro-batch-size x data-parallel size).",
        group=TRAINING,
    )
    train_iters: int = _arg(help="Number of training iterations.", group=TRAINING)
    exit_interval: int | None = _arg(None, help="Exit after an iteration divisible by this.", group=TRAINING)
    seed: int = _arg(1234, help="Random seed of python, numpy and torch.", group=TRAINING)

    lr: float = _arg(help="Peak learning rate.", group=OPTIMIZER)
    min_lr: float = _arg(0.0, help="Learning rate at the end of the decay.", group=OPTIMIZER)
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = _arg(
        "linear", help="Decay: constant, linear, cosine or inverse-square-root.", group=OPTIMIZER
    )
    lr_decay_iters: int = _arg(
        help="Iterations to decay the learning rate over (default: --train-iters).",
        group=OPTIMIZER,
        derived=True,
    )
    lr_warmup_iters: int = _arg(0, help="Iterations of linear warmup.", group=OPTIMIZER)
    lr_warmup_fraction: float | None = _arg(
        None, help="Warmup as a fraction of --lr-decay-iters (instead of --lr-warmup-iters).", group=OPTIMIZER
    )
    weight_decay: float = _arg(0.01, help="Weight decay (L2 regularisation) coefficient.", group=OPTIMIZER)
    clip_grad: float = _arg(
        1.0, help="Clip gradients to this global L2 norm (0: no clipping).", group=OPTIMIZER
    )
    adam_beta1: float = _arg(0.9, help="Adam beta1.", group=OPTIMIZER)
    adam_beta2: float = _arg(0.999, help="Adam beta2.", group=OPTIMIZER)
    adam_eps: float = _arg(1e-08, help="Adam epsilon.", group=OPTIMIZER)

    data_path: list[str] | None = _arg(
        None,
        help="Dataset prefixes P (files P.bin, P.idx), optionally weighted: [W1] P1 [W2] P2 ...",
        group=DATA,
        metavar="PREFIX",
    )
    split: str | None = _arg(
        None,
        help="Train, validation, test proportions, e.g. '969, 30, 1' (the default with --data-path).",
        group=DATA,
    )
    mock_data: bool = _arg(False, help="Train on generated tokens instead of --data-path.", group=DATA)
    data_cache_path: str | None = _arg(None, help="Directory for the dataset index caches.", group=DATA)

    save: str | None = _arg(None, help="Directory to save checkpoints to.", group=CHECKPOINT)
    load: str | None = _arg(None, help="Directory to load a checkpoint from.", group=CHECKPOINT)
    save_interval: int | None = _arg(None, help="Iterations between checkpoints.", group=CHECKPOINT)
    no_save_optim: bool | None = _arg(None, help="Do not save the optimizer state.", group=CHECKPOINT)
    no_load_optim: bool | None = _arg(None, help="Do not load the optimizer state.", group=CHECKPOINT)
    no_load_rng: bool | None = _arg(
        None, help="Do not load the random number generator states.", group=CHECKPOINT
    )
    finetune: bool = _arg(False, help="Load model weights only and start at iteration 0.", group=CHECKPOINT)
    use_checkpoint_args: bool = _arg(
        False, help="Take the model settings from the loaded checkpoint.", group=CHECKPOINT
    )
    ckpt_format: Literal["torch", "torch_dist"] = _arg(
        "torch_dist", help="Checkpoint format: torch_dist (resharding) or torch.", group=CHECKPOINT
    )

    log_interval: int = _arg(100, help="Iterations between log lines.", group=LOGGING)
    eval_interval: int | None = _arg(
        None, help="Iterations between evaluations (default: none during training).", group=LOGGING
    )
    eval_iters: int = _arg(100, help="Iterations per evaluation.", group=LOGGING)

    yaml_cfg: str | None = _arg(
        None,
        help="YAML job config; flags on the command line override it.",
        group="job config",
        metavar="FILE",
    )
    unicron: UnicronConfig = field(default_factory=UnicronConfig)
    provenance: Mapping[str, str] = field(
        default_factory=lambda: types.MappingProxyType({}), compare=False, repr=False
    )

    def __post_init__(self) -> None:
        args_checks.check_values(self)

    def spelled(self, name: str) -> str:
        """How field ``name`` was set, for messages: ``--hidden-size 64``, a YAML key, or its default."""
        if name in self.provenance:
            return self.provenance[name]
        return _spell_flag(name, getattr(self, name))


def _megatron_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(MegatronArgs) if "group" in f.metadata]


def _flag(name: str) -> str:
    meta = MegatronArgs.__dataclass_fields__[name].metadata
    return meta.get("flag") or "--" + name.replace("_", "-")


def _spell_flag(name: str, value: Any) -> str:
    flag = _flag(name)
    if isinstance(value, bool):
        return flag if value != MegatronArgs.__dataclass_fields__[name].default else f"no {flag}"
    if isinstance(value, list):
        return " ".join([flag, *map(str, value)])
    return f"{flag} {value}"


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of every flag; defaults are suppressed so it reports only the flags given."""
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,
        description="Megatron GPT pretraining flags "
        "(Megatron-LM names and defaults) and the megatron_unicron flags.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(MegatronArgs)
    for f in _megatron_fields():
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": meta["help"]}
        if hints[f.name] in (bool, bool | None):
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            kwargs["metavar"] = meta["metavar"] or configtree.metavar_of(hints[f.name], f.name)
            if f.default not in (MISSING, None):
                kwargs["help"] += f" Default: {f.default}."
            if any(typing.get_origin(t) is list for t in (hints[f.name], *typing.get_args(hints[f.name]))):
                kwargs["nargs"] = "*"
        group.add_argument(_flag(f.name), **kwargs)
    configtree.add_flags(parser, UnicronConfig, ("unicron",), "unicron")
    return parser


def _reject_extras(extras: list[str], parser: argparse.ArgumentParser) -> NoReturn:
    flags = [s for action in parser._actions for s in action.option_strings]
    unknown = next((e for e in extras if e.startswith("-")), None)
    if unknown is None:
        raise ConfigError(f"unexpected argument {extras[0]!r}; every value follows its flag (see --help)")
    name = unknown.split("=", 1)[0]
    hint = configtree.did_you_mean(name, flags, quote=False)
    raise ConfigError(f"unrecognized flag {name}{hint}; see --help for the supported flags")


def _schema() -> dict[str, args_yaml.Key]:
    hints = typing.get_type_hints(MegatronArgs)
    return {
        f.name: args_yaml.Key(type=hints[f.name], section=f.metadata["section"])
        for f in _megatron_fields()
        if f.name != "yaml_cfg"
    }


def parse_args(argv: Sequence[str] | None = None, *, prog: str | None = None) -> MegatronArgs:
    """Parse a GPT pretraining command line (``sys.argv[1:]`` when ``argv`` is None).

    Reads ``--yaml-cfg`` if given (flags override it), fills the defaults that need no world size
    (``--ffn-hidden-size``, ``--kv-channels``, ``--num-query-groups``, ``--lr-decay-iters``, ``--split``)
    and checks everything that can be checked without the world size, including that ``--data-path``
    and tokenizer files exist. Raises :class:`ConfigError` (one line: the flag as written and the fix).
    """
    parser = build_parser(prog)
    namespace, extras = parser.parse_known_args(argv)
    if extras:
        _reject_extras(extras, parser)
    given = vars(namespace)
    yaml_cfg = given.pop("yaml_cfg", None)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    unicron_yaml: dict[str, Any] = {}
    if yaml_cfg is not None:
        values, spelled, unicron_yaml = args_yaml.load_job(yaml_cfg, _schema())
    hints = typing.get_type_hints(MegatronArgs)
    for name, raw in given.items():
        if name.startswith("unicron."):
            continue
        where = _spell_flag(name, raw)
        values[name] = configtree.coerce(raw, hints[name], where)
        spelled[name] = where
    unicron_cli, unicron_spelled = configtree.collect_flags(given, UnicronConfig, ("unicron",))
    unicron = UnicronConfig.from_dict(
        configtree.deep_merge(unicron_yaml, unicron_cli),
        source=yaml_cfg or "the command line",
        spelled=unicron_spelled,
    )
    _require(values)
    args_checks.derive(values, spelled)
    args = MegatronArgs(
        **values, unicron=unicron, yaml_cfg=yaml_cfg, provenance=types.MappingProxyType(spelled)
    )
    args_checks.check_files(args)
    return args


def _require(values: Mapping[str, Any]) -> None:
    for f in _megatron_fields():
        if f.default is MISSING and not f.metadata["derived"] and f.name not in values:
            key = f"{f.metadata['section']}.{f.name}" if f.metadata["section"] else f.name
            raise ConfigError(
                f"{_flag(f.name)} is required: add {_flag(f.name)} "
                f"{f.metadata['metavar'] or f.name.upper()} (or {key}: in the --yaml-cfg file)"
            )


def data_parallel_size(args: MegatronArgs, world_size: int) -> int:
    """Data-parallel size of ``args``' layout on ``world_size`` ranks; ConfigError if it does not fit."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    model = tp * pp
    layout = f"{args.spelled('tensor_model_parallel_size')} x {args.spelled('pipeline_model_parallel_size')}"
    if world_size < model:
        raise ConfigError(
            f"world size {world_size} is smaller than the {model} ranks that {layout} "
            f"needs; launch at least {model} processes or lower TP/PP"
        )
    if world_size % model:
        raise ConfigError(
            f"world size {world_size} is not a multiple of {layout} = {model}; launch a "
            f"multiple of {model} processes or change TP/PP"
        )
    return world_size // model


def resolve_world(args: MegatronArgs, world_size: int) -> MegatronArgs:
    """Check ``args`` against the world size and fill ``global_batch_size`` (default: micro x DP).

    Returns a new value. Raises :class:`ConfigError` when the world is not a multiple of TP x PP, or the
    global batch is not a multiple of micro batch x DP (with a specific message when there are more
    ranks than the global batch can keep busy).
    """
    dp = data_parallel_size(args, world_size)
    micro, per_step = args.micro_batch_size, args.micro_batch_size * dp
    spelled = dict(args.provenance)
    if args.global_batch_size is None:
        spelled["global_batch_size"] = (
            f"--global-batch-size {per_step} (= --micro-batch-size {micro} x data-parallel size {dp})"
        )
        return dataclasses.replace(
            args, global_batch_size=per_step, provenance=types.MappingProxyType(spelled)
        )
    gbs = args.global_batch_size
    if gbs < per_step:
        useful = max(d for d in range(1, dp + 1) if (gbs // micro) % d == 0)
        raise ConfigError(
            f"world size {world_size} gives data-parallel size {dp}, more ranks than "
            f"{args.spelled('global_batch_size')} can use: one iteration needs at least "
            f"{args.spelled('micro_batch_size')} x {dp} = {per_step} samples; launch "
            f"{useful * world_size // dp} processes or raise --global-batch-size to a multiple of {per_step}"
        )
    if gbs % per_step:
        raise ConfigError(
            f"{args.spelled('global_batch_size')} is not divisible by {args.spelled('micro_batch_size')} x "
            f"data-parallel size {dp} = {per_step} (world size {world_size}); use a multiple of {per_step}"
        )
    return args


def megatron_namespace(args: MegatronArgs) -> argparse.Namespace:
    """The Megatron-LM ``args`` namespace of ``args`` (for code and checkpoints that expect one)."""
    return argparse.Namespace(**{f.name: getattr(args, f.name) for f in _megatron_fields()})
