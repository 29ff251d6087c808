"""Where each parameter sits in a legacy ``distrib_optim.pt`` (the DistributedOptimizer's flat buffers).

Megatron-LM's legacy DistributedOptimizer checkpoint (``save_parameter_state`` →
``get_parameter_state_dp_zero``, the "dp_zero_gather_scatter" layout) is, per (TP, PP) rank::

    {"buckets_coalesced": True,
     gbuf_idx: {(param_dtype, grad_dtype): {"param": fp32[N], "exp_avg": fp32[N], "exp_avg_sq": fp32[N],
                                            "numel_unpadded": N}}}

Each world tensor is the stage's grad buffer with every bucket's end padding removed. The buffer
(``_ParamAndGradBuffer`` of megatron-core 0.16.1) holds the stage's parameters in *reverse*
``named_parameters()`` order, each starting at a multiple of 64 elements; a bucket closes once it reaches
``bucket_size`` elements, and a shared embedding (tied word embeddings / output layer with PP > 1) gets a
bucket of its own. Bucket ends are padded to a multiple of ``lcm(DP, 128)``, which is a multiple of 64, so
offsets *within* a bucket, and hence the world tensors, do not depend on DP.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_unicron.ckpt.errors import CheckpointError


@dataclass(frozen=True)
class BufferParam:
    """One parameter of a stage's grad buffer."""

    name: str
    numel: int
    shared_embedding: bool = False


@dataclass(frozen=True)
class BufferLayout:
    """Each parameter's ``[start, end)`` in the world tensors, and their total length."""

    ranges: dict[str, tuple[int, int]]
    numel_unpadded: int


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def buffer_layout(params: list[BufferParam], bucket_size: int | None) -> BufferLayout:
    """Lay out ``params`` (given in ``named_parameters()`` order) as megatron-core's DistOpt buffer does."""
    ranges: dict[str, tuple[int, int]] = {}
    world = 0  # offset in the world tensors (bucket padding removed)
    bucket_start = 0  # buffer offset of the current bucket (bucket starts are 64-aligned)
    in_bucket = 0  # params in the current bucket
    param_start = 0
    param_end = 0

    def close(end: int) -> int:
        nonlocal world, bucket_start, in_bucket
        world += end - bucket_start
        bucket_start = _pad(end, 128)  # any lcm(DP, 128) keeps in-bucket offsets; only deltas matter
        in_bucket = 0
        return bucket_start

    for p in reversed(params):
        param_start = _pad(param_start, 64)
        if p.shared_embedding and in_bucket:
            param_start = close(param_start)
        param_end = param_start + p.numel
        ranges[p.name] = (world + param_start - bucket_start, world + param_end - bucket_start)
        in_bucket += 1
        if (bucket_size is not None and param_end - bucket_start >= bucket_size) or p.shared_embedding:
            param_start = close(param_end)
        else:
            param_start = param_end
    if in_bucket:
        close(param_end)
    return BufferLayout(ranges, world)


def check_world_numel(layout: BufferLayout, numel: int, where: str) -> None:
    """Refuse a ``distrib_optim.pt`` whose buffer length does not match the model (bucket size, params)."""
    if layout.numel_unpadded != numel:
        raise CheckpointError(
            f"{where}: distributed-optimizer buffer holds {numel} elements but the stage's parameters "
            "lay out to "
            f"{layout.numel_unpadded} (different bucket size or parameters; unsupported DistOpt layout)"
        )
