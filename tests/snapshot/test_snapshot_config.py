"""Which settings switch snapshots on, and the one-line errors for those that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_unicron.errors import ConfigError
from megatron_unicron.megatron.args import parse_args
from megatron_unicron.snapshot.service import check_config

YAML = str(Path(__file__).resolve().parents[2] / "examples/gpt/configs/tiny_gpt.yaml")


def args(*flags: str):
    return parse_args(["--yaml-cfg", YAML, *flags])


def test_snapshots_are_off_by_default_and_on_with_an_interval() -> None:
    assert not check_config(args("--unicron"))
    assert check_config(args("--unicron", "--unicron-snapshot-interval", "1"))


def test_the_yaml_section_sets_them_too(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(Path(YAML).read_text() + "\nunicron:\n  enabled: true\n  snapshot_interval: 5\n"
                      "  persist_interval: 2\n")  # fmt: skip
    parsed = parse_args(["--yaml-cfg", str(config), "--save", str(tmp_path), "--save-interval", "100"])
    assert (parsed.unicron.snapshot_interval, parsed.unicron.persist_interval) == (5, 2)
    assert check_config(parsed)


@pytest.mark.parametrize(
    "flags, must_name",
    [
        (("--unicron-snapshot-interval", "2"), "needs --unicron"),
        (("--unicron", "--unicron-persist-interval", "2"), "--unicron-snapshot-interval"),
        (("--unicron", "--unicron-snapshot-interval", "2", "--unicron-persist-interval", "2"), "--save"),
    ],
)
def test_settings_that_cannot_work_are_one_line_errors(flags: tuple[str, ...], must_name: str) -> None:
    with pytest.raises(ConfigError, match=must_name) as error:
        check_config(args(*flags))
    assert "\n" not in str(error.value)


def test_the_distributed_optimizer_keeps_them_on() -> None:
    # its shards are snapshotted as flat ranges, described locally (no collective)
    assert check_config(args("--unicron", "--unicron-snapshot-interval", "1", "--use-distributed-optimizer"))
