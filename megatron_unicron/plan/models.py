"""GPT model shapes: parameter counts and training FLOPs by the formulas Megatron's authors publish.

`ModelShape` is the frozen description of a Megatron GPT the planner reasons about. Its counts follow
Megatron-core's GPTModel with the default `local`/TE layer spec: biases on every linear layer, two
LayerNorms per layer (weight + bias), learned absolute position embeddings, the vocabulary padded to a
multiple of `make_vocab_size_divisible_by * tp`, and output weights tied to the word embeddings unless
`untie_embeddings_and_output_weights`. Training FLOPs per sample follow Megatron-LM's
`num_floating_point_operations` (Narayanan et al., SC'21, appendix; GQA and SwiGLU terms as in
Megatron-LM's `training.py`): 12·s·l·h²·[(1 + g/a + s/h)·(a·d/h) + (f/h)·glu + V/(2·l·h)], which counts
forward + backward (3×) and no activation recomputation.

Presets (`PRESETS`) are GPT-3 shapes (Brown et al. 2020, Table 2.1; 13B with h=5120 as Megatron-LM
trains it) plus a 70B GPT-3-style shape (80 layers, h=8192, 64 heads: Llama-2-70B's depth/width with
GPT-3's 4h MLP and no GQA) and the tiny CPU model the tests train.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from megatron_unicron.plan.errors import PlanInputError

__all__ = ["ModelShape", "PRESETS", "model_from_config"]


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanInputError(f"model.{name}: expected a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """A Megatron GPT shape; validates itself.

    `num_query_groups` defaults to `num_attention_heads` (no GQA) and `ffn_hidden_size` to 4·hidden
    (set both explicitly for GQA/SwiGLU models).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    num_query_groups: int = 0
    ffn_hidden_size: int = 0
    kv_channels: int = 0
    gated_linear_unit: bool = False
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    name: str = ""

    def __post_init__(self) -> None:
        for f in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "vocab_size",
            "seq_length",
            "make_vocab_size_divisible_by",
        ):
            _check_positive_int(f, getattr(self, f))
        # 0 means "Megatron's default" for the three derived sizes; resolve them once, here.
        if self.num_query_groups == 0:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.ffn_hidden_size == 0:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        if self.kv_channels == 0:
            if self.hidden_size % self.num_attention_heads:
                raise PlanInputError(
                    f"model.hidden_size: {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set kv_channels explicitly"
                )
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        for f in ("num_query_groups", "ffn_hidden_size", "kv_channels"):
            _check_positive_int(f, getattr(self, f))
        if self.num_attention_heads % self.num_query_groups:
            raise PlanInputError(
                f"model.num_query_groups: {self.num_query_groups} does not divide num_attention_heads "
                f"{self.num_attention_heads}"
            )

    # ---- sizes -------------------------------------------------------------------------------
    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocabulary padded as Megatron pads it for tensor-parallel degree `tp`."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def layer_parameters(self) -> int:
        """Parameters of one transformer layer (weights and biases, both LayerNorms)."""
        h, d = self.hidden_size, self.kv_channels
        q = self.num_attention_heads * d
        kv = self.num_query_groups * d
        glu = 2 if self.gated_linear_unit else 1
        attention = h * (q + 2 * kv) + (q + 2 * kv) + q * h + h
        mlp = h * self.ffn_hidden_size * glu + self.ffn_hidden_size * glu + self.ffn_hidden_size * h + h
        return attention + mlp + 4 * h

    def embedding_parameters(self, tp: int = 1) -> int:
        """Word + learned position embedding parameters (whole model, not per TP rank)."""
        return self.padded_vocab_size(tp) * self.hidden_size + self.seq_length * self.hidden_size

    def num_parameters(self) -> int:
        """Total parameters (tied output layer counted once)."""
        out = self.padded_vocab_size() * self.hidden_size if self.untie_embeddings_and_output_weights else 0
        return (
            self.num_layers * self.layer_parameters()
            + self.embedding_parameters()
            + 2 * self.hidden_size
            + out
        )

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward, no recomputation) of one sequence, Megatron's formula."""
        s, layers, h = self.seq_length, self.num_layers, self.hidden_size
        glu = 1.5 if self.gated_linear_unit else 1.0
        q_ratio = self.num_attention_heads * self.kv_channels / h
        attention = (1 + self.num_query_groups / self.num_attention_heads + s / h) * q_ratio
        mlp = self.ffn_hidden_size / h * glu
        logit = self.padded_vocab_size() / (2 * layers * h)
        return 12.0 * s * layers * h * h * (attention + mlp + logit)

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-ready mapping of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model") -> ModelShape:
        """Build from a mapping; unknown keys get a one-line error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanInputError(f"{where}.{unknown[0]}: unknown key; expected one of {sorted(known)}")
        missing = [
            f
            for f in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length")
            if f not in data
        ]
        if missing:
            raise PlanInputError(f"{where}.{missing[0]}: missing")
        try:
            return cls(**dict(data))
        except PlanInputError as err:
            raise PlanInputError(str(err).replace("model.", f"{where}.", 1)) from None


def _gpt3(name: str, layers: int, hidden: int, heads: int) -> ModelShape:
    return ModelShape(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        vocab_size=51200,
        seq_length=2048,
    )


PRESETS: Mapping[str, ModelShape] = MappingProxyType(
    {
        "gpt3-1.3b": _gpt3("gpt3-1.3b", 24, 2048, 16),
        "gpt3-2.7b": _gpt3("gpt3-2.7b", 32, 2560, 32),
        "gpt3-7b": _gpt3("gpt3-7b", 32, 4096, 32),
        "gpt3-13b": _gpt3("gpt3-13b", 40, 5120, 40),
        "gpt3-70b": _gpt3("gpt3-70b", 80, 8192, 64),
        "tiny": ModelShape(
            name="tiny", num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=128, seq_length=32
        ),
    }
)


def model_from_config(value: object, where: str = "model") -> ModelShape:
    """A preset name (see `PRESETS`) or a mapping of `ModelShape` fields."""
    if isinstance(value, str):
        if value not in PRESETS:
            raise PlanInputError(
                f"{where}: unknown preset {value!r}; expected one of {sorted(PRESETS)} "
                "or a mapping of model fields"
            )
        return PRESETS[value]
    if isinstance(value, Mapping):
        return ModelShape.from_dict(value, where)
    raise PlanInputError(f"{where}: expected a preset name or a mapping, got {type(value).__name__}")
