"""Shared by the snapshot tests: synthetic shard lists without megatron."""

from __future__ import annotations

import torch

from megatron_unicron.megatron.state import ShardMeta


def synthetic_shards(seed: int = 0) -> tuple[list[ShardMeta], list[torch.Tensor]]:
    """A few shards of different shapes and dtypes, like one rank's state."""
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(4, 6, generator=g),
        torch.randn(1, 64, generator=g),
        torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
        torch.arange(10, dtype=torch.int64) + seed,
        torch.randn(129, generator=g),
    ]
    metas = [
        ShardMeta("w", ((0, 4), (6, 12)), (4, 12), torch.float32),
        ShardMeta("layers.norm", ((2, 3), (0, 64)), (4, 64), torch.float32),
        ShardMeta("bf", ((0, 3), (0, 5), (0, 7)), (3, 5, 7), torch.bfloat16),
        ShardMeta("ids", ((10, 20),), (20,), torch.int64),
        ShardMeta("odd", ((0, 129),), (129,), torch.float32),
    ]
    return metas, tensors
