"""The layout a re-planned job gets: the fastest that fits the job's devices and keeps its micro-batch."""

from __future__ import annotations

from megatron_unicron.events import LayoutSpec
from megatron_unicron.plan.memory import MemoryOptions, memory_per_gpu
from megatron_unicron.plan.models import ModelShape
from megatron_unicron.replan import JobShape, choose_layout

TINY = ModelShape(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                  ffn_hidden_size=256, vocab_size=128, seq_length=32, make_vocab_size_divisible_by=32)
PP2DP2 = LayoutSpec(tp=1, pp=2, dp=2)


def shape(device_memory_bytes: float | None = None) -> JobShape:
    return JobShape(model=TINY, global_batch_size=8, micro_batch_size=2, gpus_per_node=2,
                    device_memory_bytes=device_memory_bytes)


def test_devices_too_small_for_the_whole_model_keep_the_pipeline_stages() -> None:
    options = MemoryOptions(precision="fp32", sequence_parallel=False)
    whole = memory_per_gpu(TINY, 1, 1, 2, 2, 2, options).total
    half = memory_per_gpu(TINY, 1, 2, 1, 2, 4, options).total
    between = (whole + half) / 2 / options.usable_fraction
    assert choose_layout(shape(), 2, PP2DP2) == LayoutSpec(tp=1, pp=1, dp=2)  # roomy: pure DP is fastest
    assert choose_layout(shape(between), 2, PP2DP2) == LayoutSpec(tp=1, pp=2, dp=1)
    assert choose_layout(shape(between), 4, LayoutSpec(tp=1, pp=2, dp=1), prefer_more_gpus=True) == PP2DP2


def test_devices_too_small_for_any_layout_leave_no_plan() -> None:
    assert choose_layout(shape(1024.0), 2, PP2DP2) is None


def test_the_device_memory_comes_from_the_posted_job_config() -> None:
    config = {"model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 4,
                        "ffn_hidden_size": 256, "vocab_size": 128, "seq_length": 32},
              "global_batch_size": 8, "micro_batch_size": 2, "gpus_per_node": 2, "device_memory_bytes": 4e6}
    assert JobShape.from_config(config).device_memory_bytes == 4e6
    assert JobShape.from_config({**config, "device_memory_bytes": None}).device_memory_bytes is None
