"""Builds megatron-core's GPT model, DDP wrapper, optimizer and LR scheduler from Megatron-LM arguments.

What Megatron-LM's ``pretrain_gpt.py`` + ``training.setup_model_and_optimizer`` build, for one
(TP, PP) layout of the current generation: a ``GPTModel`` with the local layer spec (or the
transformer-engine spec when TE is importable with CUDA), ``Float16Module`` for fp16/bf16, megatron's
``DistributedDataParallel``, ``get_megatron_optimizer`` (Adam, optionally the DistributedOptimizer) and
``OptimizerParamScheduler`` with Megatron-LM's sample-based step counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from megatron_unicron.errors import ConfigError
from megatron_unicron.megatron import cpu
from megatron_unicron.megatron.groups import ParallelCoords
from megatron_unicron.megatron.init import layout_independent

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs

logger = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    """The trainable state of one layout: model chunks (DDP-wrapped), optimizer and scheduler."""

    config: Any  # megatron.core TransformerConfig
    model: list[Any]  # [DistributedDataParallel]
    optimizer: Any  # megatron.core MegatronOptimizer
    scheduler: Any  # megatron.core OptimizerParamScheduler
    gpt: Any  # the unwrapped GPTModel

    def release(self) -> None:
        """Drop callbacks that reference this layout's groups so it can be garbage-collected."""
        self.config.finalize_model_grads_func = None
        self.config.no_sync_func = None
        self.config.grad_sync_func = None
        self.config.param_sync_func = None
        self.config.grad_scale_func = None


def params_dtype(args: MegatronArgs) -> torch.dtype:
    """The parameter dtype Megatron-LM uses for ``--fp16`` / ``--bf16`` / fp32."""
    if args.fp16:
        return torch.half
    if args.bf16:
        return torch.bfloat16
    return torch.float32


def transformer_engine_available() -> bool:
    """Whether transformer-engine can be used: CUDA present and TE importable."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises RuntimeError (not ImportError) when its CUDA libraries are missing
        return False
    return True


def resolve_transformer_impl(args: MegatronArgs) -> str:
    """``local`` or ``transformer_engine``: an explicit request for TE fails clearly when TE is unusable."""
    if args.transformer_impl == "transformer_engine":
        if not transformer_engine_available():
            raise ConfigError(
                "--transformer-impl transformer_engine needs CUDA and an importable transformer-engine: "
                "use --transformer-impl local on this machine"
            )
        return "transformer_engine"
    if args.transformer_impl == "local":
        return "local"
    return "transformer_engine" if transformer_engine_available() else "local"


def transformer_config(args: MegatronArgs, tp: int, pp: int) -> Any:
    """The ``TransformerConfig`` Megatron-LM's ``core_transformer_config_from_args`` would build."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    dtype = params_dtype(args)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear,
        fp16=args.fp16,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=tp,  # the current generation's layout, not necessarily the launch's
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        use_cpu_initialization=not on_gpu,
        # Fused kernels need CUDA (and apex or TE); megatron falls back to torch code without them.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(args: MegatronArgs, impl: str) -> Any:
    """The transformer layer spec: megatron-core's local spec, or the transformer-engine spec."""
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization=args.normalization)


def build_gpt(args: MegatronArgs, config: Any, coords: ParallelCoords, padded_vocab_size: int) -> Any:
    """The unwrapped ``GPTModel`` of this rank's pipeline stage."""
    from megatron.core.models.gpt import GPTModel

    impl = resolve_transformer_impl(args)
    with layout_independent(args.seed):
        gpt = GPTModel(
            config,
            layer_spec(args, impl),
            vocab_size=padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=coords.is_first_stage,
            post_process=coords.is_last_stage,
            parallel_output=True,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
        )
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    cpu.apply()
    return gpt


def build_optimizer(args: MegatronArgs, model: list[Any]) -> Any:
    """megatron-core's optimizer (Adam), with Megatron-LM's defaults for loss scaling."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        fp16=args.fp16,
        bf16=args.bf16,
        params_dtype=params_dtype(args),
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model, use_gloo_process_groups=False)
    cpu.apply()
    return optimizer


def build_scheduler(args: MegatronArgs, optimizer: Any) -> Any:
    """Megatron-LM's ``OptimizerParamScheduler``: step counts in samples (iterations × global batch)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    assert args.global_batch_size is not None, "resolve_world() fills the global batch size"
    decay_steps = args.lr_decay_iters * args.global_batch_size
    if args.lr_warmup_fraction is not None:
        warmup_steps = int(args.lr_warmup_fraction * decay_steps)
    else:
        warmup_steps = args.lr_warmup_iters * args.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * args.global_batch_size,
        wd_incr_style="constant",
    )


def build_model_bundle(args: MegatronArgs, coords: ParallelCoords, padded_vocab_size: int) -> ModelBundle:
    """Model, DDP, optimizer and scheduler for the current layout (megatron groups must be initialised)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.transformer.module import Float16Module

    config = transformer_config(args, coords.tp_size, coords.pp_size)
    gpt = build_gpt(args, config, coords, padded_vocab_size)
    module = Float16Module(config, gpt) if (args.fp16 or args.bf16) else gpt
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config, ddp_config, module)
    model = [ddp]
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if args.overlap_grad_reduce:
        config.no_sync_func = ddp.no_sync
    cpu.apply()
    return ModelBundle(config=config, model=model, optimizer=optimizer, scheduler=scheduler, gpt=gpt)
