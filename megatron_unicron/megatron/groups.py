"""Process groups of one generation: the world group and megatron's model-parallel groups.

This is the only module that initialises, destroys or abandons torch.distributed groups and megatron's
global ``parallel_state``. Every (re)configuration is a new *generation*: its world group rendezvous on
its own store prefix, so nothing of generation g is reused by g+1.

Three ways to end a generation:

* :func:`destroy_model_parallel` destroys megatron's groups *and* the sub-groups megatron forgets
  (``destroy_model_parallel()`` alone leaks ~17 groups and ~85 sockets per call);
* :func:`destroy_world` destroys the (healthy) world group;
* :func:`abandon_world` forgets a *broken* world whose op may still be pending: destroying it would block
  until that op's timeout, so its objects are parked in a graveyard and released once the op drains.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_unicron.megatron import cpu

logger = logging.getLogger(__name__)

# Broken process groups that must stay referenced until their pending op drains (see abandon_world),
# with the time they were abandoned.
_GRAVEYARD: list[tuple[float, Any]] = []


@dataclass(frozen=True)
class ParallelCoords:
    """This rank's place in the current layout."""

    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_size: int
    pp_size: int
    dp_size: int

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank holds the first pipeline stage (the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the last pipeline stage (the loss)."""
        return self.pp_rank == self.pp_size - 1


def init_world(
    store: dist.Store,
    prefix: str,
    rank: int,
    world_size: int,
    timeout: timedelta,
    op_timeout: timedelta | None = None,
) -> None:
    """Create the default (world) gloo/nccl group of a generation on ``store`` under ``prefix``.

    ``timeout`` bounds the rendezvous (a restarted peer may take a while to import and join);
    ``op_timeout``, when given, then becomes the group's per-operation timeout.
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(rank % max(torch.cuda.device_count(), 1)))
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(prefix, store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )
    if op_timeout is not None:
        dist.distributed_c10d._set_pg_timeout(op_timeout, dist.group.WORLD)


DEFAULT_ORDER = "tp-cp-ep-dp-pp"
PIPELINES_FIRST_ORDER = "tp-cp-ep-pp-dp"  # consecutive ranks form a pipeline: DP replicas on other nodes


def init_model_parallel(tp: int, pp: int, timeout: timedelta, order: str = DEFAULT_ORDER) -> ParallelCoords:
    """Initialise megatron's model-parallel groups for (TP, PP) over the current world.

    Every megatron sub-group gets ``timeout`` (megatron's own default is 30 minutes whatever the world
    group's timeout is). ``order`` is megatron's rank order.
    """
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout.total_seconds() / 60,
        create_gloo_process_groups=False,
        order=order,
    )
    cpu.apply()
    return current_coords()


def current_coords() -> ParallelCoords:
    """This rank's coordinates in megatron's current layout."""
    from megatron.core import parallel_state as ps

    return ParallelCoords(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
    )


def seed_everything(seed: int, coords: ParallelCoords) -> None:
    """Megatron-LM's seeding: ``seed + 100·pp_rank`` for python/numpy/torch, then megatron's RNG tracker."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * coords.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def destroy_model_parallel() -> None:
    """Destroy megatron's groups of the current generation, including those megatron forgets."""
    from megatron.core import parallel_state as ps

    world = dist.group.WORLD if dist.is_initialized() else None
    sub_groups = [g for g in list(dist.distributed_c10d._world.pg_map) if g is not world]
    ps.destroy_model_parallel()
    forget_megatron_globals()
    for group in sub_groups:
        if group in dist.distributed_c10d._world.pg_map:
            dist.destroy_process_group(group)


def forget_megatron_globals() -> list[str]:
    """Clear the group globals that megatron's ``destroy_model_parallel`` leaves set; returns their names.

    megatron-core 0.16 does not reset ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP`` (the
    DistributedOptimizer's group): the reference keeps a destroyed gloo group's sockets open for the
    life of the process, one set per generation.
    """
    from megatron.core import parallel_state as ps

    left = [name for name, value in vars(ps).items()
            if name.isupper() and isinstance(value, (dist.ProcessGroup, list, tuple))
            and _holds_group(value)]  # fmt: skip
    for name in left:
        setattr(ps, name, None)
    return left


def _holds_group(value: object) -> bool:
    if isinstance(value, dist.ProcessGroup):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, dist.ProcessGroup) for v in value)


def destroy_world() -> None:
    """Destroy every remaining group of a healthy generation, the world group last."""
    if dist.is_initialized():
        destroy_model_parallel()
        dist.destroy_process_group()


def abort_communicators() -> bool:
    """Abort the current generation's NCCL communicators; returns whether there were any to abort.

    A thread blocked in an NCCL operation then returns with an error and the worker recovers in-band.
    NCCL only: gloo has no abort (its waits are timed instead, ``timed_collectives``). Untested here: the
    project's machines have no GPU.
    """
    if not dist.is_initialized() or dist.get_backend() != "nccl":
        return False
    dist.distributed_c10d._abort_process_group(None)
    return True


def abandon_world() -> int:
    """Forget a broken generation's groups without blocking; returns how many groups were abandoned.

    ``destroy_process_group`` on a group with a timed-out op still pending blocks until that op's own
    timeout expires. The groups are kept referenced (their worker threads are still inside the op) and
    torch.distributed's registry is cleared so a new world can be initialised at once.
    """
    from megatron.core import parallel_state as ps

    c10d = dist.distributed_c10d
    groups = list(c10d._world.pg_map)
    now = time.monotonic()
    _GRAVEYARD.extend((now, group) for group in groups)
    ps.destroy_model_parallel()
    forget_megatron_globals()
    c10d._update_default_pg(None)
    for registry in (
        c10d._world.pg_map,
        c10d._world.pg_names,
        c10d._world.pg_group_ranks,
        c10d._world.pg_backend_config,
        c10d._world.pg_to_tag,
        c10d._world.tags_to_pg,
        c10d._world.pg_coalesce_state,
    ):
        registry.clear()
    c10d._unregister_all_process_groups()
    c10d._world.group_count = 0
    logger.info("abandoned %d process groups of a broken generation", len(groups))
    return len(groups)


def graveyard_size() -> int:
    """How many abandoned groups are still referenced."""
    return len(_GRAVEYARD)


def release_drained(op_timeout: timedelta, *, wait: bool = False) -> int:
    """Release abandoned groups older than their operation timeout (their stuck op has failed by then).

    With ``wait``, first sleep until every abandoned group is that old (at the end of a job). Returns
    how many groups remain referenced.
    """
    limit = op_timeout.total_seconds() + 1.0
    if wait and _GRAVEYARD:
        oldest_due = max(t for t, _ in _GRAVEYARD) + limit
        time.sleep(max(0.0, oldest_due - time.monotonic()))
    now = time.monotonic()
    keep = [(t, g) for t, g in _GRAVEYARD if now - t < limit]
    if len(keep) != len(_GRAVEYARD):
        _GRAVEYARD[:] = keep
        gc.collect()
    return len(_GRAVEYARD)
