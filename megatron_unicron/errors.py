"""The error hierarchy of megatron_unicron, and how a command-line tool reports an error.

Every error the package raises on purpose derives from :class:`UnicronError`, so a caller can tell
"megatron_unicron refused this" from a bug. Categories (later modules add their classes here):

==================  =============================================  ==================================
class               raised for                                     what happens
==================  =============================================  ==================================
``ConfigError``     bad user input: an unknown flag or YAML key,   nothing starts; the CLI prints one
                    a bad value, a layout that cannot work         line and exits 2 (no traceback)
==================  =============================================  ==================================

A CLI turns these into ``prog: error: <message>`` with :func:`run_cli`::

    def main() -> int:
        args = parse_args()
        ...
        return 0

    if __name__ == "__main__":
        run_cli(main)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["ConfigError", "FieldError", "UnicronError", "run_cli", "CLI_ERROR_EXIT_CODE"]

CLI_ERROR_EXIT_CODE = 2
"""Exit code of a CLI that rejected its input (argparse's own code for usage errors)."""


class UnicronError(Exception):
    """Base of every error megatron_unicron raises on purpose."""


class ConfigError(UnicronError, ValueError):
    """Bad user input: a flag, a YAML key or value, or a layout that cannot work.

    The message is a single line that names the input as the user wrote it (``--num-layers 5`` or
    ``language_model.num_layers: 5 (job.yaml)``) and says how to fix it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


class FieldError(ConfigError):
    """A config value rejected by its own dataclass, before the loader knows how it was written.

    Config dataclasses raise it from ``__post_init__`` with the field name and the problem; the loader
    (:mod:`megatron_unicron.configtree`) re-raises a :class:`ConfigError` that names the flag or YAML
    key the value came from.
    """

    def __init__(self, field: str, value: object, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{field}={value!r}: {problem}")


def run_cli(main: Callable[[], int | None], *, prog: str | None = None) -> NoReturn:
    """Run a command-line entry point and exit with its code.

    A :class:`UnicronError` escaping ``main`` becomes ``prog: error: <message>`` on stderr and exit code
    :data:`CLI_ERROR_EXIT_CODE`, with no traceback. Any other exception propagates (it is a bug, and its
    traceback is what a bug report needs). ``prog`` defaults to the script's file name.
    """
    name = prog or os.path.basename(sys.argv[0]) or "megatron_unicron"
    try:
        code = main()
    except UnicronError as exc:
        sys.stderr.write(f"{name}: error: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(CLI_ERROR_EXIT_CODE) from None
    raise SystemExit(0 if code is None else code)
