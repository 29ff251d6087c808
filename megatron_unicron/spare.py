"""A warm spare interpreter: the worker's imports done ahead of time, waiting to become a restarted worker.

Restarting a failed worker (SEV2) in a fresh interpreter spends most of its time importing torch and
megatron-core (1-3 s on a loaded CPU node) while the survivors wait for it. The agent therefore keeps one
spare per node, running this module's ``main`` on ``<script args | -m module args>`` (``_BOOTSTRAP``). The
spare imports what the worker's script imports at its top level (read from its syntax tree: nothing of
the script runs) and, for scripts built on this package, the modules a worker loads while it heals and
the worker's datasets (``megatron.prepared``: they depend on the command line only); then it blocks on
stdin. The agent hands it a worker's identity as one JSON line ``{"env": {...}}``: the spare takes that
environment as its own and runs the script as ``__main__`` (``runpy``), exactly as
``python -u script.py args`` would, with the imports already in ``sys.modules``. End of input without a
line means the spare was not needed: it exits 0.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

# What a worker of this package imports after start-up (pretrain's lazy imports, the healing loop, the
# transition engine, snapshots): loaded by the spare only when the script itself imports the package.
PACKAGE_MODULES = (
    "megatron.core",
    "megatron_unicron.megatron.pretrain",
    "megatron_unicron.megatron.cpu",
    "megatron_unicron.healing",
    "megatron_unicron.protocol",
    "megatron_unicron.snapshot.service",
    "megatron_unicron.transition.controller",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.datasets.gpt_dataset",
)


def spare_target(argv: Sequence[str]) -> list[str] | None:
    """What a spare runs for a worker command line made by ``unicron-run``; None if it cannot run it.

    ``(python, -u, script, args)`` gives ``[script, args]``, ``(python, -u, -m, module, args)`` gives
    ``[-m, module, args]``; a program run without Python (``--no-python``) has no warm spare.
    """
    if len(argv) < 3 or argv[1] != "-u" or (argv[2] == "-m" and len(argv) < 4):
        return None
    return list(argv[2:])


# ``python -m`` would put the agent's working directory first on sys.path, so the spare could import a
# different copy of a module than the worker (whose first entry is its script's directory) and run it.
# The spare starts with the worker's sys.path instead; this package's own location comes last, only for
# a worker that does not import it.
_BOOTSTRAP = (
    "import os, sys; target = sys.argv[1:]; "
    "sys.path[0] = os.getcwd() if target[0] == '-m' else os.path.dirname(os.path.abspath(target[0])); "
    f"sys.path.append({os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}); "
    "from megatron_unicron.spare import main; sys.exit(main(target))"
)


class WarmSpare:
    """The agent's handle on one spare process (started on the agent's thread, as workers are)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], preexec: Callable[[], None]) -> None:
        target = spare_target(argv)
        if target is None:
            raise ValueError(f"no warm spare for {' '.join(argv)!r}: it is not a Python script or module")
        self._popen: subprocess.Popen[bytes] = subprocess.Popen(
            [argv[0], "-u", "-c", _BOOTSTRAP, *target],
            env=dict(env), stdin=subprocess.PIPE, start_new_session=True, preexec_fn=preexec,
        )
        self.pid = self._popen.pid

    def usable(self) -> bool:
        """Whether the spare is still running, so that it can take a worker's place."""
        return self._popen.poll() is None and self._popen.stdin is not None

    def hand_over(self, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Give the spare a worker's environment; it becomes that worker. Raises OSError if it died."""
        stdin = self._popen.stdin
        if stdin is None:
            raise OSError(f"the warm spare (pid {self.pid}) is gone: it was closed or handed over")
        try:
            stdin.write((json.dumps({"env": dict(env)}) + "\n").encode())
            stdin.close()
        except (BrokenPipeError, ValueError) as error:
            raise OSError(f"the warm spare (pid {self.pid}) is gone: {error}") from None
        self._popen.stdin = None
        return self._popen

    def close(self) -> None:
        """End an unused spare and reap it (its process group, in case it forked)."""
        if self._popen.stdin is not None:
            try:
                self._popen.stdin.close()
            except OSError:
                pass
            self._popen.stdin = None
        if self._popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self._popen.kill()
        self._popen.wait()


def script_imports(path: str) -> list[str]:
    """Module names imported at the top level of a script (also inside top-level ``try``/``if``)."""
    try:
        with open(path, encoding="utf-8") as source:
            tree = ast.parse(source.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return []
    names: list[str] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Try):
            pending.extend(node.body)
        elif isinstance(node, ast.If) and not _is_main_guard(node):
            pending.extend(node.body + node.orelse)
    return names


def _is_main_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def uses_package(names: Sequence[str]) -> bool:
    """Whether a worker importing ``names`` is built on this package."""
    return any(n == "megatron_unicron" or n.startswith("megatron_unicron.") for n in names)


def modules_to_preload(target: Sequence[str]) -> list[str]:
    """What the spare imports for a worker command (``script args`` or ``-m module args``)."""
    if target[0] == "-m":
        names = [target[1]]
    else:
        names = script_imports(target[0])
    if uses_package(names):
        names += [n for n in PACKAGE_MODULES if n not in names]
    if target[0] == "-m":
        names.remove(target[1])  # the module itself is the worker: it runs only once handed over
    return names


def preload(names: Sequence[str]) -> None:
    """Import each module; one that fails is left for the worker to import (and report) itself."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (the worker raises the same error where it belongs)
            pass


def prepare_datasets(target: Sequence[str]) -> None:
    """Build the datasets the worker will ask for (``megatron.prepared``; quietly nothing if it cannot)."""
    try:
        from megatron_unicron.megatron import prepared
    except Exception:  # noqa: BLE001 (the worker imports it, and reports the failure, itself)
        return
    argv = target[2:] if target[0] == "-m" else target[1:]
    prepared.prepare_from_argv(argv, int(os.environ.get("WORLD_SIZE", "1")))


def run_as_worker(target: Sequence[str], env: dict[str, str]) -> None:
    """Become the worker: its environment, its argv, its script run as ``__main__``."""
    os.environ.clear()
    os.environ.update(env)
    if target[0] == "-m":
        sys.argv = ["-m", *target[2:]]  # run_module puts the module's path in argv[0]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        return
    script = target[0]
    sys.argv = list(target)
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` sets it
    runpy.run_path(script, run_name="__main__")


def main(argv: Sequence[str] | None = None) -> int:
    """Preload, wait for a worker identity on stdin, run the worker (or exit 0 at end of input)."""
    target = list(sys.argv[1:] if argv is None else argv)
    if not target or (target[0] == "-m" and len(target) < 2):
        print("usage: python -m megatron_unicron.spare (script.py | -m module) [args]", file=sys.stderr)
        return 2
    names = modules_to_preload(target)
    preload(names)
    if uses_package(names):
        prepare_datasets(target)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    assignment = json.loads(line)
    # The worker must not hold the agent's pipe: its stdin becomes /dev/null, as a detached worker's.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    run_as_worker(target, {str(k): str(v) for k, v in assignment["env"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
