"""The plan executor over a private gloo channel: exact delivery, checksum verification."""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_unicron.transition import exchange
from megatron_unicron.transition.transfer_plan import Holding, Need, SourceKind, plan_transfer

WORLD = 3
SHAPE = (6, 10)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario():
    """Old layout: rows split in 3 (ranks 0-2); new layout: columns split in 2 (ranks 0-1), rank 2 spare."""
    full = torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32).reshape(SHAPE)
    holdings = [
        Holding(r, 0, "w", ((2 * r, 2 * r + 2), (0, 10)), SourceKind.LIVE, f"n{r // 2}") for r in range(3)
    ]
    needs = [Need(r, 0, "w", ((0, 6), (5 * r, 5 * r + 5))) for r in range(2)]
    return full, holdings, needs, {0: "n0", 1: "n0", 2: "n1"}


def worker(rank, port, corrupt_from, results):
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=30))
    channel = dist.ProcessGroupGloo(dist.PrefixStore("xfer", store), rank, WORLD, timedelta(seconds=30))
    full, holdings, needs, rank_node = scenario()
    plan = plan_transfer(holdings, needs, rank_node)
    sources = [full[2 * rank : 2 * rank + 2].clone()]
    targets = [torch.zeros(6, 5)] if rank < 2 else []
    tamper = flip_first_byte if rank == corrupt_from else None
    stats = exchange.execute(
        plan.pieces, rank, sources, targets, channel=channel, timeout=timedelta(seconds=20), tamper=tamper
    )
    ok = all(torch.equal(t, full[:, 5 * rank : 5 * rank + 5]) for t in targets)
    results[rank] = (ok, stats.sent_bytes, stats.received_bytes, stats.local_bytes, stats.corrupt_sources)


def flip_first_byte(payload: torch.Tensor) -> None:
    payload[0] ^= 1  # what a flipped bit in transit looks like


def run(corrupt_from=-1):
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=30), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    procs = [ctx.Process(target=worker, args=(r, port, corrupt_from, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    out = dict(results)
    manager.shutdown()
    del store
    return out


@pytest.mark.timeout(180)
def test_exchange_delivers_every_slice_exactly():
    results = run()
    assert results[0][0] and results[1][0]
    # rank 0 needs 2 rows x 5 cols from itself (local), 4 rows x 5 cols from ranks 1 and 2
    assert results[0][3] == 2 * 5 * 4 and results[0][2] == 4 * 5 * 4
    assert results[2][1] > 0  # the spare served its rows
    assert all(r[4] == () for r in results.values())


@pytest.mark.timeout(180)
def test_corrupt_piece_is_detected_and_names_its_source():
    results = run(corrupt_from=2)
    assert results[0][4] == (2,) and results[1][4] == (2,)
    # what rank 1 sent was sound and unpacked; rank 2's rows were not
    assert results[0][2] == 2 * 5 * 4 and not results[0][0]


def test_no_channel_needed_when_everything_is_local():
    full, holdings, _, rank_node = scenario()
    plan = plan_transfer(holdings, [Need(0, 0, "w", ((0, 2), (0, 10)))], rank_node)
    target = torch.zeros(2, 10)
    stats = exchange.execute(plan.pieces, 0, [full[0:2]], [target], channel=None)
    assert torch.equal(target, full[0:2]) and stats.messages == 0
