"""Joins the gloo group, prints "ready rank R", then idles (all-reducing now and then with --allreduce)."""

import argparse
import os
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=float, default=120.0)
p.add_argument("--allreduce", action="store_true")
args = p.parse_args()

dist.init_process_group("gloo")
print(f"ready rank {os.environ['RANK']}", flush=True)
deadline = time.monotonic() + args.seconds
while time.monotonic() < deadline:
    if args.allreduce:
        dist.all_reduce(torch.ones(1))
    time.sleep(0.05)
dist.destroy_process_group()
