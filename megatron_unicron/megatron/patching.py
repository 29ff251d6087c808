"""Reversible runtime patches of megatron-core (and of the few torch attributes megatron relies on).

Every runtime patch the project makes goes through a :class:`PatchSet`: it records the original value of
each attribute it replaces, so ``revert()`` restores exactly what was there, and it lists its sites so a
test can assert that megatron-core still has every symbol the patch expects (a renamed or moved symbol
must fail a test, never silently stop being patched).

The supported megatron-core range is checked once, here, for every patch module.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from packaging.version import Version

logger = logging.getLogger(__name__)

SUPPORTED_MEGATRON_CORE = (Version("0.16"), Version("0.20"))


def megatron_core_version() -> Version:
    """The installed megatron-core version, read without importing megatron."""
    return Version(metadata.version("megatron-core"))


def check_megatron_core_version() -> Version:
    """Raise ``RuntimeError`` naming the installed and supported versions when outside the range."""
    version = megatron_core_version()
    low, high = SUPPORTED_MEGATRON_CORE
    if not (low <= version < high):
        raise RuntimeError(
            f"megatron-core {version} is not supported: install megatron-core>={low},<{high} "
            "(the runtime patches are written against that range)"
        )
    return version


@dataclass(frozen=True)
class PatchSite:
    """One attribute replaced by a patch: ``owner`` is a module path or ``module:Class``."""

    owner: str
    attribute: str
    reason: str

    def resolve_owner(self) -> Any:
        """Import and return the module or class that owns the attribute."""
        module_name, _, class_name = self.owner.partition(":")
        owner: Any = importlib.import_module(module_name)
        for part in filter(None, class_name.split(".")):
            owner = getattr(owner, part)
        return owner

    def exists(self) -> bool:
        """Whether the owner still has the attribute (the frozen-surface test calls this)."""
        try:
            return hasattr(self.resolve_owner(), self.attribute)
        except (ImportError, AttributeError):
            return False

    def __str__(self) -> str:
        return f"{self.owner}.{self.attribute}"


class PatchSet:
    """A named group of attribute replacements that can be applied and reverted as one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._originals: dict[tuple[int, str], tuple[Any, str, Any]] = {}

    @property
    def applied(self) -> bool:
        """Whether any replacement of this set is in place."""
        return bool(self._originals)

    def replace(self, owner: Any, attribute: str, value: Any) -> None:
        """Set ``owner.attribute = value``, remembering the first original for ``revert``."""
        key = (id(owner), attribute)
        if key not in self._originals:
            self._originals[key] = (owner, attribute, getattr(owner, attribute))
        setattr(owner, attribute, value)

    def is_replaced(self, owner: Any, attribute: str) -> bool:
        """Whether this set currently replaces ``owner.attribute``."""
        return (id(owner), attribute) in self._originals

    def revert(self) -> int:
        """Restore every original value; returns how many attributes were restored."""
        count = len(self._originals)
        for owner, attribute, original in self._originals.values():
            setattr(owner, attribute, original)
        self._originals.clear()
        if count:
            logger.debug("%s: reverted %d patched attributes", self.name, count)
        return count

    def replaced(self) -> Iterator[tuple[Any, str]]:
        """The (owner, attribute) pairs currently replaced."""
        for owner, attribute, _ in self._originals.values():
            yield owner, attribute
