"""README.md stays true: its file tree, its flag tables and the commands it gives (and CI runs)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import update_readme  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")
FIX = "run `python tools/update_readme.py` and commit README.md"


def command_after(marker: str) -> str:
    """The one-line command in the code block that follows ``<!-- marker -->``."""
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", README, flags=re.S)
    assert match, f"README.md has no code block after <!-- {marker} -->"
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, f"the block after <!-- {marker} --> must hold exactly one command line"
    return lines[0]


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    try:
        return update_readme.tracked_files(ROOT)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")


def test_every_tracked_file_is_in_the_tree_and_nothing_else(tracked: list[str]) -> None:
    in_tree = update_readme.parse_tree(update_readme.section(README, "tree"))
    missing = sorted(set(tracked) - set(in_tree))
    extra = sorted(set(in_tree) - set(tracked))
    assert not missing, f"tracked files missing from README.md's file tree: {missing}; {FIX}"
    assert not extra, f"README.md's file tree names files that are not tracked: {extra}; {FIX}"
    assert all((ROOT / path).is_file() for path in in_tree)


def test_every_file_in_the_tree_is_described() -> None:
    in_tree = update_readme.parse_tree(update_readme.section(README, "tree"))
    bare = [p for p, d in in_tree.items() if not d or d == update_readme.PLACEHOLDER]
    assert not bare, f"describe these files in README.md's file tree: {bare}"


def test_generated_sections_are_up_to_date(tracked: list[str]) -> None:
    """The tree's Python lines are the docstrings' first lines; the flag tables are the parsers'."""
    assert update_readme.generated_readme(README, tracked, ROOT) == README, f"README.md is stale: {FIX}"


def test_flag_tables_cover_every_flag_of_the_parsers() -> None:
    """Independent of the generator: each parser flag appears in README.md's tables."""
    from megatron_unicron.launch import build_parser as launcher_parser
    from megatron_unicron.megatron.args import build_parser

    tables = "\n".join(
        line
        for name in ("launcher-flags", "megatron-flags", "unicron-flags")
        for line in update_readme.section(README, name)
    )
    for parser in (launcher_parser(), build_parser()):
        for action in parser._actions:
            long_flags = [s for s in action.option_strings if s.startswith("--") and "_" not in s]
            if action.dest == "help" or not long_flags:
                continue
            assert f"`{long_flags[0]}" in tables, f"{long_flags[0]} is missing from README.md's flag tables"


def test_ci_runs_the_readmes_test_command() -> None:
    command = command_after("test-command")
    printed = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print-command"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == command
    for step in ("pip install torch==2.13.0", "'.[test]'", "ruff check .", "mypy", "pytest"):
        assert step in command, f"the test command lost its step {step!r}"
    assert command.index("ruff") < command.index("pytest") and command.index("mypy") < command.index("pytest")


def test_the_demo_command_names_files_that_exist() -> None:
    command = command_after("demo-command")
    words = shlex.split(command)
    assert "torch==2.13.0" in words and "-e" in words, "the demo command must install the package"
    paths = [w for w in words if w.endswith((".py", ".yaml"))]
    assert paths == ["examples/gpt/demo.py"], f"the demo command runs {paths}, not the node-loss demo"
    assert (ROOT / paths[0]).is_file(), f"the demo command names {paths[0]}, which does not exist"


def test_tree_round_trips_through_the_renderer() -> None:
    files = ["a.py", "d/b.txt", "d/e/c.yaml", "d/z.md", "f.toml"]
    described = {p: f"about {p}" for p in files}
    assert update_readme.parse_tree(update_readme.render_tree(files, described)) == described
