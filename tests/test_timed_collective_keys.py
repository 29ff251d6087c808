"""Timed collectives per call: their statistics keys, and which all_reduce calls go straight to the backend.

A key names the group by its ranks, remembered without keeping the group alive.
"""

from __future__ import annotations

import functools
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="collectives are not timed with CUDA")
def test_a_synchronous_all_reduce_goes_to_the_backend_and_every_other_call_through_torch(
    monkeypatch, one_rank_world
):
    through_torch = []
    original = dist.all_reduce

    @functools.wraps(original)  # the wrapper reads the signature
    def spy(*args, **kwargs):
        through_torch.append(kwargs.get("async_op", args[3] if len(args) > 3 else False))
        return original(*args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    timeouts = AdaptiveTimeouts(TimeoutPolicy())
    timed_collectives.apply(timeouts)
    try:
        plain = torch.tensor([1.0, 2.0])
        assert dist.all_reduce(plain, op=dist.ReduceOp.MAX) is None
        assert through_torch == [] and plain.tolist() == [1.0, 2.0]
        assert timeouts.samples(("all_reduce", (0,), 2)) == 1  # timed all the same

        dist.all_reduce(torch.nn.Parameter(torch.ones(3)))  # a subclass: torch decides what it means
        dist.all_reduce(torch.ones(2, dtype=torch.complex64))  # complex: torch views it as real
        work = dist.all_reduce(torch.ones(4), async_op=True)
        assert isinstance(work, timed_collectives.TimedWork) and work.wait()
        assert through_torch == [True, True, True]  # each issued asynchronously by the general wrapper
        assert [timeouts.samples(("all_reduce", (0,), n)) for n in (3, 4)] == [1, 1]
    finally:
        timed_collectives.revert()
    assert dist.all_reduce is spy
