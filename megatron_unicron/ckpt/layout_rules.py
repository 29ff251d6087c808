"""How every tensor of a Megatron GPT checkpoint is named and laid out over TP and PP.

The converter works in megatron-core's sharded key space (``sharded_state_dict()`` keys of 0.16.1): layers
are stacked under ``decoder.layers.<module>.<param>`` with the layer index as a prepended axis, and the
LayerNorms of the local layer spec carry their TE-style names (``input_layernorm.weight`` is
``self_attention.linear_qkv.layer_norm_weight``). A legacy file names the same tensors locally per pipeline
stage (``decoder.layers.<i>.input_layernorm.weight`` with ``i`` counted from 0 on every stage).

``ModelSpec`` is the model shape read from a checkpoint's ``args``; ``Split`` says how a key is cut over TP;
``Layout`` is a (TP, PP) pair checked against the model. Anything outside a dense GPT (MoE experts and
routers, cross attention, virtual pipeline chunks) is refused with one line.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from megatron_unicron.ckpt.errors import CheckpointError

LAYER_PREFIX = "decoder.layers."
OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq", "fp32_param")
EXTRA_STATE = "_extra_state"


class Split(enum.Enum):
    """How a tensor is cut over tensor-parallel ranks (shard ``t`` is the ``t``-th contiguous chunk)."""

    REPLICATED = "replicated"
    DIM0 = "dim0"  # column-parallel weight/bias; fused QKV is split by query groups
    DIM1 = "dim1"  # row-parallel weight
    VOCAB = "vocab"  # dim 0 of the padded vocabulary; padding rows at the end of the last shard
    SWIGLU = "swiglu"  # fc1 of a gated MLP: each shard is [gate_t; up_t]


# Layer-local suffixes (after "decoder.layers.<i>.") a dense GPT layer may hold, with their split.
_LAYER_SPLITS: dict[str, Split] = {
    "self_attention.linear_qkv.weight": Split.DIM0,
    "self_attention.linear_qkv.bias": Split.DIM0,
    "self_attention.linear_qkv.layer_norm_weight": Split.REPLICATED,
    "self_attention.linear_qkv.layer_norm_bias": Split.REPLICATED,
    "self_attention.linear_proj.weight": Split.DIM1,
    "self_attention.linear_proj.bias": Split.REPLICATED,
    "self_attention.q_layernorm.weight": Split.REPLICATED,
    "self_attention.q_layernorm.bias": Split.REPLICATED,
    "self_attention.k_layernorm.weight": Split.REPLICATED,
    "self_attention.k_layernorm.bias": Split.REPLICATED,
    "mlp.linear_fc1.weight": Split.DIM0,
    "mlp.linear_fc1.bias": Split.DIM0,
    "mlp.linear_fc1.layer_norm_weight": Split.REPLICATED,
    "mlp.linear_fc1.layer_norm_bias": Split.REPLICATED,
    "mlp.linear_fc2.weight": Split.DIM1,
    "mlp.linear_fc2.bias": Split.REPLICATED,
}
_LAYER_EXTRA = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "self_attention.core_attention",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
    "input_layernorm",
    "pre_mlp_layernorm",
    "self_attention.q_layernorm",
    "self_attention.k_layernorm",
)
_TOP_SPLITS: dict[str, Split] = {
    "embedding.word_embeddings.weight": Split.VOCAB,
    "embedding.position_embeddings.weight": Split.REPLICATED,
    "decoder.final_layernorm.weight": Split.REPLICATED,
    "decoder.final_layernorm.bias": Split.REPLICATED,
    "output_layer.weight": Split.VOCAB,
}
_TOP_EXTRA = (
    "output_layer",
    "decoder.final_layernorm",
    "embedding.word_embeddings",
    "embedding.position_embeddings",
)
# local (non-TE) layer spec names <-> sharded (TE-style) names
_LOCAL_RENAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
_TE_NAMES = {v: k for k, v in _LOCAL_RENAMES.items()}
_LOCAL_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_UNSUPPORTED_HINT = "only dense GPT models are supported (no MoE, cross attention or extra modules)"


def split_of(key: str, swiglu: bool) -> Split:
    """The TP split of a canonical model key (``decoder.layers.<suffix>`` or a top-level key)."""
    if key.startswith(LAYER_PREFIX):
        suffix = key[len(LAYER_PREFIX) :]
        if suffix not in _LAYER_SPLITS:
            raise CheckpointError(f"unsupported parameter {key}: {_UNSUPPORTED_HINT}")
        split = _LAYER_SPLITS[suffix]
        if swiglu and suffix in ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"):
            return Split.SWIGLU
        return split
    if key not in _TOP_SPLITS:
        raise CheckpointError(f"unsupported parameter {key}: {_UNSUPPORTED_HINT}")
    return _TOP_SPLITS[key]


def is_extra_state(name: str) -> bool:
    """True for ``*._extra_state`` entries (opaque per-module objects, ``None`` on the local spec)."""
    return name.endswith("." + EXTRA_STATE)


def check_extra_state_key(key: str) -> None:
    """Refuse ``_extra_state`` entries of modules a dense GPT does not have."""
    module = key[: -len(EXTRA_STATE) - 1]
    if module.startswith(LAYER_PREFIX):
        ok = module[len(LAYER_PREFIX) :] in _LAYER_EXTRA
    else:
        ok = module in _TOP_EXTRA
    if not ok:
        raise CheckpointError(f"unsupported module state {key}: {_UNSUPPORTED_HINT}")


def local_to_canonical(name: str, layer_offset: int) -> tuple[str, int | None]:
    """Map a legacy (stage-local) name to (canonical key, global layer or None)."""
    m = _LOCAL_LAYER_RE.match(name)
    if m is None:
        return name, None
    suffix = _LOCAL_RENAMES.get(m.group(2), m.group(2))
    return LAYER_PREFIX + suffix, layer_offset + int(m.group(1))


def canonical_to_local(key: str, layer: int | None, layer_offset: int, layer_spec: str) -> str:
    """Map (canonical key, global layer) to the legacy name on a stage starting at ``layer_offset``."""
    if layer is None:
        return key
    suffix = key[len(LAYER_PREFIX) :]
    if layer_spec == "local":
        suffix = _TE_NAMES.get(suffix, suffix)
    return f"decoder.layers.{layer - layer_offset}.{suffix}"


def optimizer_key(state: str, model_key: str) -> str:
    """Canonical key of an optimizer state tensor (megatron-core's ``optimizer.state.<state>.<key>``)."""
    return f"optimizer.state.{state}.{model_key}"


def parse_optimizer_key(key: str) -> tuple[str, str] | None:
    """(state, model key) of ``optimizer.state.<state>.<model key>``; None for a model key."""
    for state in OPTIMIZER_STATES + ("param",):
        prefix = f"optimizer.state.{state}."
        if key.startswith(prefix):
            return ("fp32_param" if state == "param" else state), key[len(prefix) :]
    return None


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The shape of a dense GPT model, as far as checkpoint layout depends on it."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    swiglu: bool
    tied: bool
    position_embedding_type: str
    padded_vocab_size: int
    make_vocab_size_divisible_by: int
    true_vocab_size: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "padded_vocab_size",
            "make_vocab_size_divisible_by",
        ):
            if getattr(self, name) <= 0:
                raise CheckpointError(f"args.{name} = {getattr(self, name)} is not a positive size")
        if self.num_attention_heads % self.num_query_groups:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.true_vocab_size is not None and self.true_vocab_size > self.padded_vocab_size:
            raise CheckpointError(
                f"vocab size {self.true_vocab_size} exceeds padded_vocab_size {self.padded_vocab_size}"
            )

    @classmethod
    def from_args(cls, args: Any, *, true_vocab_size: int | None = None) -> ModelSpec:
        """Read the model shape from a Megatron-LM ``args`` namespace; refuse non-GPT / MoE / VPP models."""
        if args is None:
            raise CheckpointError("the checkpoint has no args; cannot tell the model shape")
        if _arg(args, "num_experts", 0):
            raise CheckpointError("MoE checkpoints (num_experts set) are not supported")
        if _arg(args, "virtual_pipeline_model_parallel_size", 1) not in (1, None):
            raise CheckpointError(
                "virtual pipeline checkpoints are not supported "
                f"(virtual_pipeline_model_parallel_size={args.virtual_pipeline_model_parallel_size})"
            )
        model_type = getattr(args, "model_type", None)
        plain_type = getattr(model_type, "plain", lambda: model_type)()
        if plain_type not in (None, 1, "encoder_or_decoder"):
            raise CheckpointError(f"unsupported model type {model_type!r}: only GPT (encoder_or_decoder)")
        for flag in ("mtp_num_layers", "expert_model_parallel_size"):
            if _arg(args, flag, 0) not in (0, 1):
                raise CheckpointError(f"unsupported: args.{flag} = {getattr(args, flag)}")
        if _arg(args, "num_layers", 0) <= 0 or _arg(args, "hidden_size", 0) <= 0:
            raise CheckpointError("args lack num_layers / hidden_size: not a Megatron GPT checkpoint")
        heads = int(args.num_attention_heads)
        groups = (
            int(_arg(args, "num_query_groups", heads))
            if _arg(args, "group_query_attention", False)
            else heads
        )
        hidden = int(args.hidden_size)
        vocab = true_vocab_size
        if vocab is None and isinstance(getattr(args, "vocab_size", None), int):
            vocab = int(args.vocab_size)
        padded = _arg(args, "padded_vocab_size", 0)
        if not padded:
            raise CheckpointError("args.padded_vocab_size is missing; cannot tell the embedding layout")
        return cls(
            num_layers=int(args.num_layers),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=groups,
            ffn_hidden_size=int(_arg(args, "ffn_hidden_size", 4 * hidden)),
            swiglu=bool(_arg(args, "swiglu", False)),
            tied=not bool(_arg(args, "untie_embeddings_and_output_weights", False)),
            position_embedding_type=str(_arg(args, "position_embedding_type", "learned_absolute")),
            padded_vocab_size=int(padded),
            make_vocab_size_divisible_by=int(_arg(args, "make_vocab_size_divisible_by", 128)),
            true_vocab_size=vocab,
        )

    def padded_vocab(self, tp: int) -> int:
        """Megatron-LM's padded vocabulary at ``tp``; refuses if it needs the unknown true vocab size."""
        multiple = self.make_vocab_size_divisible_by * tp
        if self.true_vocab_size is not None:
            return -(-self.true_vocab_size // multiple) * multiple
        if self.padded_vocab_size % multiple == 0:
            # every true vocab size that pads to padded_vocab_size at the source pads to it here too,
            # unless a smaller multiple also fits; that is only decidable with the true size
            lo = self.padded_vocab_size - self.make_vocab_size_divisible_by + 1
            if -(-lo // multiple) * multiple == self.padded_vocab_size:
                return self.padded_vocab_size
        raise CheckpointError(
            f"padded_vocab_size {self.padded_vocab_size} may change at TP={tp} and the true vocabulary "
            "size is "
            "unknown: pass --true-vocab-size"
        )


@dataclass(frozen=True)
class Layout:
    """A (TP, PP) layout of a GPT checkpoint."""

    tp: int
    pp: int

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise CheckpointError(f"TP and PP must be >= 1 (got TP={self.tp}, PP={self.pp})")

    def check(self, spec: ModelSpec) -> None:
        """Refuse a layout that does not divide heads, query groups, FFN, vocabulary or layers."""
        t = self.tp
        for what, n in (
            ("num_attention_heads", spec.num_attention_heads),
            ("num_query_groups", spec.num_query_groups),
            ("ffn_hidden_size", spec.ffn_hidden_size),
        ):
            if n % t:
                raise CheckpointError(f"target TP={t} does not divide {what}={n}")
        if spec.num_layers % self.pp:
            raise CheckpointError(f"target PP={self.pp} does not divide num_layers={spec.num_layers}")

    def stage_layers(self, num_layers: int) -> list[range]:
        """Global layer ranges of each pipeline stage (even split)."""
        per = num_layers // self.pp
        return [range(s * per, (s + 1) * per) for s in range(self.pp)]

    def rank_dir(self, tp_rank: int, pp_rank: int) -> str:
        """Megatron-LM's ``mp_rank_TT[_PPP]`` directory name."""
        return f"mp_rank_{tp_rank:02d}" if self.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"

    def __str__(self) -> str:
        return f"TP{self.tp}PP{self.pp}"


def stage_param_names(
    spec: ModelSpec, layers: range, *, first: bool, last: bool, top_keys: set[str], layer_suffixes: list[str]
) -> list[tuple[str, int | None]]:
    """(canonical key, global layer) of a stage's parameters in ``named_parameters()`` order.

    ``top_keys`` are the model's non-layer keys and ``layer_suffixes`` its per-layer suffixes in module
    order. This is also the order of the legacy ``model`` dict and of the optimizer's param ids; with tied
    embeddings the last stage of a PP > 1 layout holds its own ``output_layer.weight`` copy.
    """
    out: list[tuple[str, int | None]] = []
    if first:
        out.extend(
            (k, None)
            for k in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight")
            if k in top_keys
        )
    for layer in layers:
        out.extend((LAYER_PREFIX + s, layer) for s in layer_suffixes)
    if last:
        out.extend(
            (k, None)
            for k in ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias")
            if k in top_keys
        )
        if not spec.tied or not first:
            out.append(("output_layer.weight", None))
    return out


def local_layer_order(layer_spec: str, suffixes: set[str]) -> list[str]:
    """Canonical per-layer suffixes in the module order of megatron-core's layer spec (local or TE)."""
    local_order = [
        "self_attention.linear_qkv.layer_norm_weight",
        "self_attention.linear_qkv.layer_norm_bias",
        "self_attention.linear_proj.weight",
        "self_attention.linear_proj.bias",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "self_attention.q_layernorm.weight",
        "self_attention.q_layernorm.bias",
        "self_attention.k_layernorm.weight",
        "self_attention.k_layernorm.bias",
        "mlp.linear_fc1.layer_norm_weight",
        "mlp.linear_fc1.layer_norm_bias",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc1.bias",
        "mlp.linear_fc2.weight",
        "mlp.linear_fc2.bias",
    ]
    if (
        layer_spec == "te"
    ):  # TE fuses the norms into linear_qkv / linear_fc1 (TELayerNormColumnParallelLinear)
        local_order = [
            "self_attention.linear_proj.weight",
            "self_attention.linear_proj.bias",
            "self_attention.linear_qkv.layer_norm_weight",
            "self_attention.linear_qkv.layer_norm_bias",
            "self_attention.linear_qkv.weight",
            "self_attention.linear_qkv.bias",
            "self_attention.q_layernorm.weight",
            "self_attention.q_layernorm.bias",
            "self_attention.k_layernorm.weight",
            "self_attention.k_layernorm.bias",
            "mlp.linear_fc1.layer_norm_weight",
            "mlp.linear_fc1.layer_norm_bias",
            "mlp.linear_fc1.weight",
            "mlp.linear_fc1.bias",
            "mlp.linear_fc2.weight",
            "mlp.linear_fc2.bias",
        ]
    return [s for s in local_order if s in suffixes]
