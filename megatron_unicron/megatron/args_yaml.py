"""Reads a YAML job config (``--yaml-cfg``) in Megatron-LM's layout into flat ``args.`` values.

The layout is Megatron-LM's ``examples/gpt3/gpt_config.yaml``: flat keys named like ``args.`` fields,
a ``language_model:`` section (keys of megatron-core's TransformerConfig) and a ``model_parallel:``
section (keys of its ModelParallelConfig). Flat keys may also name section settings. This project adds
a ``unicron:`` section (returned as is, for :class:`~megatron_unicron.config.UnicronConfig`).
``language_model.activation_func`` maps to ``swiglu`` (``swiglu`` or ``gelu``). ``null`` means "not set".
``${VAR}`` inside a string is replaced by the environment variable, as Megatron-LM's loader does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from megatron_unicron import configtree
from megatron_unicron.errors import ConfigError

__all__ = ["Key", "load_job", "read_yaml"]

SECTIONS = ("language_model", "model_parallel")
_ENV = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class Key:
    """A supported flat key: its type and the Megatron-LM YAML section it may also appear in."""

    type: Any
    section: str | None


def _expand(value: Any, key: str, path: str) -> Any:
    if isinstance(value, str):

        def env(match: re.Match[str]) -> str:
            if match.group(1) not in os.environ:
                raise ConfigError(
                    f"{key}: {value} ({path}): environment variable {match.group(1)} is not "
                    "set; export it or write the value"
                )
            return os.environ[match.group(1)]

        return _ENV.sub(env, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{key}.{k}", path) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, key, path) for v in value]
    return value


def read_yaml(path: str) -> dict[str, Any]:
    """Load a YAML mapping from ``path``; a missing file or bad syntax is a one-line ConfigError."""
    where = f"--yaml-cfg {path}"
    try:
        with open(path, encoding="utf-8") as stream:
            doc = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: file not found; give the path of a YAML job config (examples: examples/gpt/configs/)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory; give the path of a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "cannot parse"
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}; fix the syntax") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got {type(doc).__name__}")
    return {str(k): _expand(v, str(k), path) for k, v in doc.items()}


def _unknown(key: str, path: str, choices: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    return ConfigError(
        f"unknown key {key!r} in {path}{configtree.did_you_mean(name, choices)}; remove it "
        "or correct the spelling (megatron_unicron rejects settings it does not support)"
    )


def load_job(path: str, schema: Mapping[str, Key]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Read a YAML job config into (values by ``args.`` name, how each was written, ``unicron:`` mapping).

    Values are converted to the schema's types; unknown keys, misplaced section keys, values of the
    wrong type and a setting given twice raise a one-line :class:`ConfigError` naming key and file.
    """
    doc = read_yaml(path)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    seen: dict[str, str] = {}

    short = os.path.basename(path)

    def put(name: str, value: Any, key: str) -> None:
        where = f"{key}: {configtree.show(value)} ({short})"
        if name in seen:
            raise ConfigError(f"{where} sets {name} a second time (also {seen[name]}); keep one of them")
        seen[name] = where
        if value is not None:
            values[name] = configtree.coerce(value, schema[name].type, where)
            spelled[name] = where

    for key, value in doc.items():
        if key == "unicron":
            continue
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key} in {path}: expected a mapping of keys, got {configtree.show(value)}"
                )
            allowed = [n for n, k in schema.items() if k.section == key]
            for sub, sub_value in value.items():
                full = f"{key}.{sub}"
                if key == "language_model" and sub == "activation_func":
                    if sub_value not in ("swiglu", "gelu"):
                        raise ConfigError(
                            f"{full}: {configtree.show(sub_value)} ({short}): not supported; "
                            "use swiglu or gelu"
                        )
                    put("swiglu", sub_value == "swiglu", full)
                elif sub in allowed:
                    put(sub, sub_value, full)
                elif sub in schema:
                    raise ConfigError(
                        f"{full} in {path}: {sub} is not a {key} setting; move it to the top level"
                    )
                else:
                    raise _unknown(full, path, allowed)
        elif key in schema:
            put(key, value, key)
        else:
            raise _unknown(key, path, [*schema, *SECTIONS, "unicron"])
    unicron = doc.get("unicron")
    if unicron is not None and not isinstance(unicron, dict):
        raise ConfigError(f"unicron in {path}: expected a mapping of keys, got {configtree.show(unicron)}")
    return values, spelled, unicron or {}
