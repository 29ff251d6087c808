"""A plain megatron-core training loop: the baseline of ``benchmarks/healthy_throughput.py``.

Written in the style of megatron-core's minimal example (``examples/run_simple_mcore_train_loop.py``
in Megatron-LM): ``GPTModel`` with the local layer spec, megatron's ``DistributedDataParallel``,
``get_megatron_optimizer``, ``OptimizerParamScheduler`` and ``get_forward_backward_func``, over
megatron-core's ``MockGPTDataset``, with nothing of megatron_unicron's training loop (no phase
tracking, no step guard, no Megatron log line, no metrics). It trains the model and layout it is
given and writes one JSON line per iteration (wall-clock time of its end, loss) from the last rank.

Run it under a launcher with torchrun's environment, e.g.::

    unicron-run --nproc-per-node 4 benchmarks/plain_mcore_loop.py --tp 2 --pp 2 --iters 40 --out t.jsonl

The one piece of the project it uses is the CPU patch (``megatron_unicron.megatron.cpu.apply()``):
megatron-core cannot train on CPU without it (it creates tensors on ``"cuda"``, reads CUDA RNG states
and checks ``torch.cuda.*Tensor`` type strings). With CUDA the patch does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=127, help="token ids before the end-of-document id")
    p.add_argument("--padded-vocab-size", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3.0e-3)
    p.add_argument("--min-lr", type=float, default=3.0e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="JSON lines of (iteration, time, loss), last rank only")
    p.add_argument("--reduce-loss", action="store_true",
                   help="all-reduce the loss over the DP group on the last stage every iteration, as "
                        "Megatron-LM's train_step does for its log line")  # fmt: skip
    return p.parse_args()


def initialize_distributed(tp: int, pp: int, seed: int) -> None:
    """gloo (or NCCL) world from torchrun's environment, then megatron's model-parallel groups."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend)
    parallel_state.initialize_model_parallel(tp, pp)
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    model_parallel_cuda_manual_seed(seed)


def model_provider(args: argparse.Namespace) -> Any:
    """The GPT of the tiny demo job, this rank's pipeline stage, fused kernels off (no TE, no apex)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        activation_func=F.gelu,
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if torch.cuda.is_available():
        model.cuda()
    return model


def train_dataset(args: argparse.Namespace) -> Any:
    """megatron-core's mock GPT data, as many samples as the run needs."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
    from megatron.core.tokenizers import MegatronTokenizer

    tokenizer = MegatronTokenizer.from_pretrained(
        metadata_path={"library": "null"}, vocab_size=args.vocab_size
    )
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    sizes = [args.iters * args.global_batch_size, None, None]
    return BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()[0]


def microbatches(dataset: Any, iteration: int, args: argparse.Namespace) -> Iterator[dict[str, Any]] | None:
    """This rank's micro-batches of one global batch (Megatron's pretraining sampler order)."""
    from megatron.core import parallel_state

    if not (parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()):
        return None
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    micro = args.micro_batch_size
    first = iteration * args.global_batch_size + dp_rank * micro
    count = args.global_batch_size // (micro * dp_size)
    batches = []
    for m in range(count):
        start = first + m * micro * dp_size
        batches.append(torch.utils.data.default_collate([dataset[i] for i in range(start, start + micro)]))
    return iter(batches)


def forward_step_func(data_iterator: Iterator[dict[str, Any]] | None, model: Any) -> tuple[Any, Callable]:
    """Forward one micro-batch; the loss is the masked mean over its tokens."""

    def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[Any, dict[str, Any]]:
        mask = loss_mask.view(-1).float()
        loss = torch.sum(output_tensor.float().view(-1) * mask) / mask.sum()
        # a copy: the schedule divides the returned loss in place by the number of micro-batches
        return loss, {"lm loss": loss.detach().clone()}

    if data_iterator is None:  # a middle pipeline stage: activations come from the previous stage
        tokens = position_ids = attention_mask = labels = None
        loss_mask = torch.ones(1)
    else:
        data = next(data_iterator)
        tokens, labels, loss_mask = data["tokens"], data["labels"], data["loss_mask"]
        attention_mask, position_ids = data["attention_mask"], data["position_ids"]
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def main() -> None:
    args = parse_args()
    import megatron.core  # noqa: F401  (loaded before the patch, so that the patch reaches it)
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    from megatron_unicron.megatron import cpu

    cpu.apply()
    initialize_distributed(args.tp, args.pp, args.seed)
    cpu.apply()
    gpt = model_provider(args)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=False, overlap_grad_reduce=False)
    model = DistributedDataParallel(config=gpt.config, ddp_config=ddp_config, module=gpt)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            clip_grad=args.clip_grad, params_dtype=torch.float32,
        ),
        [model],
    )  # fmt: skip
    samples = args.iters * args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size, lr_decay_steps=samples,
        lr_decay_style="cosine", start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=samples, wd_incr_style="constant",
    )  # fmt: skip
    gpt.config.finalize_model_grads_func = finalize_model_grads
    gpt.config.grad_scale_func = optimizer.scale_loss
    cpu.apply()
    dataset = train_dataset(args)
    forward_backward = get_forward_backward_func()
    dp_size = parallel_state.get_data_parallel_world_size()
    last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
    out = open(args.out, "w", encoding="utf-8") if (last and args.out) else None
    for iteration in range(args.iters):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step_func,
            data_iterator=microbatches(dataset, iteration, args),
            model=[model],
            num_microbatches=args.global_batch_size // (args.micro_batch_size * dp_size),
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=False,
        )
        if args.reduce_loss and parallel_state.is_pipeline_last_stage():
            total = torch.stack([d["lm loss"].view(-1).double() for d in losses]).sum(dim=0)
            torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        optimizer.step()
        scheduler.step(increment=args.global_batch_size)
        if last:
            loss = sum(float(d["lm loss"]) for d in losses) / max(len(losses), 1)
            print(f"iteration {iteration + 1}: lm loss {loss:.6f}", flush=True)
            if out is not None:
                out.write(json.dumps({"iteration": iteration + 1, "t": time.time(), "loss": loss}) + "\n")
                out.flush()
    if out is not None:
        out.close()
    torch.distributed.barrier()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
