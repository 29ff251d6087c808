"""Persistent checkpoints in Megatron-LM's ``torch_dist`` format, through megatron-core dist_checkpointing.

Layout on disk, as Megatron-LM writes and reads it::

    <save>/latest_checkpointed_iteration.txt     # the iteration, written last by rank 0
    <save>/iter_0000010/                         # DCP files, .metadata, metadata.json, common state

The common state carries Megatron-LM's keys: ``args`` (an ``argparse.Namespace`` of plain values with
Megatron's names, including ``consumed_train_samples``), ``checkpoint_version`` 3.0, ``iteration``,
``opt_param_scheduler``, ``num_floating_point_operations_so_far``; the sharded part holds ``model``,
``optimizer`` and ``rng_state``. The distributed optimizer is saved in its ``fully_reshardable`` form,
the only one that loads into another TP/PP layout. Loading reshards to the current layout; RNG states
are restored only when (TP, PP) is unchanged (they are per TP/PP rank).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_unicron.errors import ConfigError
from megatron_unicron.megatron import cpu, optimizer_fixes
from megatron_unicron.megatron.args import megatron_namespace

if TYPE_CHECKING:
    from megatron_unicron.megatron.args import MegatronArgs
    from megatron_unicron.megatron.train import Trainer

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


def checkpoint_dir(root: str, iteration: int) -> str:
    """``<root>/iter_NNNNNNN``, Megatron-LM's directory name."""
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> int | None:
    """The iteration named by ``latest_checkpointed_iteration.txt``, or None when there is none."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = Path(path).read_text().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{path} holds {text!r}, not an iteration number: fix or remove it") from None


def _import_dist_checkpointing() -> None:
    """Import megatron's checkpoint strategies, then patch them for CPU (they are imported lazily)."""
    import megatron.core.dist_checkpointing.strategies.filesystem_async  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.state_dict_saver  # noqa: F401
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401

    cpu.apply()


def sharded_metadata(args: MegatronArgs) -> dict[str, Any]:
    """Content metadata that decides how model and optimizer describe their sharded state."""
    from megatron.core import parallel_state as ps

    metadata: dict[str, Any] = {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
    }
    if args.use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable"
    return metadata


def serializable_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The metadata without process groups (what is stored in the checkpoint)."""
    return {k: v for k, v in metadata.items() if not isinstance(v, dist.ProcessGroup)}


def megatron_args_namespace(args: MegatronArgs, trainer: Trainer) -> argparse.Namespace:
    """The ``args`` Megatron-LM stores: plain values only, so any Megatron-LM can unpickle it."""
    values = vars(megatron_namespace(args))
    coords = trainer.generation.coords if trainer.generation else None
    if coords is not None:  # the layout of this generation, which may differ from the launch's
        values.update(tensor_model_parallel_size=coords.tp_size, pipeline_model_parallel_size=coords.pp_size)
    values.update(
        world_size=dist.get_world_size(),
        data_parallel_size=coords.dp_size if coords else 1,
        padded_vocab_size=trainer.padded_vocab_size,
        add_position_embedding=args.position_embedding_type == "learned_absolute",
        consumed_train_samples=trainer.progress.consumed_train_samples,
        consumed_valid_samples=trainer.progress.consumed_valid_samples,
        skipped_train_samples=0,
        iteration=trainer.progress.iteration,
        use_dist_ckpt=True,
        ckpt_format="torch_dist",
        unicron=args.unicron.to_dict(),
    )
    return argparse.Namespace(**values)


def rng_state() -> dict[str, Any]:
    """Every generator a Megatron step draws from (python, numpy, torch, CUDA, megatron's tracker)."""
    from megatron.core import tensor_parallel

    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    from megatron.core import tensor_parallel

    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _sharded_rng(coords: Any) -> Any:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        [rng_state()],
        (coords.pp_size, coords.tp_size),
        (coords.pp_rank, coords.tp_rank),
        replica_id=coords.dp_rank,
    )


def sharded_state(trainer: Trainer, args: MegatronArgs, *, for_loading: bool) -> dict[str, Any]:
    """Megatron-LM's ``generate_state_dict`` for torch_dist (sharded model, optimizer and RNG)."""
    gen = trainer.generation
    assert gen is not None
    metadata = sharded_metadata(args)
    model = gen.bundle.gpt  # unwrapped, as Megatron-LM's unwrap_model: DDP has no sharded_state_dict
    state: dict[str, Any] = {"model": model.sharded_state_dict(metadata=metadata)}
    load_optimizer = not (args.no_load_optim if for_loading else args.no_save_optim)
    if load_optimizer:
        if for_loading and args.use_distributed_optimizer:
            optimizer_fixes.prime_optimizer_state(gen.bundle.optimizer)
        state["optimizer"] = gen.bundle.optimizer.sharded_state_dict(
            state, is_loading=for_loading, metadata=metadata
        )
    state["rng_state"] = _sharded_rng(gen.coords)
    return state


