"""A tiny ``--unicron`` worker: gloo all-reduces in a loop, reporting failures and following decisions.

``heal.py --iters N --incident-log PATH [--timeout S] [--step S] [--save DIR] [--inject SPEC ...]``

It speaks the worker side of the protocol the way a training process does: launch rank 0 posts the job
config; each iteration all-reduces over the generation's own process group (``gen<g>/pg``), waits with a
timeout, and posts its progress; on an error it reports a FaultEvent (kind classified from the error
text), waits for the next generation's decision and follows it: rebuild the group and redo from the
decision's iteration, exit when its rank is to be restarted, or exit when the job is stopped. A restarted
process (``UNICRON_RESTARTED=1``) joins generation ``UNICRON_GENERATION``. Faults come from the
project's injector (``--inject kill:3:4``), fired once per job.
"""

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_unicron.events import Action, FaultEvent, Phase
from megatron_unicron.protocol import JobChannel
from megatron_unicron.store import JobKeys, connect_store
from megatron_unicron.taxonomy import classify_exception
from megatron_unicron.testing.injector import FaultInjector, schedule_from

parser = argparse.ArgumentParser()
parser.add_argument("--iters", type=int, default=8)
parser.add_argument("--incident-log", required=True)
parser.add_argument("--timeout", type=float, default=1.0, help="seconds an all-reduce may take")
parser.add_argument("--step", type=float, default=0.1, help="seconds of 'compute' per iteration")
parser.add_argument("--save", default=None)
parser.add_argument("--inject", action="append", default=[])
parser.add_argument("--detection", default="{}", help="JSON overrides of the detection settings")
args = parser.parse_args()

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
node, job = os.environ["UNICRON_NODE"], os.environ["UNICRON_JOB"]
generation = int(os.environ.get("UNICRON_GENERATION", "0"))
restarted = os.environ.get("UNICRON_RESTARTED") == "1"
store = connect_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timedelta(seconds=30))
channel = JobChannel(store, JobKeys(job))
if rank == 0 and not restarted:
    import json

    channel.post_config({
        "incident_log": args.incident_log, "save": args.save, "world_size": world, "train_iters": args.iters,
        "layout": {"tp": 1, "pp": 1, "dp": world}, "detection": json.loads(args.detection),
    })
injector = FaultInjector(schedule_from(args.inject, {}), rank,
                         mark_fired=lambda spec, record: channel.claim_fault(spec.index, record))
print(f"rank {rank} started in generation {generation} (restarted: {restarted})", flush=True)

start = 0
if restarted:
    decision = channel.decision(generation)
    assert decision is not None, f"restarted into generation {generation} without its decision"
    start = decision.resume_iteration or 0
graveyard = []  # groups with an op that may still be pending: forgotten, never destroyed
while True:
    pg_store = dist.PrefixStore(channel.keys.gen(generation).process_groups, store.c10d_store)
    pg = dist.ProcessGroupGloo(pg_store, rank, world, timedelta(seconds=60))
    iteration, failure, resumed = start, None, False
    while iteration < args.iters:
        iteration += 1
        try:
            injector(iteration, Phase.FORWARD)
            x = torch.ones(1)
            pg.allreduce([x]).wait(timedelta(seconds=args.timeout))
            assert x.item() == world, f"all-reduce gave {x.item()}, expected {world}"
        except Exception as e:
            failure = e
            break
        channel.post_progress(rank, iteration, generation)
        if generation > 0 and not resumed:
            channel.post_resumed(generation, rank, iteration)
            resumed = True
        time.sleep(args.step)
    if failure is None:
        break
    kind = classify_exception(failure)
    channel.report(FaultEvent(job=job, kind=kind, rank=rank, node=node, generation=generation,
                              message=str(failure).splitlines()[0][:200], iteration=iteration,
                              phase=Phase.ALLREDUCE, t_detected=time.time()))
    print(f"rank {rank} reported {kind.value} at iteration {iteration} (generation {generation})", flush=True)
    decision = channel.wait_decision(generation + 1, timedelta(seconds=60))
    if decision is None or decision.action is Action.STOP:  # either way: the job stopped
        print(f"rank {rank} stopped: {channel.stopped()}", flush=True)
        os._exit(0)
    graveyard.append(pg)
    generation = decision.generation
    if rank in decision.restart:
        print(f"rank {rank} leaves: generation {generation} restarts it", flush=True)
        os._exit(0)
    start = decision.resume_iteration or 0

if rank == 0:
    channel.mark_done()
print(f"rank {rank} finished {args.iters} iterations in generation {generation}", flush=True)
os._exit(0)  # no destructor of a forgotten group may run
