"""Layout rules: TP merge/split (SwiGLU, vocabulary), names, layout and vocabulary checks, DistOpt buffers."""

from __future__ import annotations

import argparse

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_unicron.ckpt import tp_rules
from megatron_unicron.ckpt.distopt_layout import BufferParam, buffer_layout
from megatron_unicron.ckpt.errors import CheckpointError
from megatron_unicron.ckpt.layout_rules import (
    Layout,
    ModelSpec,
    Split,
    canonical_to_local,
    local_to_canonical,
    split_of,
)


def _spec(**kw: object) -> ModelSpec:
    base: dict[str, object] = dict(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=256,
        swiglu=True,
        tied=True,
        position_embedding_type="rope",
        padded_vocab_size=128,
        make_vocab_size_divisible_by=32,
        true_vocab_size=100,
    )
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(split=st.sampled_from(list(Split)), tp_a=st.sampled_from([1, 2, 4]), tp_b=st.sampled_from([1, 2, 4]))
def test_split_merge_roundtrip_across_tp(split: Split, tp_a: int, tp_b: int) -> None:
    full = torch.randn(16, 8)
    shards = tp_rules.split_full(split, full, tp_a, "x")
    assert len(shards) == tp_a
    assert torch.equal(tp_rules.merge(split, shards, "x"), full)
    assert torch.equal(tp_rules.merge(split, tp_rules.split_full(split, full, tp_b, "x"), "x"), full)
    assert tuple(shards[0].shape) == tp_rules.shard_shape(split, tuple(full.shape), tp_a)


def test_swiglu_shards_hold_gate_and_up() -> None:
    gate, up = torch.arange(8.0).view(8, 1), 100 + torch.arange(8.0).view(8, 1)
    shards = tp_rules.split_full(Split.SWIGLU, torch.cat([gate, up]), 2, "fc1")
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))  # [gate_t; up_t], not a plain chunk
    assert not torch.equal(shards[1], torch.cat([gate, up]).chunk(2)[1])


def test_replicas_must_agree_and_rows_resize() -> None:
    with pytest.raises(CheckpointError, match="replicated"):
        tp_rules.merge(Split.REPLICATED, [torch.zeros(3), torch.ones(3)], "ln")
    t = torch.randn(5, 2)
    assert torch.equal(tp_rules.resize_rows(t, 3), t[:3])
    grown = tp_rules.resize_rows(t, 8)
    assert torch.equal(grown[:5], t) and not grown[5:].any()


def test_names_local_and_te() -> None:
    assert local_to_canonical("decoder.layers.1.input_layernorm.weight", 2) == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        3,
    )
    assert (
        local_to_canonical("decoder.layers.0.pre_mlp_layernorm.bias", 0)[0]
        == "decoder.layers.mlp.linear_fc1.layer_norm_bias"
    )
    assert local_to_canonical("embedding.word_embeddings.weight", 2) == (
        "embedding.word_embeddings.weight",
        None,
    )
    key = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    assert canonical_to_local(key, 3, 2, "local") == "decoder.layers.1.input_layernorm.weight"
    assert (
        canonical_to_local(key, 3, 2, "te") == "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"
    )
    assert split_of("decoder.layers.mlp.linear_fc1.weight", swiglu=True) is Split.SWIGLU
    assert split_of("decoder.layers.mlp.linear_fc1.weight", swiglu=False) is Split.DIM0
    with pytest.raises(CheckpointError, match="only dense GPT"):
        split_of("decoder.layers.mlp.experts.linear_fc1.weight0", swiglu=False)


def test_layout_checks() -> None:
    spec = _spec()
    Layout(2, 4).check(spec)
    with pytest.raises(CheckpointError, match="TP=4 does not divide num_query_groups=2"):
        Layout(4, 1).check(spec)
    with pytest.raises(CheckpointError, match="PP=3 does not divide num_layers=4"):
        Layout(1, 3).check(spec)
    with pytest.raises(CheckpointError):
        Layout(0, 1)
    assert Layout(2, 2).rank_dir(1, 1) == "mp_rank_01_001" and Layout(2, 1).rank_dir(1, 0) == "mp_rank_01"


def test_padded_vocab() -> None:
    assert _spec(make_vocab_size_divisible_by=128).padded_vocab(2) == 256  # ceil(100 / 256) * 256
    assert _spec().padded_vocab(4) == 128
    unknown = _spec(true_vocab_size=None)
    assert unknown.padded_vocab(4) == 128  # every vocab in (96, 128] pads to 128 with multiples of 128
    with pytest.raises(CheckpointError, match="--true-vocab-size"):
        _spec(true_vocab_size=None, padded_vocab_size=128, make_vocab_size_divisible_by=128).padded_vocab(2)


def test_spec_from_args_refuses_non_gpt() -> None:
    args = argparse.Namespace(num_layers=4, hidden_size=64, num_attention_heads=4, padded_vocab_size=128)
    assert ModelSpec.from_args(args).num_query_groups == 4
    for bad, msg in (
        (dict(num_experts=8), "MoE"),
        (dict(virtual_pipeline_model_parallel_size=2), "virtual"),
        (dict(padded_vocab_size=None), "padded_vocab_size"),
    ):
        with pytest.raises(CheckpointError, match=msg):
            ModelSpec.from_args(argparse.Namespace(**{**vars(args), **bad}))


def test_distopt_buffer_layout() -> None:
    # reversed order, starts padded to 64: b -> [0, 100), a -> [128, 138)
    layout = buffer_layout([BufferParam("a", 10), BufferParam("b", 100)], None)
    assert layout.ranges == {"b": (0, 100), "a": (128, 138)} and layout.numel_unpadded == 138
    # a shared embedding gets a bucket of its own; the bucket padding (to 128) is not in the world tensor
    layout = buffer_layout([BufferParam("emb", 50, True), BufferParam("w", 70)], None)
    assert layout.ranges == {"w": (0, 70), "emb": (128, 178)} and layout.numel_unpadded == 178
    # buckets close at bucket_size; the next bucket starts after padding that is dropped from the world
    layout = buffer_layout([BufferParam("x", 30), BufferParam("y", 200), BufferParam("z", 100)], 150)
    assert layout.ranges == {"z": (0, 100), "y": (128, 328), "x": (328, 358)}