def save(root: str, trainer: Trainer, args: MegatronArgs) -> float:
    """Save the current iteration under ``root``; returns the seconds it took on this rank."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    started = time.perf_counter()
    _import_dist_checkpointing()
    optimizer_fixes.apply()
    gen = trainer.generation
    assert gen is not None
    iteration = trainer.progress.iteration
    directory = checkpoint_dir(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    state = sharded_state(trainer, args, for_loading=False)
    state.update(
        args=megatron_args_namespace(args, trainer),
        checkpoint_version=CHECKPOINT_VERSION,
        iteration=iteration,
        opt_param_scheduler=gen.bundle.scheduler.state_dict(),
        num_floating_point_operations_so_far=trainer.progress.floating_point_operations,
    )
    dist_checkpointing.save(
        state,
        directory,
        TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1),
        content_metadata=serializable_metadata(sharded_metadata(args)),
    )
    dist.barrier()
    if dist.get_rank() == 0:
        tracker = os.path.join(root, TRACKER_FILE)
        Path(tracker + ".tmp").write_text(str(iteration))
        os.replace(tracker + ".tmp", tracker)
    dist.barrier()
    return time.perf_counter() - started


def _is_legacy(directory: str) -> bool:
    """Megatron-LM's test: a legacy (``--ckpt-format torch``) checkpoint has ``mp_rank_0*`` entries."""
    return os.path.isdir(directory) and any(name.startswith("mp_rank_0") for name in os.listdir(directory))


def _load_legacy(root: str, trainer: Trainer, args: MegatronArgs) -> bool:
    """Reshard a legacy checkpoint to this layout as torch_dist (rank 0, into a temporary directory), then
    load that like any torch_dist checkpoint; the temporary copy is removed afterwards."""
    import tempfile

    from megatron_unicron.ckpt import open_checkpoint, write_torch_dist
    from megatron_unicron.ckpt.errors import CheckpointError

    gen = trainer.generation
    assert gen is not None
    staged = [tempfile.mkdtemp(prefix="unicron_load_")] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(staged, src=0)
    staging = str(staged[0])
    target = os.path.join(staging, "checkpoint")
    failure = [""]
    if dist.get_rank() == 0:
        try:
            source = open_checkpoint(root, true_vocab_size=trainer.tokenizer.vocab_size)
            write_torch_dist(
                source,
                target,
                tp=gen.coords.tp_size,
                pp=gen.coords.pp_size,
                no_optimizer=args.no_load_optim,
                target_optimizer="distributed" if args.use_distributed_optimizer else "plain",
            )
        except CheckpointError as error:
            failure[0] = f"--load {root}: {error}"
    dist.broadcast_object_list(failure, src=0)
    try:
        if failure[0]:
            raise ConfigError(failure[0])
        logger.info(
            "resharded the legacy checkpoint %s to TP%d PP%d", root, gen.coords.tp_size, gen.coords.pp_size
        )
        return load(target, trainer, args)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)


def load(root: str, trainer: Trainer, args: MegatronArgs) -> bool:
    """Resume from the checkpoint ``root`` names; False (and a log line) when it holds none."""
    from megatron.core import dist_checkpointing

    iteration = read_tracker(root)
    if iteration is None:
        # As Megatron-LM: --load and --save usually name the same directory, empty at the first launch.
        logger.warning("--load %s holds no checkpoint (no %s): training from scratch", root, TRACKER_FILE)
        return False
    directory = checkpoint_dir(root, iteration)
    if _is_legacy(directory):
        return _load_legacy(root, trainer, args)
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise ConfigError(
            f"--load {root}: {directory} is neither a torch_dist nor a legacy (torch) Megatron checkpoint"
        )
    _import_dist_checkpointing()
    optimizer_fixes.apply()
    gen = trainer.generation
    assert gen is not None
    common = dist_checkpointing.load_common_state_dict(directory)
    saved_args = common["args"]
    same_layout = (
        getattr(saved_args, "tensor_model_parallel_size", None) == gen.coords.tp_size
        and getattr(saved_args, "pipeline_model_parallel_size", None) == gen.coords.pp_size
    )
    request = sharded_state(trainer, args, for_loading=True)
    saved_rng = not getattr(saved_args, "no_save_rng", False)
    load_rng = same_layout and saved_rng and not args.no_load_rng and not args.finetune
    if not load_rng:
        request.pop("rng_state")
    loaded = dist_checkpointing.load(request, directory)
    model = gen.bundle.gpt  # unwrapped, as Megatron-LM's unwrap_model: DDP has no sharded_state_dict
    model.load_state_dict(loaded["model"])
    if "optimizer" in loaded and not args.finetune:
        gen.bundle.optimizer.load_state_dict(loaded["optimizer"])
        optimizer_fixes.unshare_step_tensors(gen.bundle.optimizer)
        gen.bundle.scheduler.load_state_dict(common["opt_param_scheduler"])
    if load_rng:
        restore_rng_state(loaded["rng_state"][0])
    if not args.finetune:
        trainer.progress.iteration = int(common["iteration"])
        trainer.progress.consumed_train_samples = int(getattr(saved_args, "consumed_train_samples", 0))
        trainer.progress.consumed_valid_samples = int(getattr(saved_args, "consumed_valid_samples", 0))
        trainer.progress.floating_point_operations = float(
            common.get("num_floating_point_operations_so_far", 0.0)
        )
    logger.info(
        "loaded checkpoint %s at iteration %d (rng %s)",
        directory, trainer.progress.iteration, "restored" if load_rng else "not restored: layout changed",
    )  # fmt: skip
    return True
