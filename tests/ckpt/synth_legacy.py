"""Test-only writer of synthetic Megatron-LM legacy checkpoints (``--ckpt-format torch``), without megatron.

Follows the format as the project's notes describe it (``megatron-checkpoints.md`` §6.2) and as
megatron-core 0.16.1 names things for the local layer spec: ``latest_checkpointed_iteration.txt``,
``iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt`` per (TP, PP) rank holding ``args``,
``checkpoint_version`` 3.0, ``iteration``, ``model`` (stage-local names in module order, ``_extra_state``
None), ``optimizer`` (torch Adam state keyed by param ids, two groups: weight-decay matrices first, then
biases and norms), ``opt_param_scheduler``, ``rng_state`` and ``num_floating_point_operations_so_far``.
Tensor values are random (replicated tensors identical on every TP rank). Used for checkpoints larger than
a CPU test run can train (benchmarks); correctness tests use checkpoints megatron-core itself wrote.
"""

from __future__ import annotations

import argparse
import collections
import os
from typing import Any

import torch


def _gen(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write(
    root: str,
    *,
    tp: int,
    pp: int,
    layers: int,
    hidden: int,
    heads: int,
    ffn: int,
    vocab: int,
    seq: int = 2048,
    iteration: int = 10,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Write a GPT (LayerNorm, learned positions, tied embeddings, biases) checkpoint; returns its bytes."""
    padded = -(-vocab // (128 * tp)) * 128 * tp
    args = argparse.Namespace(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=heads,
        group_query_attention=False,
        kv_channels=hidden // heads,
        seq_length=seq,
        max_position_embeddings=seq,
        position_embedding_type="learned_absolute",
        add_position_embedding=True,
        padded_vocab_size=padded,
        vocab_size=vocab,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        data_parallel_size=1,
        world_size=tp * pp,
        swiglu=False,
        untie_embeddings_and_output_weights=False,
        normalization="LayerNorm",
        add_bias_linear=True,
        params_dtype=dtype,
        fp16=False,
        bf16=False,
        use_distributed_optimizer=False,
        ckpt_format="torch",
        transformer_impl="local",
        num_experts=None,
        decoupled_lr=None,
        consumed_train_samples=iteration * 8,
        iteration=iteration,
    )
    per = layers // pp
    it_dir = os.path.join(root, f"iter_{iteration:07d}")
    total = 0
    for p in range(pp):
        for t in range(tp):
            model: collections.OrderedDict[str, Any] = collections.OrderedDict()

            def add(
                name: str, shape: tuple[int, ...], seed: int, split: bool, m: Any = model, r: int = t
            ) -> None:
                m[name] = _gen(seed * 131 + (r if split else 0), shape, dtype)

            if p == 0:
                add("embedding.word_embeddings.weight", (padded // tp, hidden), 1, True)
                add("embedding.position_embeddings.weight", (seq, hidden), 2, False)
            for i in range(per):
                s = 1000 * (p * per + i)
                pre = f"decoder.layers.{i}."
                add(pre + "input_layernorm.weight", (hidden,), s + 1, False)
                add(pre + "input_layernorm.bias", (hidden,), s + 2, False)
                add(pre + "self_attention.linear_proj.weight", (hidden, hidden // tp), s + 3, True)
                add(pre + "self_attention.linear_proj.bias", (hidden,), s + 4, False)
                model[pre + "self_attention.linear_proj._extra_state"] = None
                add(pre + "self_attention.linear_qkv.weight", (3 * hidden // tp, hidden), s + 5, True)
                add(pre + "self_attention.linear_qkv.bias", (3 * hidden // tp,), s + 6, True)
                model[pre + "self_attention.linear_qkv._extra_state"] = None
                add(pre + "pre_mlp_layernorm.weight", (hidden,), s + 7, False)
                add(pre + "pre_mlp_layernorm.bias", (hidden,), s + 8, False)
                add(pre + "mlp.linear_fc1.weight", (ffn // tp, hidden), s + 9, True)
                add(pre + "mlp.linear_fc1.bias", (ffn // tp,), s + 10, True)
                model[pre + "mlp.linear_fc1._extra_state"] = None
                add(pre + "mlp.linear_fc2.weight", (hidden, ffn // tp), s + 11, True)
                add(pre + "mlp.linear_fc2.bias", (hidden,), s + 12, False)
                model[pre + "mlp.linear_fc2._extra_state"] = None
            if p == pp - 1:
                add("decoder.final_layernorm.weight", (hidden,), 3, False)
                add("decoder.final_layernorm.bias", (hidden,), 4, False)
                if pp > 1:
                    add("output_layer.weight", (padded // tp, hidden), 1, True)  # the tied copy
                model["output_layer._extra_state"] = None
            params = [k for k, v in model.items() if v is not None]
            wd = [k for k in params if not k.endswith(".bias") and model[k].dim() > 1]
            groups, state, pid = [], {}, 0
            for wd_mult, members in ((1.0, wd), (0.0, [k for k in params if k not in wd])):
                ids = []
                for k in members:
                    v = model[k]
                    state[pid] = {
                        "step": torch.tensor(float(iteration)),
                        "exp_avg": v.float() * 1e-3,
                        "exp_avg_sq": v.float().square() * 1e-3,
                    }
                    ids.append(pid)
                    pid += 1
                groups.append(
                    {
                        "lr": 1e-4,
                        "betas": (0.9, 0.999),
                        "eps": 1e-8,
                        "weight_decay": 0.1 * wd_mult,
                        "wd_mult": wd_mult,
                        "lr_mult": 1.0,
                        "is_expert_parallel": False,
                        "is_decoupled_lr": False,
                        "default_config": True,
                        "max_lr": 1e-4,
                        "min_lr": 1e-5,
                        "params": ids,
                    }
                )
            sd = {
                "args": args,
                "checkpoint_version": 3.0,
                "iteration": iteration,
                "model": model,
                "optimizer": {"state": state, "param_groups": groups},
                "opt_param_scheduler": {"max_lr": 1e-4, "num_steps": iteration * 8},
                "rng_state": [{"torch_rng_state": torch.get_rng_state()}],
                "num_floating_point_operations_so_far": 0.0,
            }
            d = os.path.join(it_dir, f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
            os.makedirs(d, exist_ok=True)
            torch.save(sd, os.path.join(d, "model_optim_rng.pt"))
            total += os.path.getsize(os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return total
