"""The statistics key of a timed collective: the group's ranks, remembered without keeping the group alive."""

from __future__ import annotations

import gc
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megatron_unicron.detect.watchdog import AdaptiveTimeouts, TimeoutPolicy
from megatron_unicron.megatron import timed_collectives


@pytest.fixture
def one_rank_world(tmp_path):
    address = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        timed_collectives.revert()
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="collectives are not timed with CUDA")
def test_each_group_keys_its_own_statistics_and_a_destroyed_group_is_forgotten(one_rank_world):
    timeouts = AdaptiveTimeouts(TimeoutPolicy())
    timed_collectives.apply(timeouts)
    cells = [cell.cell_contents for cell in dist.all_reduce.__closure__]
    kinds = next(c for c in cells if isinstance(c, timed_collectives._Kinds))

    tensor = torch.ones(5)
    dist.all_reduce(tensor)
    dist.all_reduce(tensor, group=dist.group.WORLD)
    assert timeouts.samples(("all_reduce", (0,), 5)) == 2  # the default group and WORLD are one group

    group = dist.new_group([0])
    dist.all_reduce(torch.ones(3), group=group)
    assert timeouts.samples(("all_reduce", (0,), 3)) == 1
    assert len(kinds.slots) == 2

    dist.destroy_process_group(group)
    del group
    gc.collect()
    assert len(kinds.slots) == 1  # the table holds no reference that would keep the group alive
    assert tensor.tolist() == [1.0] * 5
