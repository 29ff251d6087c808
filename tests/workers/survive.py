"""--unicron: rank <victim> exits with code 3; the others wait for its death to show up in the store."""

import os
import sys
import time
from datetime import timedelta

from megatron_unicron.store import JobKeys, connect_store, read_records

victim, rank = int(sys.argv[1]), int(os.environ["RANK"])
if rank == victim:
    sys.exit(3)
store = connect_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timedelta(seconds=30))
key = JobKeys(os.environ["UNICRON_JOB"]).gen(0).faults
deadline = time.monotonic() + 30
while not (faults := [r for r in read_records(store, key) if r["rank"] == victim]):
    if time.monotonic() > deadline:
        sys.exit(f"rank {rank}: no fault of rank {victim} recorded under {key}")
    time.sleep(0.05)
time.sleep(1.0)  # still alive well after the death was handled
print(f"rank {rank} alive in mode {os.environ.get('UNICRON_MODE')}: store has {faults[0]['kind']} of rank "
      f"{victim} with exit code {faults[0]['exit_code']}", flush=True)
