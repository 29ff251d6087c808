"""Model shapes, memory and layout validity: published counts, rejections for the right reason."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_unicron.plan.errors import PlanInputError
from megatron_unicron.plan.layouts import Layout, Reason, check_layout, enumerate_layouts, explain_layout
from megatron_unicron.plan.memory import MemoryOptions, memory_per_gpu
from megatron_unicron.plan.models import PRESETS, ModelShape, model_from_config

GB = 2**30


@pytest.mark.parametrize(("name", "billions"), [("gpt3-1.3b", 1.3), ("gpt3-7b", 6.7), ("gpt3-13b", 13.0)])
def test_parameter_counts_match_gpt3(name, billions):
    assert PRESETS[name].num_parameters() / 1e9 == pytest.approx(billions, rel=0.03)


def test_flops_follow_narayanan_formula_without_gqa():
    m = PRESETS["gpt3-7b"]
    b, s, nl, h, v = 1, m.seq_length, m.num_layers, m.hidden_size, m.padded_vocab_size()
    expected = 72 * b * s * nl * h * h * (1 + s / (6 * h) + v / (12 * nl * h))
    assert m.flops_per_sample() == pytest.approx(expected, rel=1e-12)


def test_gqa_and_swiglu_reduce_and_raise_flops():
    base = dict(num_layers=8, hidden_size=1024, num_attention_heads=16, vocab_size=32000, seq_length=1024)
    plain = ModelShape(**base)
    gqa = ModelShape(**base, num_query_groups=4)
    glu = ModelShape(**base, gated_linear_unit=True)
    assert gqa.flops_per_sample() < plain.flops_per_sample() < glu.flops_per_sample()
    assert gqa.layer_parameters() < plain.layer_parameters()


def test_model_errors_name_the_field():
    with pytest.raises(PlanInputError, match=r"jobs\[0\].model.hidden_sise: unknown key"):
        model_from_config({"hidden_sise": 8}, "jobs[0].model")
    with pytest.raises(PlanInputError, match="num_query_groups"):
        ModelShape(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=3,
            vocab_size=8,
            seq_length=8,
        )
    with pytest.raises(PlanInputError, match="unknown preset"):
        model_from_config("gpt5")


def test_layout_validates_itself():
    with pytest.raises(PlanInputError, match="layout.tp"):
        Layout(0, 1, 1)
    with pytest.raises(PlanInputError, match="layout.dp"):
        Layout(1, 1, True)  # type: ignore[arg-type]
    assert Layout(2, 2, 2, 4).num_gpus == 8
    assert Layout(1, 1, 2, 4).num_micro_batches(16) == 2
    with pytest.raises(PlanInputError, match="does not divide"):
        Layout(1, 1, 3, 1).num_micro_batches(16)
    assert Layout.from_dict(Layout(2, 4, 1, 2).to_dict()) == Layout(2, 4, 1, 2)


def _reasons(model, layout, **kw):
    kw.setdefault("global_batch_size", 16)
    kw.setdefault("gpus_per_node", 8)
    kw.setdefault("device_memory_bytes", 80e9)
    return {r.reason for r in explain_layout(model, layout, **kw)}


def test_rejected_for_the_right_reason():
    tiny = PRESETS["tiny"]  # 4 layers, 4 heads
    assert _reasons(tiny, Layout(1, 1, 2, 2)) == set()
    assert _reasons(tiny, Layout(8, 1, 1, 1)) == {Reason.TP_HEADS, Reason.TP_QUERY_GROUPS}
    assert _reasons(tiny, Layout(1, 3, 1, 1)) == {Reason.PP_LAYERS}
    assert _reasons(tiny, Layout(1, 1, 3, 1)) == {Reason.BATCH}
    assert _reasons(tiny, Layout(4, 1, 1, 1), gpus_per_node=2) == {Reason.TP_NODE}
    assert _reasons(tiny, Layout(2, 1, 1, 1), max_tp=1) == {Reason.TP_LIMIT}
    assert _reasons(tiny, Layout(1, 1, 2, 1), num_gpus=4) == {Reason.GPU_COUNT}
    gqa = ModelShape(
        num_layers=4, hidden_size=64, num_attention_heads=8, num_query_groups=2, vocab_size=64, seq_length=16
    )
    assert _reasons(gqa, Layout(4, 1, 1, 1)) == {Reason.TP_QUERY_GROUPS}
    big = PRESETS["gpt3-70b"]
    assert _reasons(big, Layout(8, 1, 1, 1), global_batch_size=1536) == {Reason.MEMORY}
    with pytest.raises(PlanInputError, match="does not divide num_layers"):
        check_layout(
            tiny, Layout(1, 3, 1, 1), global_batch_size=16, gpus_per_node=8, device_memory_bytes=80e9
        )


def test_distributed_optimizer_makes_a_layout_fit():
    m = PRESETS["gpt3-13b"]  # tp2: 6.4B params per GPU, 18 B each does not fit 80 GB, 6 + 12/64 B does
    layout = Layout(2, 1, 64, 1)
    kw = dict(global_batch_size=1024, gpus_per_node=8, device_memory_bytes=80e9)
    assert {r.reason for r in explain_layout(m, layout, **kw)} == {Reason.MEMORY}
    assert not explain_layout(m, layout, use_distributed_optimizer=True, **kw)
    plain = memory_per_gpu(m, 2, 1, 64, 1, 16, MemoryOptions()).model_state
    dist = memory_per_gpu(m, 2, 1, 64, 1, 16, MemoryOptions(use_distributed_optimizer=True)).model_state
    assert plain / dist == pytest.approx(18 / (6 + 12 / 64), rel=1e-9)


def test_activation_memory_follows_korthikanti():
    m = ModelShape(
        num_layers=1,
        hidden_size=1024,
        num_attention_heads=16,
        vocab_size=128,
        seq_length=2048,
        make_vocab_size_divisible_by=1,
    )
    s, b, h, a = 2048, 1, 1024, 16
    logits = 4 * s * b * 128
    none = memory_per_gpu(
        m, 1, 1, 1, 1, 1, MemoryOptions(recompute="none", sequence_parallel=False)
    ).activations
    assert none - logits == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    sel_sp = memory_per_gpu(m, 2, 1, 1, 1, 1, MemoryOptions(recompute="selective")).activations
    assert sel_sp - logits / 2 == pytest.approx(s * b * h * 34 / 2)
    full = memory_per_gpu(m, 1, 1, 1, 1, 1, MemoryOptions(recompute="full")).activations
    assert full - logits == pytest.approx(2 * s * b * h)


@settings(max_examples=60, deadline=None)
@given(
    gpus=st.integers(1, 32),
    gb=st.sampled_from([8, 12, 16, 64, 96]),
    gpn=st.sampled_from([1, 2, 4, 8]),
    name=st.sampled_from(["tiny", "gpt3-1.3b", "gpt3-13b"]),
)
def test_every_enumerated_layout_is_valid(gpus, gb, gpn, name):
    model = PRESETS[name]
    layouts = enumerate_layouts(model, gb, gpus, gpn, 80e9)
    assert len(set(layouts)) == len(layouts)
    for layout in layouts:
        assert layout.num_gpus == gpus
        assert not explain_layout(
            model, layout, global_batch_size=gb, gpus_per_node=gpn, device_memory_bytes=80e9
        )
    # and nothing valid is missed (micro-batch sizes up to 16)
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4):
            if gpus % (tp * pp) == 0:
                cand = Layout(tp, pp, gpus // (tp * pp), 1)
                ok = not explain_layout(
                    model, cand, global_batch_size=gb, gpus_per_node=gpn, device_memory_bytes=80e9
                )
                assert ok == (cand in layouts)
