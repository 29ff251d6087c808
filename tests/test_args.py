"""Tests of the Megatron-LM command line and YAML job config (megatron_unicron.megatron.args)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_unicron.config import UnicronConfig
from megatron_unicron.errors import ConfigError
from megatron_unicron.megatron.args import (
    MegatronArgs,
    build_parser,
    data_parallel_size,
    megatron_namespace,
    parse_args,
    resolve_world,
)
from megatron_unicron.megatron.args_checks import split_blend

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples/gpt/configs/tiny_gpt.yaml"
TINY_UNICRON = REPO / "examples/gpt/configs/tiny_gpt_unicron.yaml"

# The smallest valid command line: the flags Megatron-LM requires for GPT pretraining.
MINIMAL = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--max-position-embeddings", "32", "--tokenizer-type", "NullTokenizer", "--vocab-size", "127",
    "--micro-batch-size", "2", "--train-iters", "30", "--lr", "0.003", "--mock-data",
]
SET_BY_MINIMAL = {"num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
                  "tokenizer_type", "vocab_size", "micro_batch_size", "train_iters", "lr", "mock_data"}

# Megatron-LM's parser defaults for every flag supported here, at tag core_v0.16.1 (commit 55ac708, the
# Megatron-LM matching the pinned megatron-core 0.16.1). Sources, all under megatron/:
#  T  core/transformer/transformer_config.py (TransformerConfig fields, turned into flags by
#     training/argument_utils.py ArgumentGroupFactory; argparse_meta overrides the dataclass default)
#  P  core/model_parallel_config.py (ModelParallelConfig, inherited by TransformerConfig)
#  A  training/arguments.py: _add_network_size_args, _add_regularization_args, _add_learning_rate_args,
#     _add_checkpointing_args, _add_distributed_args, _add_data_args, _add_tokenizer_args, --yaml-cfg
#  C  training/training_config.py (TrainingConfig, SchedulerConfig, CheckpointConfig, LoggerConfig,
#     ValidationConfig) and training/common_config.py (RNGConfig)
MEGATRON_LM_DEFAULTS: dict[str, object] = {
    "num_layers": None,                         # T argparse_meta default None; required by validate_args
    "hidden_size": None,                        # T idem
    "ffn_hidden_size": None,                    # T; validate_args: 4*h, or int(4*h*2/3/64)*64 with swiglu
    "num_attention_heads": None,                # T argparse_meta default None; required
    "group_query_attention": False,             # A store_true
    "num_query_groups": 1,                      # T argparse_meta default 1; ignored without GQA
    "kv_channels": None,                        # T; validate_args: hidden // heads
    "seq_length": None,                         # A _add_data_args
    "max_position_embeddings": None,            # A; required by validate_args
    "position_embedding_type": "learned_absolute",  # A
    "normalization": "LayerNorm",               # T
    "swiglu": False,                            # A
    "add_bias_linear": True,                    # T, flag --disable-bias-linear
    "untie_embeddings_and_output_weights": False,  # A
    "hidden_dropout": 0.1,                      # T
    "attention_dropout": 0.1,                   # T
    "init_method_std": 0.02,                    # T
    "transformer_impl": "transformer_engine",   # T
    "tokenizer_type": None,                     # A _add_tokenizer_args
    "vocab_file": None,                         # A
    "merge_file": None,                         # A
    "vocab_size": None,                         # A
    "make_vocab_size_divisible_by": 128,        # A
    "tensor_model_parallel_size": 1,            # P
    "pipeline_model_parallel_size": 1,          # P
    "use_distributed_optimizer": False,         # A _add_distributed_args
    "overlap_grad_reduce": False,               # A
    "use_tp_pp_dp_mapping": False,              # A
    "bf16": False,                              # P
    "fp16": False,                              # P
    "distributed_timeout_minutes": 10,          # A
    "micro_batch_size": None,                   # C TrainingConfig; asserted not None
    "global_batch_size": None,                  # C; validate_args: micro * data-parallel size
    "train_iters": None,                        # C
    "exit_interval": None,                      # C
    "seed": 1234,                               # C RNGConfig
    "lr": None,                                 # A _add_learning_rate_args
    "min_lr": 0.0,                              # A
    "lr_decay_style": "linear",                 # C SchedulerConfig
    "lr_decay_iters": None,                     # C; training.py get_optimizer_param_scheduler: train_iters
    "lr_warmup_iters": 0,                       # C
    "lr_warmup_fraction": None,                 # C
    "weight_decay": 0.01,                       # A _add_regularization_args
    "clip_grad": 1.0,                           # A
    "adam_beta1": 0.9,                          # A
    "adam_beta2": 0.999,                        # A
    "adam_eps": 1e-08,                          # A
    "data_path": None,                          # A
    "split": None,                              # A; validate_args: '969, 30, 1' when --data-path is set
    "mock_data": False,                         # A
    "data_cache_path": None,                    # A
    "save": None,                               # C CheckpointConfig
    "load": None,                               # C
    "save_interval": None,                      # C
    "no_save_optim": None,                      # A store_true, default None
    "no_load_optim": None,                      # A
    "no_load_rng": None,                        # A
    "finetune": False,                          # C
    "use_checkpoint_args": False,               # C
    "ckpt_format": "torch_dist",                # C
    "log_interval": 100,                        # C LoggerConfig
    "eval_interval": None,                      # C ValidationConfig (1000 before the 2025-12 migration)
    "eval_iters": 100,                          # C
    "yaml_cfg": None,                           # A
}
REQUIRED_HERE = {"num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
                 "tokenizer_type", "micro_batch_size", "train_iters", "lr"}
DERIVED_HERE = {"ffn_hidden_size", "kv_channels", "num_query_groups", "lr_decay_iters"}
DELIBERATE_DIFFERENCES = {"transformer_impl": None}  # None: transformer_engine if importable with CUDA


def megatron_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(MegatronArgs)} - {"unicron", "provenance"}


def without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def error_of(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_supported_flag_has_a_megatron_default_row() -> None:
    assert set(MEGATRON_LM_DEFAULTS) == megatron_field_names()


def test_parser_defaults_equal_megatron_lm() -> None:
    parsed = parse_args(MINIMAL)
    fields = {f.name: f for f in dataclasses.fields(MegatronArgs)}
    for name, megatron_default in MEGATRON_LM_DEFAULTS.items():
        if name in REQUIRED_HERE or name in DERIVED_HERE:
            assert fields[name].default is dataclasses.MISSING, name
            continue
        expected = DELIBERATE_DIFFERENCES.get(name, megatron_default)
        assert fields[name].default == expected, name
        if name not in SET_BY_MINIMAL:
            assert getattr(parsed, name) == expected, name


@pytest.mark.parametrize("name", sorted(REQUIRED_HERE))
def test_required_flags(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    message = error_of(without(MINIMAL, flag))
    assert message.startswith(f"{flag} is required: add {flag} ")


def test_derived_defaults_follow_megatron_lm() -> None:
    args = parse_args(MINIMAL)
    assert (args.ffn_hidden_size, args.kv_channels, args.num_query_groups) == (256, 16, 4)
    assert args.lr_decay_iters == args.train_iters == 30
    assert args.split is None
    assert parse_args([*MINIMAL, "--swiglu"]).ffn_hidden_size == 128  # int(4*64*2/3 / 64) * 64
    wider = parse_args([*without(MINIMAL, "--hidden-size"), "--hidden-size", "96", "--swiglu"])
    assert wider.ffn_hidden_size == 256
    assert parse_args([*MINIMAL, "--group-query-attention"]).num_query_groups == 1
    gqa = parse_args([*MINIMAL, "--group-query-attention", "--num-query-groups", "2"])
    assert gqa.num_query_groups == 2
    explicit = parse_args([*MINIMAL, "--ffn-hidden-size", "100", "--kv-channels", "8",
                           "--lr-decay-iters", "20"])
    assert (explicit.ffn_hidden_size, explicit.kv_channels, explicit.lr_decay_iters) == (100, 8, 20)


def test_flag_values_and_types() -> None:
    args = parse_args([*MINIMAL, "--disable-bias-linear", "--bf16", "--no-load-optim", "--lr-decay-style",
                       "cosine", "--lr-warmup-fraction", "0.1", "--position-embedding-type", "rope",
                       "--normalization", "RMSNorm", "--transformer-impl", "local", "--ckpt-format", "torch",
                       "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"])
    assert args.add_bias_linear is False and args.bf16 is True and args.no_load_optim is True
    assert args.no_save_optim is None
    assert (args.lr_decay_style, args.lr_warmup_fraction) == ("cosine", 0.1)
    assert args.position_embedding_type == "rope"
    assert (args.normalization, args.transformer_impl, args.ckpt_format) == ("RMSNorm", "local", "torch")
    assert isinstance(args.lr, float) and isinstance(args.num_layers, int)


def test_data_path_blend_and_legacy_split(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.bin").write_bytes(b"")
        (tmp_path / f"{name}.idx").write_bytes(b"")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = [x for x in MINIMAL if x != "--mock-data"]
    args = parse_args([*base, "--data-path", "0.3", a, "0.7", b])
    assert args.data_path == ["0.3", a, "0.7", b]
    assert args.split == "969, 30, 1"
    assert split_blend(args.data_path, "--data-path") == ([a, b], [0.3, 0.7])
    assert split_blend([a, b], "--data-path") == ([a, b], None)
    assert parse_args([*base, "--data-path", a, "--split", "98,2,0"]).split == "98,2,0"


def test_yaml_equals_the_same_flags() -> None:
    flags = [
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--init-method-std", "0.02", "--transformer-impl", "local",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--seq-length", "32",
        "--max-position-embeddings", "32", "--position-embedding-type", "learned_absolute",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--make-vocab-size-divisible-by", "32",
        "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "30",
        "--seed", "1234", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", "3", "--weight-decay", "0.01", "--clip-grad", "1.0", "--log-interval", "1",
    ]
    from_yaml = parse_args(["--yaml-cfg", str(TINY)])
    from_flags = parse_args(flags)
    assert dataclasses.replace(from_yaml, yaml_cfg=None) == from_flags
    assert from_yaml.yaml_cfg == str(TINY)
    unicron = parse_args(["--yaml-cfg", str(TINY_UNICRON)])
    assert dataclasses.replace(unicron, yaml_cfg=None) == parse_args([*flags, "--unicron"])
    assert unicron.unicron == UnicronConfig(enabled=True)
    assert resolve_world(from_yaml, 4).global_batch_size == 8


def test_megatron_sections_equal_flat_keys(tmp_path: Path) -> None:
    sectioned = tmp_path / "sectioned.yaml"
    sectioned.write_text(TINY.read_text() + "\n")
    flat = tmp_path / "flat.yaml"
    lines = [line[2:] if line.startswith("  ") else line for line in TINY.read_text().splitlines()
             if line.strip() not in ("language_model:", "model_parallel:")]
    flat.write_text("\n".join(lines) + "\n")
    a, b = parse_args(["--yaml-cfg", str(sectioned)]), parse_args(["--yaml-cfg", str(flat)])
    assert dataclasses.replace(a, yaml_cfg=None) == dataclasses.replace(b, yaml_cfg=None)


def test_activation_func_maps_to_swiglu(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    text = TINY.read_text().replace("language_model:\n", "language_model:\n  activation_func: swiglu\n")
    job.write_text(text)
    assert parse_args(["--yaml-cfg", str(job)]).swiglu is True


def test_precedence_defaults_then_yaml_then_flags() -> None:
    args = parse_args(["--yaml-cfg", str(TINY_UNICRON), "--num-layers", "2", "--lr", "1e-3",
                       "--unicron-detection-slow-factor", "5", "--unicron-metrics-log", "m.jsonl"])
    assert args.num_layers == 2 and args.lr == 1e-3                 # flag beats YAML
    assert args.hidden_size == 64 and args.lr_decay_style == "cosine"  # YAML beats default
    assert args.adam_beta2 == 0.999                                  # default where neither says
    assert args.unicron.enabled and args.unicron.detection.slow_factor == 5.0
    assert args.unicron.metrics_log == "m.jsonl"
    assert args.spelled("num_layers") == "--num-layers 2"
    assert args.spelled("hidden_size") == "language_model.hidden_size: 64 (tiny_gpt_unicron.yaml)"


def test_provenance_takes_no_part_in_equality() -> None:
    a = parse_args(MINIMAL)
    b = dataclasses.replace(a, provenance={"num_layers": "somewhere else"})
    assert a == b


LAYOUT_ERRORS = [
    (["--tensor-model-parallel-size", "3"],
     "--tensor-model-parallel-size 3 does not divide --num-attention-heads 4; use a tensor-parallel size "
     "that divides 4: 1, 2, 4"),
    (["--pipeline-model-parallel-size", "3"],
     "--pipeline-model-parallel-size 3 does not divide --num-layers 4; use a pipeline-parallel size that "
     "divides 4: 1, 2, 4"),
    (["--global-batch-size", "7"], "--global-batch-size 7 is not divisible by --micro-batch-size 2; use a "
     "multiple of 2"),
    (["--hiden-size", "64"], "unrecognized flag --hiden-size (did you mean --hidden-size?)"),
    (["--unicron-detection-slow-facter", "4"],
     "unrecognized flag --unicron-detection-slow-facter (did you mean --unicron-detection-slow-factor?)"),
    (["--num-layers", "four"], "--num-layers four: expected a whole number"),
    (["--lr", "fast"], "--lr fast: expected a number"),
    (["--lr-decay-style", "cosin"], "--lr-decay-style cosin: not a supported value; use one of constant, "
     "linear, cosine, inverse-square-root (did you mean cosine?)"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "--tokenizer-type SentencePieceTokenizer: not a "
     "supported value; use one of GPT2BPETokenizer, NullTokenizer"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 cannot be combined; keep one of them"),
    (["--seq-length", "64"], "--seq-length 64 is longer than --max-position-embeddings 32; raise"),
    (["--num-query-groups", "2"], "--num-query-groups 2 needs --group-query-attention; add it"),
    (["--group-query-attention", "--num-query-groups", "3"],
     "--num-query-groups 3 does not divide --num-attention-heads 4; use a number of query groups"),
    (["--group-query-attention", "--num-query-groups", "1", "--tensor-model-parallel-size", "2"],
     "--tensor-model-parallel-size 2 does not divide --num-query-groups 1"),
    (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr 0.003"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"],
     "--lr-warmup-fraction 0.1 and --lr-warmup-iters 2 both set the warmup; keep one of them"),
    (["--lr-warmup-iters", "30"], "--lr-warmup-iters 30 must be shorter than --lr-decay-iters 30 (= "),
    (["--hidden-dropout", "1.5"], "--hidden-dropout 1.5: must be at least 0 and below 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size 0: must be positive"),
    (["--save-interval", "10"], "--save-interval 10 has no effect without --save DIR; add --save DIR"),
    (["--save", "ckpt"], "--save ckpt needs --save-interval N"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer needs --vocab-file and "
     "--merge-file"),
    (["--unicron-detection-slow-factor", "0.5"],
     "--unicron-detection-slow-factor 0.5: must be greater than 1"),
    (["--unicron-snapshot-interval", "-1"],
     "--unicron-snapshot-interval -1: must be 0 (never) or a positive"),
    (["--unicron-detection-lease-ttl-s", "0.5"], "--unicron-detection-lease-ttl-s 0.5: must be longer than "
     "lease_interval_s"),
    (["extra"], "unexpected argument 'extra'"),
    (["--num-layers"], "argument --num-layers: expected one argument"),
]


@pytest.mark.parametrize(("extra", "expected"), LAYOUT_ERRORS, ids=[" ".join(e) for e, _ in LAYOUT_ERRORS])
def test_bad_flags_give_one_line_naming_flag_and_fix(extra: list[str], expected: str) -> None:
    argv = list(MINIMAL)
    for flag in extra:
        if flag in argv and flag.startswith("--") and flag not in ("--mock-data",):
            argv = without(argv, flag)
    assert expected in error_of([*argv, *extra])


def test_data_errors(tmp_path: Path) -> None:
    base = [x for x in MINIMAL if x != "--mock-data"]
    assert "no training data: give --data-path PREFIX" in error_of(base)
    prefix = tmp_path / "corpus"
    (tmp_path / "corpus.bin").write_bytes(b"")
    message = error_of([*base, "--data-path", str(prefix)])
    assert message.startswith(f"--data-path {prefix}: {prefix}.idx not found; --data-path takes the prefix P")
    (tmp_path / "corpus.idx").write_bytes(b"")
    assert parse_args([*base, "--data-path", str(prefix)]).data_path == [str(prefix)]
    assert "--mock-data and --data-path" in error_of([*MINIMAL, "--data-path", str(prefix)])
    assert "mixes weighted and unweighted" in error_of([*base, "--data-path", "0.5", str(prefix), "x", "y"])
    assert "give at least one dataset prefix" in error_of([*base, "--data-path"])


def test_tokenizer_files_must_exist(tmp_path: Path) -> None:
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text("{}")
    argv = [*without(MINIMAL, "--tokenizer-type"), "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", str(vocab), "--merge-file", str(merges)]
    assert error_of(argv) == f"--merge-file {merges}: file not found; give the path of an existing file"
    merges.write_text("#version: 0.2\n")
    assert parse_args(argv).tokenizer_type == "GPT2BPETokenizer"


YAML_ERRORS = [
    ("hiden_size: 64\n", "unknown key 'hiden_size' in {path} (did you mean 'hidden_size'?); remove it"),
    ("language_model:\n  num_layer: 4\n", "unknown key 'language_model.num_layer' in {path} (did you mean "
     "'num_layers'?)"),
    ("language_model:\n  fp32_residual_connection: false\n",
     "unknown key 'language_model.fp32_residual_connection' in {path}"),
    ("model_parallel:\n  seed: 3\n", "model_parallel.seed in {path}: seed is not a model_parallel setting; "
     "move it to the top level"),
    ("num_layers: four\n", "num_layers: four (job.yaml): expected a whole number"),
    ("num_layers: 2\nlanguage_model:\n  num_layers: 4\n",
     "language_model.num_layers: 4 (job.yaml) sets num_layers a second time (also num_layers: 2 (job.yaml))"),
    ("language_model:\n  activation_func: relu\n", "language_model.activation_func: relu (job.yaml): not "
     "supported; use swiglu or gelu"),
    ("lr: [1\n", "--yaml-cfg {path}: invalid YAML at line 2, column 1"),
    ("- 1\n- 2\n", "--yaml-cfg {path}: expected a mapping of keys at the top level, got list"),
    ("save: ${UNICRON_TEST_UNSET_VAR}/ckpt\n", "environment variable UNICRON_TEST_UNSET_VAR is not set"),
    ("unicron:\n  detection:\n    slow_facto: 2\n", "unknown key 'unicron.detection.slow_facto' in {path} "
     "(did you mean 'slow_factor'?)"),
    ("unicron:\n  snapshot_interval: often\n",
     "unicron.snapshot_interval: often (job.yaml): expected a whole"),
    ("unicron:\n  detection:\n    slow_factor: 1\n", "unicron.detection.slow_factor: 1 (job.yaml): must be "
     "greater than 1"),
    ("unicron: true\n", "unicron in {path}: expected a mapping of keys"),
    ("yaml_cfg: other.yaml\n", "unknown key 'yaml_cfg' in {path}"),
]


@pytest.mark.parametrize(("text", "expected"), YAML_ERRORS, ids=[t.split(":")[0] for t, _ in YAML_ERRORS])
def test_bad_yaml_gives_one_line_naming_key_and_file(tmp_path: Path, text: str, expected: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    assert expected.format(path=job) in error_of([*MINIMAL, "--yaml-cfg", str(job)])


def test_yaml_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert error_of(["--yaml-cfg", str(missing)]).startswith(f"--yaml-cfg {missing}: file not found")


def test_yaml_null_means_default_and_env_vars_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNICRON_TEST_DIR", str(tmp_path))
    job = tmp_path / "job.yaml"
    job.write_text("seed: null\nlanguage_model:\n  num_query_groups: null\nsave: ${UNICRON_TEST_DIR}/ckpt\n"
                   "save_interval: 5\nlr: 3e-3\n")
    args = parse_args([*without(MINIMAL, "--lr"), "--yaml-cfg", str(job)])
    assert (args.seed, args.num_query_groups) == (1234, 4)
    assert args.save == f"{tmp_path}/ckpt" and args.lr == 0.003  # YAML 1.1 reads 3e-3 as a string


def test_resolve_world() -> None:
    tiny = parse_args(["--yaml-cfg", str(TINY)])
    assert data_parallel_size(tiny, 4) == 1 and data_parallel_size(tiny, 16) == 4
    assert resolve_world(tiny, 8) == tiny
    auto = parse_args(["--yaml-cfg", str(TINY), "--tensor-model-parallel-size", "1"])
    auto = dataclasses.replace(auto, global_batch_size=None)
    resolved = resolve_world(auto, 4)
    assert resolved.global_batch_size == 2 * 2 and auto.global_batch_size is None
    assert resolved.spelled("global_batch_size").startswith("--global-batch-size 4 (= --micro-batch-size 2")


WORLD_ERRORS = [
    (6, "world size 6 is not a multiple of --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2 "
        "= 4; launch a multiple of 4 processes"),
    (2, "world size 2 is smaller than the 4 ranks"),
    (12, "--global-batch-size 8 is not divisible by --micro-batch-size 2 x data-parallel size 3 = 6 (world "
         "size 12); use a multiple of 6"),
    (32, "world size 32 gives data-parallel size 8, more ranks than --global-batch-size 8 can use: one "
         "iteration needs at least --micro-batch-size 2 x 8 = 16 samples; launch 16 processes"),
]


@pytest.mark.parametrize(("world", "expected"), WORLD_ERRORS)
def test_world_size_errors(world: int, expected: str) -> None:
    args = parse_args([*MINIMAL, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                       "--global-batch-size", "8"])
    with pytest.raises(ConfigError) as info:
        resolve_world(args, world)
    assert expected in str(info.value)


def test_megatron_namespace_has_megatron_names() -> None:
    namespace = megatron_namespace(parse_args(MINIMAL))
    assert set(vars(namespace)) == megatron_field_names()
    assert namespace.num_layers == 4 and namespace.make_vocab_size_divisible_by == 128


# The Megatron-LM flag surface: a flag is added deliberately (with its row in MEGATRON_LM_DEFAULTS).
FROZEN_MEGATRON_FLAGS = frozenset("""
--num-layers --hidden-size --ffn-hidden-size --num-attention-heads --group-query-attention
--num-query-groups --kv-channels --seq-length --max-position-embeddings --position-embedding-type
--normalization --swiglu --disable-bias-linear --untie-embeddings-and-output-weights --hidden-dropout
--attention-dropout --init-method-std --transformer-impl --tokenizer-type --vocab-file --merge-file
--vocab-size --make-vocab-size-divisible-by --tensor-model-parallel-size --pipeline-model-parallel-size
--use-distributed-optimizer --overlap-grad-reduce --use-tp-pp-dp-mapping --bf16 --fp16
--distributed-timeout-minutes
--micro-batch-size --global-batch-size --train-iters --exit-interval --seed --lr --min-lr --lr-decay-style
--lr-decay-iters --lr-warmup-iters --lr-warmup-fraction --weight-decay --clip-grad --adam-beta1
--adam-beta2 --adam-eps --data-path --split --mock-data --data-cache-path --save --load --save-interval
--no-save-optim --no-load-optim --no-load-rng --finetune --use-checkpoint-args --ckpt-format
--log-interval --eval-interval --eval-iters --yaml-cfg
""".split())


def test_flag_surface_is_frozen() -> None:
    flags = {s for a in build_parser()._actions for s in a.option_strings} - {"-h", "--help"}
    assert {f for f in flags if not f.startswith("--unicron")} == FROZEN_MEGATRON_FLAGS


def run_cli_script(*argv: str, world_size: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    if world_size is not None:
        env["WORLD_SIZE"] = str(world_size)
    return subprocess.run([sys.executable, str(REPO / "tests/parse_cli.py"), *argv], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


@pytest.mark.parametrize("argv", [
    ["--yaml-cfg", str(TINY), "--hiden-size", "64"],
    ["--yaml-cfg", str(TINY), "--tensor-model-parallel-size", "3"],
    ["--yaml-cfg", str(REPO / "no/such.yaml")],
])
def test_cli_bad_input_exits_2_with_one_line_and_no_traceback(argv: list[str]) -> None:
    result = run_cli_script(*argv)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("parse_cli.py: error: ")
    assert "Traceback" not in result.stderr


def test_cli_world_size_error_and_success() -> None:
    bad = run_cli_script("--yaml-cfg", str(TINY), world_size=6)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "world size 6" in bad.stderr
    good = run_cli_script("--yaml-cfg", str(TINY), "--train-iters", "5", world_size=4)
    assert good.returncode == 0, good.stderr
    parsed = json.loads(good.stdout)
    assert parsed["train_iters"] == 5 and parsed["global_batch_size"] == 8
    assert parsed["tensor_model_parallel_size"] == 2 and parsed["unicron"]["enabled"] is False
