"""Tests of the unicron config tree, the config-tree mechanism and run_cli."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from megatron_unicron import configtree
from megatron_unicron.config import DetectionConfig, UnicronConfig
from megatron_unicron.errors import ConfigError, FieldError, UnicronError, run_cli
from megatron_unicron.megatron.args import build_parser, parse_args


def build_error(data: object, source: str = "job.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        UnicronConfig.from_dict(data, source=source)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults() -> None:
    config = UnicronConfig()
    assert not config.enabled and config.metrics_log is None and config.incident_log is None
    assert config.inject == () and config.snapshot_interval == 0 and config.persist_interval == 0
    assert config.detection == DetectionConfig()
    assert (config.detection.lease_interval_s, config.detection.lease_ttl_s) == (1.0, 3.0)
    assert (config.detection.slow_factor, config.detection.warmup_floor_s) == (3.0, 2.0)
    assert config.detection.grace_window_s == 0.5


def test_dict_and_yaml_round_trip() -> None:
    config = UnicronConfig(enabled=True, metrics_log="m.jsonl", inject=("kill:1:5", "hang:0:7:backward"),
                           snapshot_interval=5, detection=DetectionConfig(slow_factor=4.0))
    as_dict = config.to_dict()
    assert as_dict["inject"] == ["kill:1:5", "hang:0:7:backward"]
    assert as_dict["detection"]["slow_factor"] == 4.0
    assert UnicronConfig.from_dict(yaml.safe_load(yaml.safe_dump(as_dict))) == config


def test_from_dict_converts_and_treats_null_as_default() -> None:
    config = UnicronConfig.from_dict({
        "enabled": True, "snapshot_interval": 3, "inject": "kill:1:5 hang:2:6", "metrics_log": None,
        "detection": {"slow_factor": 5, "grace_window_s": None},
    })
    assert config.snapshot_interval == 3 and config.inject == ("kill:1:5", "hang:2:6")
    assert config.detection.slow_factor == 5.0 and isinstance(config.detection.slow_factor, float)
    assert config.detection.grace_window_s == 0.5


def test_unknown_keys_are_rejected_with_a_suggestion() -> None:
    assert build_error({"snapshot_intervall": 3}) == (
        "unknown key 'unicron.snapshot_intervall' in job.yaml (did you mean 'snapshot_interval'?); "
        "supported keys under unicron: enabled, metrics_log, transition_log, incident_log, inject, "
        "snapshot_interval, persist_interval, restart_min_replicas, device_memory_gib, detection")
    assert build_error({"detection": {"lease_tl_s": 2}}).startswith(
        "unknown key 'unicron.detection.lease_tl_s' in job.yaml (did you mean 'lease_ttl_s'?)")


@pytest.mark.parametrize(("data", "expected"), [
    ({"enabled": "yes"}, "unicron.enabled: yes (job.yaml): expected true or false"),
    ({"snapshot_interval": 2.5}, "unicron.snapshot_interval: 2.5 (job.yaml): expected a whole number"),
    ({"detection": {"slow_factor": "fast"}},
     "unicron.detection.slow_factor: fast (job.yaml): expected a number"),
    ({"detection": 3}, "unicron.detection in job.yaml: expected a mapping of keys, got int"),
    ({"persist_interval": -2}, "unicron.persist_interval: -2 (job.yaml): must be 0 (never) or a positive"),
    ({"detection": {"lease_ttl_s": 1.0}},
     "unicron.detection.lease_ttl_s: 1.0 (job.yaml): must be longer than lease_interval_s (1.0)"),
    ({"detection": {"warmup_floor_s": 0}},
     "unicron.detection.warmup_floor_s: 0 (job.yaml): must be a positive"),
    ({"detection": {"grace_window_s": -1}}, "unicron.detection.grace_window_s: -1 (job.yaml): must be zero"),
    ({"inject": [" "]}, "unicron.inject: [ ] (job.yaml): give a fault as KIND:RANK:ITER[:PHASE]"),
])
def test_bad_values_name_the_key_and_the_fix(data: dict[str, object], expected: str) -> None:
    assert build_error(data).startswith(expected)


def test_direct_construction_validates() -> None:
    with pytest.raises(FieldError) as info:
        DetectionConfig(slow_factor=1.0)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    assert (info.value.field, info.value.value) == ("slow_factor", 1.0)
    assert str(info.value).startswith("slow_factor=1.0: must be greater than 1")


def test_every_leaf_is_a_flag_and_a_yaml_key() -> None:
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    expected = {"--unicron", "--unicron-metrics-log", "--unicron-incident-log", "--unicron-inject",
                "--unicron-transition-log",
                "--unicron-snapshot-interval", "--unicron-persist-interval", "--unicron-restart-min-replicas",
                "--unicron-device-memory-gib",
                "--unicron-detection-lease-interval-s", "--unicron-detection-lease-ttl-s",
                "--unicron-detection-slow-factor", "--unicron-detection-warmup-floor-s",
                "--unicron-detection-grace-window-s", "--unicron-detection-settle-window-s",
                "--unicron-detection-min-timeout-s",
                "--unicron-detection-pg-timeout-s", "--unicron-detection-escalation-window-s",
                "--unicron-detection-resume-timeout-s"}
    assert {f for f in flags if f.startswith("--unicron")} == expected
    leaves = list(configtree.leaves(UnicronConfig, ("unicron",)))
    assert {leaf.flag for leaf in leaves} == expected
    assert all(leaf.help for leaf in leaves)  # every field is documented
    assert {leaf.key for leaf in leaves} >= {"unicron.enabled", "unicron.detection.slow_factor"}


def test_flags_reach_the_config() -> None:
    minimal = ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2", "--seq-length", "8",
               "--max-position-embeddings", "8", "--tokenizer-type", "NullTokenizer", "--vocab-size", "10",
               "--micro-batch-size", "1", "--train-iters", "2", "--lr", "0.1", "--mock-data"]
    args = parse_args([*minimal, "--unicron", "--unicron-metrics-log", "m.jsonl", "--unicron-incident-log",
                       "i.jsonl", "--unicron-inject", "kill:1:5", "--unicron-inject", "hang:2:6:forward",
                       "--unicron-snapshot-interval", "4", "--unicron-persist-interval", "8",
                       "--unicron-detection-lease-interval-s", "0.5", "--unicron-detection-lease-ttl-s", "2",
                       "--unicron-detection-slow-factor", "2.5", "--unicron-detection-warmup-floor-s", "1",
                       "--unicron-detection-grace-window-s", "0.25"])
    assert args.unicron == UnicronConfig(
        enabled=True, metrics_log="m.jsonl", incident_log="i.jsonl", inject=("kill:1:5", "hang:2:6:forward"),
        snapshot_interval=4, persist_interval=8,
        detection=DetectionConfig(lease_interval_s=0.5, lease_ttl_s=2.0, slow_factor=2.5, warmup_floor_s=1.0,
                                  grace_window_s=0.25))
    assert parse_args(minimal).unicron == UnicronConfig()


# A tree with every kind of field: what a later issue adding settings gets without writing parser code.
@dataclass(frozen=True, kw_only=True)
class _Retry:
    """Retry settings."""

    attempts: int = 2
    """How many times to retry."""

    keep_going: bool = True
    """Continue after the last attempt."""


@dataclass(frozen=True, kw_only=True)
class _Tree:
    """A test tree."""

    mode: Literal["fast", "safe"] = "safe"
    """Which mode to run."""

    ratio: float | None = None
    """An optional ratio."""

    ranks: tuple[int, ...] = ()
    """Ranks to watch."""

    verbose: bool = False
    """Talk more."""

    retry: _Retry = field(default_factory=_Retry)

    def __post_init__(self) -> None:
        if self.ratio is not None and self.ratio > 1:
            raise FieldError("ratio", self.ratio, "must be at most 1")


def test_mechanism_turns_new_fields_into_flags_and_keys() -> None:
    parser = argparse.ArgumentParser()
    configtree.add_flags(parser, _Tree, ("x",), "x")
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    assert set(actions) - {"-h"} == {"--x-mode", "--x-ratio", "--x-ranks", "--x-verbose",
                                     "--x-retry-attempts", "--x-retry-no-keep-going"}
    assert actions["--x-mode"].help == "Which mode to run. Default: safe."
    assert actions["--x-mode"].metavar == "{fast,safe}"
    assert actions["--x-retry-no-keep-going"].help == "Continue after the last attempt."
    argv = ["--x-mode", "fast", "--x-ranks", "1", "--x-ranks", "3", "--x-verbose", "--x-retry-no-keep-going",
            "--x-ratio", "0.5"]
    given = vars(parser.parse_args(argv))
    nested, spelled = configtree.collect_flags(given, _Tree, ("x",))
    tree = configtree.build(_Tree, configtree.deep_merge({"retry": {"attempts": 5}}, nested), source="t.yaml",
                            spelled=spelled, root=("x",))
    assert tree == _Tree(mode="fast", ratio=0.5, ranks=(1, 3), verbose=True,
                         retry=_Retry(attempts=5, keep_going=False))
    assert configtree.build(_Tree, {}, source="t.yaml") == _Tree()
    assert configtree.to_dict(tree)["ranks"] == [1, 3]
    given = vars(parser.parse_args(["--x-ratio", "2", "--x-mode", "safe"]))
    nested, spelled = configtree.collect_flags(given, _Tree, ("x",))
    with pytest.raises(ConfigError, match=r"^--x-ratio 2: must be at most 1$"):
        configtree.build(_Tree, nested, source="t.yaml", spelled=spelled, root=("x",))
    with pytest.raises(ConfigError, match=r"^--x-mode slow: not a supported value; use one of fast, safe$"):
        configtree.build(_Tree, {"mode": "slow"}, source="t.yaml", spelled={"x.mode": "--x-mode slow"},
                         root=("x",))


def test_run_cli_turns_errors_into_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def bad() -> int:
        raise ConfigError("--num-layers 5: wrong\nsecond line")

    with pytest.raises(SystemExit) as info:
        run_cli(bad, prog="tool")
    assert info.value.code == 2
    assert capsys.readouterr().err == "tool: error: --num-layers 5: wrong second line\n"
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: 3, prog="tool")
    assert info.value.code == 3
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: None, prog="tool")
    assert info.value.code == 0

    def bug() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(bug, prog="tool")
    assert issubclass(ConfigError, UnicronError)


def test_config_values_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        UnicronConfig().enabled = True  # type: ignore[misc]
