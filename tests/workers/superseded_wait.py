"""Timed waits on 2 gloo ranks: a late peer, and a decision that arrives while rank 0 waits.

Rank 0 prints one line per case: ``late-collective`` (all-reduce waited over several slices, correct
sum), ``late-p2p`` (a pipeline exchange with a late peer: not sliced, it completes), ``p2p-samples``
(the exchanges timed under their key before and after a statistics reset), ``superseded``
(rank 1 never joins; the next generation is "decided" 0.4 s in: the wait ends long before its 10 s).
"""

import os
import time

import torch
import torch.distributed as dist

from megatron_unicron.detect.watchdog import AdaptiveTimeouts, TimeoutPolicy
from megatron_unicron.megatron import timed_collectives

dist.init_process_group("gloo")
rank = dist.get_rank()
decided_at = [float("inf")]
timeouts = AdaptiveTimeouts(TimeoutPolicy(warmup_floor_s=10.0))
timed_collectives.apply(timeouts, superseded=lambda: time.monotonic() >= decided_at[0])

x = torch.tensor([float(rank + 1)])
dist.barrier()  # both ranks start the case together: rank 1 is then late by its sleep, not by start-up
if rank == 1:
    time.sleep(0.3)
start = time.monotonic()
dist.all_reduce(x)
if rank == 0:
    print(f"late-collective {x.item():g} {time.monotonic() - start:.2f}", flush=True)

got = torch.zeros(1)
if rank == 1:
    time.sleep(0.3)
start = time.monotonic()
ops = [dist.P2POp(dist.isend, x, 1 - rank), dist.P2POp(dist.irecv, got, 1 - rank)]
for work in dist.batch_isend_irecv(ops):
    work.wait()
if rank == 0:
    print(f"late-p2p {got.item():g} {time.monotonic() - start:.2f}", flush=True)


def exchange() -> None:
    for work in dist.batch_isend_irecv(ops):
        work.wait()


key = ("p2p[isend,irecv] with", (1 - rank,), 2)
exchange()
counted = [timeouts.samples(key)]  # the late exchange and this one, under one key
timeouts.reset()  # a new layout's statistics: the kept running mean is not the live one any more
exchange()
counted.append(timeouts.samples(key))
if rank == 0:
    print("p2p-samples", *counted, flush=True)

dist.barrier()
if rank == 0:
    start = time.monotonic()
    decided_at[0] = start + 0.4
    try:
        dist.all_reduce(x)
        print("superseded never", flush=True)
    except timed_collectives.Superseded as left:
        print(f"superseded {time.monotonic() - start:.2f} {left}", flush=True)
else:
    time.sleep(1.5)  # never joins; exits after rank 0 has left its wait
os._exit(0)  # rank 0's group still holds the abandoned all-reduce: do not destroy it
