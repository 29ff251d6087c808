"""Process groups of a generation: NCCL communicators can be aborted, gloo ones wait with timeouts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from megatron_unicron.megatron import groups


def test_abort_communicators_touches_only_nccl(tmp_path: Path) -> None:
    assert groups.abort_communicators() is False  # no world yet
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=10))
    try:
        assert groups.abort_communicators() is False  # gloo: nothing aborted, the group still works
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()
