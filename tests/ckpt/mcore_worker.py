"""Test worker: a real megatron-core GPT run on CPU/gloo that writes and loads Megatron-LM checkpoints.

One process per rank (started by ``tests/ckpt/helpers.launch``). Two phases:

* ``save``: train ``iters`` iterations at ``--layout TP,PP`` on a fixed global batch, then write the same
  state as (a) a legacy ``--ckpt-format torch`` checkpoint the way Megatron-LM's ``save_checkpoint`` does
  (``model.state_dict_for_save_checkpoint()``, ``optimizer.state_dict()``, ``distrib_optim.pt`` through the
  real ``save_parameter_state``) and (b) a ``torch_dist`` checkpoint through megatron-core's own
  ``dist_checkpointing.save``; plus a reference file: the eval loss of a fixed batch, every full tensor
  (model and optimizer, assembled from the sharded state dict) and the next two training losses.
* ``load``: for each ``format:dir:TP:PP`` given, build that layout, load the checkpoint the way Megatron-LM's
  ``load_checkpoint`` does, and record the eval loss, the full tensors and the next two training losses
  against the reference (JSON written by rank 0).

Everything runs inside ``main()``: torch_dist saving starts a spawn ``Manager`` that re-imports ``__main__``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import warnings
from datetime import timedelta
from functools import partial
from typing import Any

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))

GBS, MBS, SEQ = 8, 2, 32


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=["save", "load"], required=True)
    p.add_argument("--cfg", required=True, help="JSON model/training config")
    p.add_argument("--layout", default="2,2")
    p.add_argument("--out", required=True, help="save: output root; load: result JSON")
    p.add_argument("--ref", default="")
    p.add_argument("--ckpts", default="", help="load: fmt:dir:tp:pp[,...]")
    return p.parse_args()


def main() -> None:  # noqa: C901 - one worker, phases inline
    opts = parse()
    cfg = json.loads(opts.cfg)
    sys.path.insert(0, HERE)
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import mcore_shim
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.enums import ModelType
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.transformer_config import TransformerConfig

    for mod in ("torch", "filesystem_async", "state_dict_saver", "fully_parallel", "async_utils"):
        __import__(f"megatron.core.dist_checkpointing.strategies.{mod}")

    mcore_shim.apply()
    mcore_shim.fix_distopt()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False, timedelta(seconds=120)
    )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("ckpt", store),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.get("dtype", "fp32")]
    vocab = cfg.get("vocab", 128)
    make_div = cfg.get("make_div", 128)

    def padded_vocab(tp: int) -> int:
        m = make_div * tp
        return -(-vocab // m) * m

    class Run:
        def __init__(self, tp: int, pp: int, distopt: bool | None = None) -> None:
            self.tp, self.pp = tp, pp
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            mcore_shim.apply()
            model_parallel_cuda_manual_seed(cfg.get("seed", 1234))
            self.dp = ps.get_data_parallel_world_size()
            heads = cfg.get("heads", 4)
            self.cfg = TransformerConfig(
                num_layers=cfg.get("layers", 4),
                hidden_size=cfg.get("hidden", 64),
                num_attention_heads=heads,
                num_query_groups=cfg.get("groups", heads),
                ffn_hidden_size=cfg.get("ffn", 4 * cfg.get("hidden", 64)),
                use_cpu_initialization=True,
                params_dtype=dtype,
                pipeline_dtype=dtype,
                bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16,
                tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp,
                hidden_dropout=0.0,
                attention_dropout=0.0,
                gated_linear_unit=cfg.get("swiglu", False),
                activation_func=torch.nn.functional.silu if cfg.get("swiglu") else torch.nn.functional.gelu,
                normalization=cfg.get("norm", "LayerNorm"),
                add_bias_linear=cfg.get("bias", True),
                add_qkv_bias=cfg.get("bias", True),
            )
            self.gpt = GPTModel(
                self.cfg,
                get_gpt_layer_local_spec(normalization=cfg.get("norm", "LayerNorm")),
                vocab_size=padded_vocab(tp),
                max_sequence_length=SEQ,
                pre_process=ps.is_pipeline_first_stage(),
                post_process=ps.is_pipeline_last_stage(),
                share_embeddings_and_output_weights=cfg.get("tied", True),
                position_embedding_type=cfg.get("pos", "learned_absolute"),
            )
            mcore_shim.apply()
            inner = Float16Module(self.cfg, self.gpt) if dtype != torch.float32 else self.gpt
            self.distopt = cfg.get("distopt", False) if distopt is None else distopt
            ddp_cfg = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=self.distopt,
                overlap_grad_reduce=cfg.get("overlap", False),
                bucket_size=cfg.get("bucket"),
            )
            self.model = DistributedDataParallel(self.cfg, ddp_cfg, inner)
            self.opt = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer="adam",
                    lr=3e-3,
                    min_lr=3e-4,
                    clip_grad=1.0,
                    weight_decay=0.01,
                    use_distributed_optimizer=self.distopt,
                    bf16=dtype == torch.bfloat16,
                    fp16=dtype == torch.float16,
                    params_dtype=dtype,
                    initial_loss_scale=2.0**10 if dtype == torch.float16 else None,
                ),
                [self.model],
            )
            self.sched = OptimizerParamScheduler(
                self.opt,
                init_lr=0.0,
                max_lr=3e-3,
                min_lr=3e-4,
                lr_warmup_steps=GBS,
                lr_decay_steps=100 * GBS,
                lr_decay_style="cosine",
                start_wd=0.01,
                end_wd=0.01,
                wd_incr_steps=100 * GBS,
                wd_incr_style="constant",
            )
            self.cfg.finalize_model_grads_func = finalize_model_grads
            mcore_shim.apply()
            self.iteration = 0

        def destroy(self) -> None:
            old = [g for g in dist.distributed_c10d._world.pg_map if g is not dist.group.WORLD]
            self.cfg.finalize_model_grads_func = None
            ps.destroy_model_parallel()
            for g in old:
                if g in dist.distributed_c10d._world.pg_map:
                    dist.destroy_process_group(g)

        # ---------------------------------------------------------------- data and steps
        def microbatches(self, it: int, eval_: bool) -> list[dict[str, Any]]:
            def sample(seed: int) -> Any:
                g = torch.Generator().manual_seed(seed)
                start = torch.randint(0, vocab, (1,), generator=g)
                return (start + torch.arange(SEQ + 1) * 3) % vocab

            if eval_:
                rows = [sample(777_000 + s) for s in range(GBS)]
            else:
                per = GBS // self.dp
                r = ps.get_data_parallel_rank()
                rows = [sample(1000 * it + s) for s in range(r * per, (r + 1) * per)]
            out = []
            for m in range(0, len(rows), MBS):
                tok = torch.stack(rows[m : m + MBS])
                out.append(
                    dict(
                        tokens=tok[:, :-1].contiguous(),
                        labels=tok[:, 1:].contiguous(),
                        position_ids=torch.arange(SEQ).unsqueeze(0).expand(MBS, -1).contiguous(),
                        attention_mask=torch.tril(torch.ones(1, 1, SEQ, SEQ)) < 0.5,
                        loss_mask=torch.ones(MBS, SEQ),
                    )
                )
            return out

        def step(self, it: int, forward_only: bool = False) -> float:
            mbs = self.microbatches(it, forward_only)

            def loss_func(loss_mask: Any, output: Any) -> Any:
                losses = output.float().view(-1)
                loss = torch.sum(losses * loss_mask.view(-1)) / loss_mask.sum()
                return loss, {"lm loss": loss.detach().clone()}

            def fwd(data_iterator: Any, model: Any) -> Any:
                b = next(data_iterator)
                out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
                return out, partial(loss_func, b["loss_mask"])

            if not forward_only:
                self.model.zero_grad_buffer()
                self.opt.zero_grad()
            losses = get_forward_backward_func()(
                forward_step_func=fwd,
                data_iterator=iter(mbs),
                model=[self.model],
                num_microbatches=len(mbs),
                seq_length=SEQ,
                micro_batch_size=MBS,
                forward_only=forward_only,
            )
            if not forward_only:
                self.opt.step()
                self.sched.step(increment=GBS)
                self.iteration += 1
            loc = torch.tensor(
                [
                    sum(x["lm loss"].item() for x in losses) if losses else 0.0,
                    float(len(losses)) if losses else 0.0,
                ],
                dtype=torch.float64,
            )
            if forward_only:  # eval batch is replicated over DP: count each DP copy once
                loc /= self.dp
            dist.all_reduce(loc)
            return loc[0].item() / max(loc[1].item(), 1)

        # ---------------------------------------------------------------- state dicts
        def metadata(self) -> dict[str, Any]:
            md: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
            if self.distopt:
                md["distrib_optim_sharding_type"] = "fully_reshardable"
                md["distrib_optim_fully_reshardable_mem_efficient"] = False
            return md

        def prime(self) -> None:
            for o in getattr(self.opt, "chained_optimizers", [self.opt]):
                if o.init_state_fn is not None:
                    o.init_state_fn(o.optimizer, o.config)
                for g in o.optimizer.param_groups:
                    for p_ in g["params"]:
                        o.optimizer.state[p_].setdefault("step", torch.tensor(0.0))

        def sharded(self, is_loading: bool = False) -> dict[str, Any]:
            if is_loading and self.distopt:
                self.prime()
            md = self.metadata()
            m = self.gpt.sharded_state_dict(metadata=dict(md))
            sd: dict[str, Any] = {"model": m}
            sd["optimizer"] = self.opt.sharded_state_dict(sd, is_loading=is_loading, metadata=dict(md))
            return sd

        def full_tensors(self) -> dict[str, Any] | None:
            ssd = self.sharded()
            apply_factories(ssd)
            mine = []

            def walk(x: Any) -> None:
                if isinstance(x, dict):
                    for v in x.values():
                        walk(v)
                elif isinstance(x, list):
                    for v in x:
                        walk(v)
                elif isinstance(x, ShardedTensor):
                    mine.append((x.without_data(), x.data.detach().clone()))

            walk(ssd)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            if rank != 0:
                return None
            full: dict[str, Any] = {}
            for lst in gathered:
                for sh, data in lst:
                    if sh.key not in full:
                        full[sh.key] = torch.zeros(sh.global_shape, dtype=data.dtype)
                    full[sh.key][sh.global_slice()] = data.reshape(full[sh.key][sh.global_slice()].shape)
            return full

        def rng_state(self) -> dict[str, Any]:
            return {
                "random_rng_state": random.getstate(),
                "np_rng_state": np.random.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "cuda_rng_state": torch.get_rng_state(),
                "rng_tracker_states": get_cuda_rng_tracker().get_states(),
            }

        def megatron_args(self, fmt: str) -> argparse.Namespace:
            heads = cfg.get("heads", 4)
            return argparse.Namespace(
                num_layers=cfg.get("layers", 4),
                hidden_size=cfg.get("hidden", 64),
                ffn_hidden_size=cfg.get("ffn", 4 * cfg.get("hidden", 64)),
                num_attention_heads=heads,
                num_query_groups=cfg.get("groups", heads),
                group_query_attention=cfg.get("groups", heads) != heads,
                kv_channels=cfg.get("hidden", 64) // heads,
                seq_length=SEQ,
                max_position_embeddings=SEQ,
                position_embedding_type=cfg.get("pos", "learned_absolute"),
                add_position_embedding=cfg.get("pos", "learned_absolute") == "learned_absolute",
                padded_vocab_size=padded_vocab(self.tp),
                vocab_size=vocab,
                make_vocab_size_divisible_by=make_div,
                tensor_model_parallel_size=self.tp,
                pipeline_model_parallel_size=self.pp,
                virtual_pipeline_model_parallel_size=None,
                data_parallel_size=self.dp,
                world_size=world,
                swiglu=cfg.get("swiglu", False),
                untie_embeddings_and_output_weights=not cfg.get("tied", True),
                normalization=cfg.get("norm", "LayerNorm"),
                add_bias_linear=cfg.get("bias", True),
                add_qkv_bias=cfg.get("bias", True),
                qk_layernorm=False,
                params_dtype=dtype,
                fp16=dtype == torch.float16,
                bf16=dtype == torch.bfloat16,
                use_distributed_optimizer=self.distopt,
                ckpt_format=fmt,
                transformer_impl="local",
                num_experts=None,
                model_type=ModelType.encoder_or_decoder,
                attention_backend=AttnBackend.auto,
                exit_signal=signal.SIGTERM,
                decoder_first_pipeline_num_layers=None,
                decoder_last_pipeline_num_layers=None,
                consumed_train_samples=self.iteration * GBS,
                global_batch_size=GBS,
                micro_batch_size=MBS,
                lr=3e-3,
                min_lr=3e-4,
                decoupled_lr=None,
                no_save_optim=False,
                no_save_rng=False,
                data_parallel_random_init=False,
                ddp_bucket_size=cfg.get("bucket"),
                overlap_grad_reduce=cfg.get("overlap", False),
                iteration=self.iteration,
            )

        def save_legacy(self, root: str) -> None:
            it = self.iteration
            tp_r, pp_r = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
            sub = f"mp_rank_{tp_r:02d}" if self.pp == 1 else f"mp_rank_{tp_r:02d}_{pp_r:03d}"
            path = os.path.join(root, f"iter_{it:07d}", sub)
            if ps.get_data_parallel_rank() == 0:
                os.makedirs(path, exist_ok=True)
            dist.barrier()
            if self.distopt:  # every DP rank takes part in the gather; DP rank 0 writes
                self.opt.save_parameter_state(os.path.join(path, "distrib_optim.pt"))
            if ps.get_data_parallel_rank() == 0:
                sd = {
                    "args": self.megatron_args("torch"),
                    "checkpoint_version": 3.0,
                    "iteration": it,
                    "model": self.gpt.state_dict_for_save_checkpoint(),
                    "optimizer": self.opt.state_dict(),
                    "opt_param_scheduler": self.sched.state_dict(),
                    "rng_state": [self.rng_state()],
                    "num_floating_point_operations_so_far": 123.0,
                }
                torch.save(sd, os.path.join(path, "model_optim_rng.pt"))
            dist.barrier()
            if rank == 0:
                with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write(str(it))

        def save_dist(self, root: str) -> None:
            it = self.iteration
            path = os.path.join(root, f"iter_{it:07d}")
            if rank == 0:
                os.makedirs(path, exist_ok=True)
            dist.barrier()
            sd = self.sharded()
            md = self.metadata()
            sd.update(
                {
                    "args": self.megatron_args("torch_dist"),
                    "checkpoint_version": 3.0,
                    "iteration": it,
                    "opt_param_scheduler": self.sched.state_dict(),
                    "num_floating_point_operations_so_far": 123.0,
                    "rng_state": ShardedObject(
                        "rng_state",
                        [self.rng_state()],
                        (self.pp, self.tp),
                        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                        replica_id=ps.get_data_parallel_rank(),
                    ),
                }
            )
            mcore_shim.apply()
            dist_checkpointing.save(sd, path, content_metadata=md)
            dist.barrier()
            if rank == 0:
                with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write(str(it))

        def load_legacy(self, root: str) -> None:
            with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
                it = int(f.read().strip())
            tp_r, pp_r = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
            sub = f"mp_rank_{tp_r:02d}" if self.pp == 1 else f"mp_rank_{tp_r:02d}_{pp_r:03d}"
            path = os.path.join(root, f"iter_{it:07d}", sub)
            sd = torch.load(os.path.join(path, "model_optim_rng.pt"), map_location="cpu", weights_only=False)
            a = sd["args"]
            assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (self.tp, self.pp), (
                "check_checkpoint_args: TP/PP of the checkpoint differ from the run"
            )
            assert a.padded_vocab_size == padded_vocab(self.tp)
            assert a.model_type == ModelType.encoder_or_decoder
            self.gpt.load_state_dict(sd["model"], strict=True)
            self.opt.load_state_dict(sd["optimizer"])
            if self.distopt:
                self.opt.load_parameter_state(os.path.join(path, "distrib_optim.pt"))
            self.sched.load_state_dict(sd["opt_param_scheduler"])
            self.iteration = sd["iteration"]
            if "rng_state" in sd:
                self.loaded_rng = sd["rng_state"][0]

        def load_dist(self, root: str) -> None:
            with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as f:
                it = int(f.read().strip())
            path = os.path.join(root, f"iter_{it:07d}")
            common = dist_checkpointing.load_common_state_dict(path)
            md = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
            assert md is not None and md.get("chained_optim_avoid_prefix"), md
            sd = self.sharded(is_loading=True)
            a = common["args"]
            if (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (
                self.tp,
                self.pp,
            ) and not getattr(a, "no_save_rng", False):
                sd["rng_state"] = ShardedObject(
                    "rng_state",
                    [self.rng_state()],
                    (self.pp, self.tp),
                    (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                    replica_id=ps.get_data_parallel_rank(),
                )
            mcore_shim.apply()
            loaded = dist_checkpointing.load(sd, path)
            self.gpt.load_state_dict(loaded["model"], strict=False)
            self.opt.load_state_dict(loaded["optimizer"])
            if self.distopt:
                for o in getattr(self.opt, "chained_optimizers", [self.opt]):
                    o._copy_main_params_to_model_params()
            self.sched.load_state_dict(loaded["opt_param_scheduler"])
            self.iteration = loaded["iteration"]
            if "rng_state" in loaded:
                self.loaded_rng = loaded["rng_state"][0]

    t0 = time.time()
    if opts.phase == "save":
        tp, pp = map(int, opts.layout.split(","))
        run = Run(tp, pp)
        for it in range(cfg.get("iters", 2)):
            run.step(it)
        ev = run.step(0, forward_only=True)
        if cfg.get("legacy", True):
            run.save_legacy(os.path.join(opts.out, "legacy"))
        if cfg.get("torch_dist", True):
            run.save_dist(os.path.join(opts.out, "dist"))
        full = run.full_tensors()
        traj = [run.step(it) for it in range(cfg.get("iters", 2), cfg.get("iters", 2) + 2)]
        if rank == 0:
            torch.save(
                {"eval": ev, "full": full, "traj": traj, "layout": [tp, pp]}, os.path.join(opts.out, "ref.pt")
            )
            print(f"[save] TP{tp}PP{pp}: eval {ev:.6f} traj {traj} in {time.time() - t0:.1f}s", flush=True)
        run.destroy()
    else:
        ref = torch.load(opts.ref, weights_only=False) if rank == 0 else None
        results = []
        for spec in opts.ckpts.split(","):
            fmt, root, tp_s, pp_s, opt_s = (spec.split(":") + [""])[:5]
            run = Run(int(tp_s), int(pp_s), {"distopt": True, "plain": False}.get(opt_s))
            (run.load_legacy if fmt == "torch" else run.load_dist)(root)
            ev = run.step(0, forward_only=True)
            full = run.full_tensors()
            it0 = run.iteration
            traj = [run.step(it) for it in range(it0, it0 + 2)]
            if rank == 0:
                assert ref is not None and full is not None

                def canon(d: dict[str, Any]) -> dict[str, Any]:  # DistOpt names its main params "param"
                    return {
                        k.replace("optimizer.state.param.", "optimizer.state.fp32_param."): v
                        for k, v in d.items()
                    }

                full, reff = canon(full), canon(ref["full"])
                if (
                    cfg.get("dtype", "fp32") == "fp32"
                ):  # fp32 main params = the params: compare what both hold
                    full = {k: v for k, v in full.items() if ".fp32_param." not in k}
                    reff = {k: v for k, v in reff.items() if ".fp32_param." not in k}
                diffs = {}
                for k, v in reff.items():
                    if k not in full:
                        diffs[k] = "missing"
                    elif tuple(full[k].shape) != tuple(v.shape):
                        diffs[k] = f"shape {tuple(full[k].shape)} vs {tuple(v.shape)}"
                    elif not torch.equal(full[k], v):
                        diffs[k] = float((full[k].double() - v.double()).abs().max())
                results.append(
                    {
                        "ckpt": spec,
                        "eval": ev,
                        "ref_eval": ref["eval"],
                        "traj": traj,
                        "ref_traj": ref["traj"],
                        "n_keys": len(full),
                        "n_ref_keys": len(reff),
                        "diffs": diffs,
                        "extra_keys": sorted(set(full) - set(reff)),
                        "iteration": run.iteration,
                    }
                )
            run.destroy()
        if rank == 0:
            with open(opts.out, "w") as f:
                json.dump(results, f, indent=1)
            print(f"[load] {len(results)} checkpoints in {time.time() - t0:.1f}s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
