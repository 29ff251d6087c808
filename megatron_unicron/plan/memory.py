"""Per-GPU memory of a Megatron GPT layout: model state plus activations.

Model state (Megatron-LM `docs/source/api-guide/dist_optimizer.md`): with BF16/FP16 parameters and
FP32 main gradients, each parameter costs 2 (param) + 4 (grad) + 12 (FP32 master copy, Adam m and v)
= 18 bytes, and 6 + 12/d bytes with the distributed optimizer over d data-parallel ranks. FP32 training
(the CPU path) costs 4 + 4 + 8 = 16 and 8 + 8/d. The per-GPU parameter count is the largest pipeline
stage divided by TP: L/p layers, plus the word and position embeddings on the first stage and the output
layer on the last (a tied output layer is still duplicated on the last stage when p > 1).

Activations (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
MLSys'23, Table 2), per layer and micro-batch, in bytes with 16-bit activations:
  no SP: s·b·h·(10 + 24/t + 5·a·s/(h·t)); SP: s·b·h·(34/t + 5·a·s/(h·t));
  selective recompute drops the 5·a·s/h attention term; full recompute keeps only the layer input
  2·s·b·h (/t with SP). A 1F1B first stage holds min(p, m) micro-batches of its L/p layers. The last
  stage also holds the FP32 logits, 4·s·b·V/t. FP32 activations double every term.

Simplifications (documented, not hidden): GQA's smaller K/V activations and LayerNorm parameters inside
TP are ignored; `usable_fraction` of device memory is available (CUDA context, allocator fragmentation).
`model_state_multiplier` scales the model state (e.g. 2 for a Bamboo-like redundant copy of the
successor stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.models import ModelShape

__all__ = ["MemoryOptions", "MemoryBreakdown", "memory_per_gpu", "stage_parameters"]

Recompute = Literal["none", "selective", "full"]


@dataclass(frozen=True, kw_only=True)
class MemoryOptions:
    """Training options that change memory: precision, distributed optimizer, recomputation, SP."""

    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    use_distributed_optimizer: bool = False
    recompute: Recompute = "selective"
    sequence_parallel: bool = True
    usable_fraction: float = 0.9
    model_state_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise PlanInputError(f"memory.precision: expected bf16, fp16 or fp32, got {self.precision!r}")
        if self.recompute not in ("none", "selective", "full"):
            raise PlanInputError(
                f"memory.recompute: expected none, selective or full, got {self.recompute!r}"
            )
        if not 0 < self.usable_fraction <= 1:
            raise PlanInputError(f"memory.usable_fraction: expected (0, 1], got {self.usable_fraction!r}")
        if not self.model_state_multiplier >= 1:
            raise PlanInputError(
                f"memory.model_state_multiplier: expected >= 1, got {self.model_state_multiplier!r}"
            )

    @property
    def activation_bytes(self) -> int:
        """Bytes per activation element."""
        return 4 if self.precision == "fp32" else 2

    def state_bytes_per_param(self, dp: int) -> float:
        """Parameter + gradient + optimizer bytes per parameter on one rank."""
        if self.precision == "fp32":
            param_grad, optim = 8.0, 8.0
        else:
            param_grad, optim = 6.0, 12.0
        if self.use_distributed_optimizer:
            optim /= dp
        return param_grad + optim


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak bytes on the most loaded rank."""

    model_state: float
    activations: float

    @property
    def total(self) -> float:
        """Model state plus activations."""
        return self.model_state + self.activations


def stage_parameters(model: ModelShape, tp: int, pp: int) -> tuple[float, float]:
    """Parameters per rank on the first and on the last pipeline stage."""
    layers = model.num_layers / pp * model.layer_parameters() / tp
    h = model.hidden_size
    word = model.padded_vocab_size(tp) * h / tp
    position = model.seq_length * h
    first = layers + word + position
    last = layers + 2 * h
    if pp == 1:
        first = last = first + 2 * h + (word if model.untie_embeddings_and_output_weights else 0)
    else:
        last += word
    return first, last


def _activation_per_layer(model: ModelShape, tp: int, mbs: int, opts: MemoryOptions) -> float:
    s, h, a = model.seq_length, model.hidden_size, model.num_attention_heads
    sbh = s * mbs * h
    sp = opts.sequence_parallel and tp > 1
    if opts.recompute == "full":
        per = 2 * sbh / (tp if sp else 1)
    else:
        attention = 0.0 if opts.recompute == "selective" else 5 * a * s / (h * tp)
        per = sbh * ((34 / tp) if sp else (10 + 24 / tp)) + sbh * attention
    return per * opts.activation_bytes / 2


def memory_per_gpu(
    model: ModelShape,
    tp: int,
    pp: int,
    dp: int,
    micro_batch_size: int,
    num_micro_batches: int,
    opts: MemoryOptions,
) -> MemoryBreakdown:
    """Peak memory of the most loaded rank (max of the first and the last pipeline stage)."""
    first_params, last_params = stage_parameters(model, tp, pp)
    per_param = opts.state_bytes_per_param(dp) * opts.model_state_multiplier
    per_layer = _activation_per_layer(model, tp, micro_batch_size, opts)
    layers_per_stage = model.num_layers / pp
    in_flight = min(pp, num_micro_batches)
    first_act = per_layer * layers_per_stage * in_flight
    logits = 4.0 * model.seq_length * micro_batch_size * model.padded_vocab_size(tp) / tp
    last_act = per_layer * layers_per_stage + logits
    if pp == 1:
        first_act += logits
        last_act = first_act
    first = MemoryBreakdown(first_params * per_param, first_act)
    last = MemoryBreakdown(last_params * per_param, last_act)
    return first if first.total >= last.total else last
