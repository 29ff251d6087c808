"""Regenerate the generated sections of README.md: the file tree and the tables of flags.

The README keeps three sections between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers:

* ``tree``: every file git tracks, one line each. A Python file is described by the first line of its
  module docstring; any other file keeps the description written in the README (a new one gets a
  placeholder to replace by hand).
* ``megatron-flags``: the Megatron-LM flags of ``examples/gpt/pretrain_gpt.py``, from the parser of
  :mod:`megatron_unicron.megatron.args` (flag, default, meaning).
* ``unicron-flags``: the ``--unicron*`` flags and YAML keys, from the config tree of
  :mod:`megatron_unicron.config`.
* ``launcher-flags``: the flags of ``unicron-run``, from :mod:`megatron_unicron.launch`'s parser.

``python tools/update_readme.py`` rewrites them in place; ``--check`` only reports (exit 1) whether
README.md is out of date. ``tests/test_readme.py`` runs the same comparison.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = "<describe this file>"
PIPE, TEE, ELBOW, SPACE = "│   ", "├── ", "└── ", "    "
DESCRIPTION_COLUMN = 44  # descriptions start here (or two spaces after a longer name)


# --------------------------------------------------------------------------- the file tree
def tracked_files(root: Path = ROOT) -> list[str]:
    """The files git tracks under ``root`` (relative paths, sorted)."""
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True, text=True
    ).stdout
    return sorted(p for p in out.split("\0") if p)


def docstring_summary(path: Path) -> str | None:
    """The first line of a Python file's module docstring (None when it has none)."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    except SyntaxError:
        return None
    if not doc:
        return None
    line = doc.strip().splitlines()[0].strip()
    line = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", line)  # Sphinx roles read as plain code here
    return line.replace("``", "`")


def _entries(files: Iterable[str]) -> dict[str, dict]:
    """Nest paths into a dict tree: directories map to dicts, files to None."""
    tree: dict[str, dict] = {}
    for path in files:
        node = tree
        *dirs, name = path.split("/")
        for d in dirs:
            node = node.setdefault(d + "/", {})
        node[name] = {}
    return tree


def _sort_key(name: str) -> tuple[str, str]:
    return (name.rstrip("/").lower(), name)


def render_tree(files: Sequence[str], descriptions: Mapping[str, str]) -> list[str]:
    """Tree lines for ``files``; each file line carries ``descriptions[path]`` after ``#``."""
    lines: list[str] = []

    def walk(node: dict[str, dict], prefix: str, indent: str) -> None:
        names = sorted(node, key=_sort_key)
        for i, name in enumerate(names):
            last = i == len(names) - 1
            head = indent + (ELBOW if last else TEE) + name
            path = prefix + name
            if name.endswith("/"):
                lines.append(head)
                walk(node[name], path, indent + (SPACE if last else PIPE))
            else:
                pad = max(DESCRIPTION_COLUMN - len(head), 2)
                lines.append(f"{head}{' ' * pad}# {descriptions.get(path) or PLACEHOLDER}")

    walk(_entries(files), "", "")
    return lines


def parse_tree(lines: Iterable[str]) -> dict[str, str]:
    """The inverse of :func:`render_tree`: ``{path: description}`` of every file line."""
    files: dict[str, str] = {}
    stack: list[str] = []
    for line in lines:
        match = re.match(r"^((?:│   |    )*)(?:├── |└── )(\S+)(?:\s+# (.*))?$", line)
        if not match:
            continue
        depth = len(match.group(1)) // 4
        name = match.group(2)
        del stack[depth:]
        if name.endswith("/"):
            stack.append(name)
        else:
            files["".join(stack) + name] = (match.group(3) or "").strip()
    return files


def tree_descriptions(files: Sequence[str], current: Mapping[str, str], root: Path = ROOT) -> dict[str, str]:
    """Python files: their docstring's first line; others: what the README says now."""
    described: dict[str, str] = {}
    for path in files:
        summary = docstring_summary(root / path) if path.endswith(".py") else None
        described[path] = summary or current.get(path) or PLACEHOLDER
    return described


