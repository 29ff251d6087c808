"""Leaks on purpose (a process group, a non-daemon thread, file descriptors) to prove the leak check bites."""

import threading
import time

import torch.distributed as dist

from megatron_unicron.testing.leaks import write_report_if_requested

write_report_if_requested("start")
dist.init_process_group("gloo")
files = [open(__file__) for _ in range(8)]
threading.Thread(target=time.sleep, args=(0.5,), name="leaky-thread").start()
write_report_if_requested("end")
