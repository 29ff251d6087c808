"""One rank fails (exit code or signal) on chosen attempts; the others all-reduce then wait or finish."""

import argparse
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--rank", type=int, required=True)
p.add_argument("--code", type=int, default=3)
p.add_argument("--signal", default="", help="die by this signal (e.g. SIGKILL) instead of exiting")
p.add_argument("--attempts", default="0", help="comma-separated restart counts on which to fail")
p.add_argument("--survivor-sleep", type=float, default=60.0, help="how long the others wait afterwards")
args = p.parse_args()

rank, attempt = int(os.environ["RANK"]), os.environ["TORCHELASTIC_RESTART_COUNT"]
dist.init_process_group("gloo")
x = torch.ones(1)
dist.all_reduce(x)
print(f"rank {rank} attempt {attempt} all_reduce {x.item():g}", flush=True)
if rank == args.rank and attempt in args.attempts.split(","):
    print(f"rank {rank} attempt {attempt} failing now", flush=True)
    if args.signal:
        os.kill(os.getpid(), getattr(signal, args.signal))
    os._exit(args.code)
dist.barrier() if attempt not in args.attempts.split(",") else time.sleep(args.survivor_sleep)
dist.destroy_process_group()
sys.exit(0)
