"""Timed reduce-scatters on 2 gloo ranks: gloo's own ``wait(timeout)`` ignores the timeout for them.

Rank 0 prints one line per case: ``late <op> <first value> <seconds>`` (rank 1 joins 0.3 s late: the
result is right), then ``stuck <op> <seconds> <error>`` (rank 1 never joins: the wait must end at the
1 s adaptive timeout, not at the group's 20 s). ``<op>`` is ``plain`` (``reduce_scatter_tensor``) or
``coalesced`` (two of them in megatron's coalescing manager, as the DistributedOptimizer issues them).
"""

import os
import time
from datetime import timedelta

import megatron.core.distributed.param_and_grad_buffer as buffers
import torch
import torch.distributed as dist

from megatron_unicron.detect.watchdog import AdaptiveTimeouts, TimeoutPolicy
from megatron_unicron.megatron import timed_collectives

dist.init_process_group("gloo", timeout=timedelta(seconds=20))
rank = dist.get_rank()
timed_collectives.apply(AdaptiveTimeouts(TimeoutPolicy(warmup_floor_s=1.0)))
groups = {case: dist.new_group([0, 1]) for case in ("late", "stuck")}


def reduce_scatter(op: str, group: dist.ProcessGroup) -> torch.Tensor:
    full, shard = torch.full((8,), float(rank + 1)), torch.empty(4)
    if op == "plain":
        dist.reduce_scatter_tensor(shard, full, group=group)
        return shard
    other = torch.empty(4)
    with buffers._coalescing_manager(group, async_ops=True) as coalesced:
        dist.reduce_scatter_tensor(shard, full, group=group)
        dist.reduce_scatter_tensor(other, full, group=group)
    coalesced.wait()
    return shard + other


for op in ("plain", "coalesced"):
    if rank == 1:
        time.sleep(0.3)
    start = time.monotonic()
    value = reduce_scatter(op, groups["late"])
    if rank == 0:
        print(f"late {op} {value[0].item():g} {time.monotonic() - start:.2f}", flush=True)

dist.barrier()
if rank == 0:
    for op in ("plain", "coalesced"):
        start = time.monotonic()
        try:
            reduce_scatter(op, groups["stuck"])
            print(f"stuck {op} never", flush=True)
        except timed_collectives.CollectiveTimeout as error:
            print(f"stuck {op} {time.monotonic() - start:.2f} {error}", flush=True)
else:
    time.sleep(5)  # never joins the stuck reduce-scatters; leaves after rank 0 has timed out of both
os._exit(0)  # the abandoned reduce-scatters still hold their groups: do not destroy them
