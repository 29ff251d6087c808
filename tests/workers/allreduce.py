"""Every rank all-reduces its rank over env:// gloo and checks the sum."""

import os

import torch
import torch.distributed as dist

from megatron_unicron.testing.leaks import write_report_if_requested

write_report_if_requested("start")
dist.init_process_group("gloo")
x = torch.tensor([float(dist.get_rank())])
dist.all_reduce(x)
n = dist.get_world_size()
assert x.item() == n * (n - 1) / 2, x
print(f"rank {dist.get_rank()}/{n} on {os.environ.get('UNICRON_NODE', '-')}: sum {x.item():g} ok", flush=True)
dist.destroy_process_group()
write_report_if_requested("end")
