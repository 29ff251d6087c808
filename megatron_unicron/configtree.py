"""Config trees: frozen kw-only dataclasses read from YAML mappings and offered as command-line flags.

One mechanism serves every config tree of the package, so adding a field is all it takes to add a YAML
key and a flag:

- a field whose type is a dataclass is a *section*: YAML nests a mapping under its name and its flags
  carry its name (``detection.slow_factor`` <-> ``--unicron-detection-slow-factor``);
- leaf types are ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None`` of those, and
  ``tuple[X, ...]``; a YAML ``null`` means "not set" (the field keeps its default);
- the help text is the field's attribute docstring (the string literal under the field) or
  ``metadata["help"]``; ``metadata["flag"]`` replaces the generated flag name, ``metadata["metavar"]``
  its placeholder;
- a ``bool`` field is a switch: ``--x`` sets it when its default is False; when its default is True the
  switch is ``--...-no-x`` and clears it; a ``tuple`` field is a repeatable flag (one item per use);
- an unknown key is an error with a "did you mean" suggestion, and a value rejected by a dataclass's
  ``__post_init__`` (:class:`~megatron_unicron.errors.FieldError`) is reported as the user wrote it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar, Union

from megatron_unicron.errors import ConfigError, FieldError

__all__ = [
    "Leaf",
    "build",
    "close_match",
    "coerce",
    "collect_flags",
    "add_flags",
    "deep_merge",
    "field_docs",
    "leaves",
    "metavar_of",
    "show",
    "to_dict",
]

T = TypeVar("T")


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """Return the choice most similar to ``word`` (difflib), or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str], quote: bool = True) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    match = close_match(word, choices)
    if match is None:
        return ""
    return f" (did you mean {match!r}?)" if quote else f" (did you mean {match}?)"


def show(value: Any) -> str:
    """A value as YAML would show it in a message: ``null``, ``true``, ``[a, b]``, ``3e-3``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of ``cls`` to its attribute docstring (the string literal right below it)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    class_def = ast.parse(source).body[0]
    if not isinstance(class_def, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    for node, after in zip(class_def.body, class_def.body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def is_section(tp: Any) -> bool:
    """True when a field of type ``tp`` is a nested config section (a dataclass type)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return ", ".join(str(a) for a in targs)
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value or a command-line string to the field type ``tp``.

    ``where`` names the value as the user wrote it; a value that does not fit raises a one-line
    :class:`ConfigError` that starts with it. Strings are parsed for numbers (command lines give strings,
    and YAML 1.1 reads ``3e-3`` as a string); a string for a list field is split on whitespace.
    """
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in targs if a is not type(None)]
        if value is None and len(inner) < len(targs):
            return None
        if len(inner) != 1:
            raise TypeError(f"unsupported config field type {tp!r}")
        return coerce(value, inner[0], where)
    if origin is Literal:
        if value in targs:
            return value
        choices = [str(a) for a in targs]
        raise ConfigError(
            f"{where}: not a supported value; use one of {', '.join(choices)}"
            + did_you_mean(str(value), choices, quote=False)
        )
    if origin in (list, tuple):
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_describe(targs[0])}")
        converted = [coerce(item, targs[0], where) for item in items]
        return tuple(converted) if origin is tuple else converted
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (int, float) and isinstance(value, str):
        try:
            return tp(value.strip())
        except ValueError:
            pass
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp not in (bool, int, float, str):
        raise TypeError(f"unsupported config field type {tp!r}")
    raise ConfigError(f"{where}: expected {_describe(tp)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Leaf:
    """One leaf field of a config tree, as a flag and a dotted key."""

    key: str
    """Dotted key from the root, e.g. ``unicron.detection.slow_factor`` (also the argparse dest)."""
    type: Any
    default: Any
    flag: str
    help: str
    metavar: str


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def metavar_of(tp: Any, name: str) -> str:
    """The help placeholder of a flag: ``{a,b}`` for a Literal (also inside ``X | None``), else NAME."""
    for candidate in (tp, *typing.get_args(tp)):
        if typing.get_origin(candidate) is Literal:
            return "{" + ",".join(str(a) for a in typing.get_args(candidate)) + "}"
    return name.upper()


def leaves(cls: type, root: tuple[str, ...]) -> Iterator[Leaf]:
    """Yield every leaf of the tree rooted at ``cls``; ``root`` prefixes keys and flag names."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, path = hints[f.name], (*root, f.name)
        if is_section(tp):
            yield from leaves(tp, path)
            continue
        default = _default(f)
        words = list(path)
        if tp is bool and default is True:
            words[-1] = "no_" + words[-1]
        flag = f.metadata.get("flag") or "--" + "-".join(words).replace("_", "-")
        help_text = f.metadata.get("help") or docs.get(f.name, "")
        yield Leaf(
            key=".".join(path), type=tp, default=default, flag=flag, help=help_text,
            metavar=f.metadata.get("metavar") or metavar_of(tp, f.name),
        )