# --------------------------------------------------------------------------- the flag tables
def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default_text(value: object) -> str:
    if value is None or value == ():
        return "–"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def megatron_flag_rows() -> list[str]:
    """Markdown table rows of every Megatron-LM flag, in the parser's groups and order."""
    from megatron_unicron.megatron.args import MegatronArgs, build_parser

    fields = {f.name: f for f in dataclasses.fields(MegatronArgs)}
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for group in build_parser()._action_groups:
        actions = [a for a in group._group_actions if a.dest in fields and a.option_strings]
        if not actions:
            continue
        rows.append(f"| **{group.title}** | | |")
        for action in actions:
            f = fields[action.dest]
            if f.default is dataclasses.MISSING:
                default = "derived" if f.metadata.get("derived") else "required"
            elif action.nargs == 0:  # a switch: show what giving it does to the default
                default = "off"
            else:
                default = _default_text(f.default)
            flag = action.option_strings[0]
            if action.metavar and action.nargs != 0:
                flag += f" {action.metavar}"
            rows.append(f"| `{_cell(flag)}` | {default} | {_cell(f.metadata['help'])} |")
    return rows


def unicron_flag_rows() -> list[str]:
    """Markdown table rows of every ``--unicron*`` flag and its YAML key (the config tree's leaves)."""
    from megatron_unicron import configtree
    from megatron_unicron.config import UnicronConfig

    rows = ["| flag | YAML key | default | meaning |", "|---|---|---|---|"]
    for leaf in configtree.leaves(UnicronConfig, ("unicron",)):
        flag = leaf.flag if leaf.type is bool else f"{leaf.flag} {leaf.metavar}"
        rows.append(
            f"| `{_cell(flag)}` | `{leaf.key}` | {_default_text(leaf.default)} | {_cell(leaf.help)} |"
        )
    return rows


def launcher_flag_rows() -> list[str]:
    """Markdown table rows of every ``unicron-run`` flag (its parser's help carries the defaults)."""
    from megatron_unicron.launch import build_parser

    rows = ["| flag | meaning |", "|---|---|"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        names = [s for s in action.option_strings if not ("_" in s and s.startswith("--"))]
        names = sorted(names, key=lambda s: not s.startswith("--"))  # the long name first
        if action.nargs != 0:
            choices = "{" + ",".join(map(str, action.choices)) + "}" if action.choices else None
            names[0] += f" {choices or action.metavar or action.dest.upper()}"
        rows.append(f"| {', '.join(f'`{n}`' for n in names)} | {_cell(action.help)} |")
    return rows


# --------------------------------------------------------------------------- README sections
def section(text: str, name: str) -> list[str]:
    """The lines between ``<!-- name:begin -->`` and ``<!-- name:end -->`` (ValueError if missing)."""
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, flags=re.S)
    if match is None:
        raise ValueError(f"README.md has no <!-- {name}:begin --> ... <!-- {name}:end --> section")
    return match.group(1).splitlines()


def replace_section(text: str, name: str, lines: Sequence[str]) -> str:
    """``text`` with section ``name`` replaced by ``lines``."""
    section(text, name)  # raises when absent
    body = "\n".join(lines) + "\n"
    return re.sub(
        rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)",
        lambda m: m.group(1) + body + m.group(2),
        text,
        flags=re.S,
    )


def generated_readme(text: str, files: Sequence[str], root: Path = ROOT) -> str:
    """README text with every generated section brought up to date."""
    descriptions = tree_descriptions(files, parse_tree(section(text, "tree")), root)
    text = replace_section(text, "tree", ["```", *render_tree(files, descriptions), "```"])
    text = replace_section(text, "launcher-flags", launcher_flag_rows())
    text = replace_section(text, "megatron-flags", megatron_flag_rows())
    return replace_section(text, "unicron-flags", unicron_flag_rows())


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite README.md's generated sections, or with ``--check`` report whether they are stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if README.md is stale")
    args = parser.parse_args(argv)
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    new = generated_readme(text, tracked_files())
    missing = [p for p, d in parse_tree(section(new, "tree")).items() if d == PLACEHOLDER]
    if args.check:
        if new != text:
            print("README.md is out of date: run python tools/update_readme.py", file=sys.stderr)
            return 1
    elif new != text:
        readme.write_text(new, encoding="utf-8")
        print(f"updated {os.path.relpath(readme)}")
    for path in missing:
        print(f"README.md: describe {path} (replace {PLACEHOLDER!r} in the file tree)", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