def add_flags(parser: argparse.ArgumentParser, cls: type, root: tuple[str, ...], title: str) -> None:
    """Add one flag per leaf of the tree ``cls`` to ``parser``, in an argument group called ``title``.

    Flags default to ``argparse.SUPPRESS``, so the parsed namespace holds only the flags given; the
    dest of each flag is its leaf's dotted key.
    """
    group = parser.add_argument_group(title, description=(cls.__doc__ or "").split("\n")[0])
    for leaf in leaves(cls, root):
        help_text = leaf.help.replace("%", "%%")
        if leaf.type is bool:
            action = "store_false" if leaf.default else "store_true"
            group.add_argument(leaf.flag, dest=leaf.key, action=action, default=argparse.SUPPRESS,
                               help=help_text)
        elif typing.get_origin(leaf.type) is tuple:
            group.add_argument(leaf.flag, dest=leaf.key, action="append", default=argparse.SUPPRESS,
                               metavar=leaf.metavar, help=help_text + " Repeatable.")
        else:
            default = "" if leaf.default is None else f" Default: {leaf.default}."
            group.add_argument(leaf.flag, dest=leaf.key, default=argparse.SUPPRESS, metavar=leaf.metavar,
                               help=help_text + default)


def collect_flags(
    given: Mapping[str, Any], cls: type, root: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Turn the flags of tree ``cls`` found in ``given`` (an argparse namespace as a dict) into values.

    Returns the nested mapping ``build`` accepts (relative to ``root``) and, for each dotted key, the
    flag as the user wrote it (for error messages).
    """
    nested: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for leaf in leaves(cls, root):
        if leaf.key not in given:
            continue
        raw = given[leaf.key]
        if leaf.type is bool:
            spelled[leaf.key] = leaf.flag
        elif isinstance(raw, list):
            spelled[leaf.key] = " ".join(f"{leaf.flag} {item}" for item in raw)
        else:
            spelled[leaf.key] = f"{leaf.flag} {raw}"
        node = nested
        parts = leaf.key.split(".")[len(root):]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = raw
    return nested, spelled


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override``, merging nested mappings key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build(
    cls: type[T],
    data: Any,
    *,
    source: str,
    spelled: Mapping[str, str] | None = None,
    root: tuple[str, ...] = (),
) -> T:
    """Build the config tree ``cls`` from a nested mapping (parsed YAML, flags, or both merged).

    ``source`` names where unspelled values came from (a YAML file: its base name marks values in
    messages); ``spelled`` maps dotted keys to the
    flags that set them. Unknown keys, values of the wrong type and values the dataclasses reject raise
    a one-line :class:`ConfigError` naming the key (or flag) and the fix.
    """
    spelled = spelled or {}
    here, short = ".".join(root), os.path.basename(source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{here or 'the top level'} in {source}: expected a mapping of keys, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            full = ".".join((*root, str(key)))
            raise ConfigError(f"unknown key {full!r} in {source}{did_you_mean(str(key), names)}; "
                              f"supported keys{' under ' + here if here else ''}: {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if value is None:
            continue
        key = ".".join((*root, name))
        if is_section(hints[name]):
            kwargs[name] = build(hints[name], value, source=source, spelled=spelled, root=(*root, name))
        else:
            kwargs[name] = coerce(value, hints[name], spelled.get(key) or f"{key}: {show(value)} ({short})")
    try:
        return cls(**kwargs)
    except FieldError as err:
        key = ".".join((*root, err.field))
        where = spelled.get(key) or f"{key}: {show(data.get(err.field, err.value))} ({short})"
        raise ConfigError(f"{where}: {err.problem}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Return a config tree as nested plain dicts and lists (YAML- and JSON-ready)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out
