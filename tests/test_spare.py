"""The warm spare: what it preloads, and that a handed-over spare runs the worker as ``python -u script``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_unicron.spare import (
    PACKAGE_MODULES,
    WarmSpare,
    modules_to_preload,
    script_imports,
    spare_target,
)
from megatron_unicron.workers import bound_to_this_process

ROOT = Path(__file__).resolve().parents[1]

# A worker that reports what it sees. ``email.mime.text`` stands for the script's heavy imports: a spare
# has it in sys.modules before the script's own import line runs, a fresh interpreter does not.
WORKER = textwrap.dedent('''
    import json
    import os
    import sys

    PRELOADED = "email.mime.text" in sys.modules
    import email.mime.text  # noqa: E402

    if __name__ == "__main__":
        with open(os.environ["OUT"], "w") as out:
            out.write(json.dumps({"preloaded": PRELOADED, "rank": os.environ.get("RANK"),
                                  "spare_only": os.environ.get("ONLY_IN_SPARE"), "argv": sys.argv,
                                  "path0": sys.path[0], "stdin": sys.stdin.read()}))
        sys.exit(int(os.environ.get("EXIT_CODE", "0")))
''')


def test_spare_target_takes_python_scripts_and_modules_only() -> None:
    py = sys.executable
    assert spare_target((py, "-u", "train.py", "--lr", "1")) == ["train.py", "--lr", "1"]
    assert spare_target((py, "-u", "-m", "pkg.train", "--lr", "1")) == ["-m", "pkg.train", "--lr", "1"]
    assert spare_target(("./train.sh", "--lr", "1")) is None  # --no-python
    assert spare_target((py, "-u", "-m")) is None


def test_script_imports_reads_the_top_level_but_not_the_main_block(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(textwrap.dedent('''
        import os, json as j
        from collections import abc
        from . import sibling
        try:
            import tomllib
        except ImportError:
            pass
        if os.name == "posix":
            import shlex
        def f():
            import secrets
        if __name__ == "__main__":
            import zipapp
    '''))
    assert script_imports(str(script)) == ["os", "json", "collections", "tomllib", "shlex"]
    assert script_imports(str(tmp_path / "missing.py")) == []


def test_package_scripts_also_preload_what_a_healing_worker_imports() -> None:
    preloaded = modules_to_preload([str(ROOT / "examples/gpt/pretrain_gpt.py")])
    assert {"torch", "megatron_unicron.megatron.pretrain"} <= set(preloaded)
    assert set(PACKAGE_MODULES) <= set(preloaded)
    assert modules_to_preload(["-m", "megatron_unicron.something"]) == list(PACKAGE_MODULES)
    assert modules_to_preload(["-m", "other.module"]) == []


def _run_spare(tmp_path: Path, env: dict[str, str]) -> tuple[int, dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = (sys.executable, "-u", str(script), "--flag", "x")
    spare = WarmSpare(argv, {**os.environ, "ONLY_IN_SPARE": "yes"}, bound_to_this_process())
    time.sleep(0.5)  # let it preload (a handover before that waits in the pipe: also fine)
    assert spare.usable()
    process = spare.hand_over({**os.environ, "OUT": str(tmp_path / "out.txt"), **env})
    code = process.wait(timeout=60)
    return code, json.loads((tmp_path / "out.txt").read_text())


def test_a_handed_over_spare_is_the_worker(tmp_path: Path) -> None:
    code, seen = _run_spare(tmp_path, {"RANK": "3", "EXIT_CODE": "7"})
    assert code == 7  # the script's exit status is the process's
    assert seen["preloaded"] is True
    assert seen["rank"] == "3" and seen["spare_only"] is None  # the worker's environment, all of it
    assert seen["argv"] == [str(tmp_path / "worker.py"), "--flag", "x"]
    assert seen["path0"] == str(tmp_path)  # as `python script.py` sets it
    assert seen["stdin"] == ""  # not the agent's pipe
    fresh = {**os.environ, "OUT": str(tmp_path / "fresh.txt")}
    subprocess.run([sys.executable, "-u", str(tmp_path / "worker.py")], env=fresh, check=True, timeout=60)
    assert json.loads((tmp_path / "fresh.txt").read_text())["preloaded"] is False  # the control


def test_the_spare_imports_what_the_worker_would_not_the_agents_working_directory(tmp_path: Path) -> None:
    # The agent's working directory holds another copy of a module the script imports: a fresh
    # `python -u script.py` takes the one beside the script, and so must the spare's preload.
    (tmp_path / "scripts").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "scripts" / "helper_mod.py").write_text("WHERE = 'beside the script'\n")
    (tmp_path / "cwd" / "helper_mod.py").write_text("WHERE = 'agent cwd'\n")
    script = tmp_path / "scripts" / "worker.py"
    script.write_text("import os\nimport helper_mod\n\nif __name__ == '__main__':\n"
                      "    open(os.environ['OUT'], 'w').write(helper_mod.WHERE)\n")
    here = os.getcwd()
    os.chdir(tmp_path / "cwd")
    try:
        spare = WarmSpare((sys.executable, "-u", str(script)), dict(os.environ), bound_to_this_process())
    finally:
        os.chdir(here)
    time.sleep(0.5)
    process = spare.hand_over({**os.environ, "OUT": str(tmp_path / "out.txt")})
    assert process.wait(timeout=60) == 0
    assert (tmp_path / "out.txt").read_text() == "beside the script"


def test_an_unused_spare_ends_quietly_and_a_dead_one_refuses_work(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = (sys.executable, "-u", str(script))
    spare = WarmSpare(argv, {**os.environ, "OUT": str(tmp_path / "out.txt")}, bound_to_this_process())
    spare.close()
    assert not spare.usable()
    with pytest.raises(OSError, match="warm spare"):
        spare.hand_over(dict(os.environ))
    assert not (tmp_path / "out.txt").exists()  # the script never ran
    with pytest.raises(ValueError, match="not a Python script"):
        WarmSpare(("./train.sh",), dict(os.environ), bound_to_this_process())


# A worker built on the package: it reports whether datasets for its own command line were ready.
PACKAGE_WORKER = textwrap.dedent('''
    import json
    import os
    import sys

    from megatron_unicron.megatron import prepared

    if __name__ == "__main__":
        from megatron_unicron.megatron.args import parse_args, resolve_world

        args = resolve_world(parse_args(sys.argv[1:]), int(os.environ["WORLD_SIZE"]))
        ready = prepared.take(prepared.DatasetRequest.for_args(args))
        with open(os.environ["OUT"], "w") as out:
            json.dump({"prepared": ready is not None, "train": ready and len(ready.train)}, out)
''')


def test_a_spare_of_a_package_script_has_the_workers_datasets_ready(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(PACKAGE_WORKER)
    flags = ["--yaml-cfg", str(ROOT / "examples/gpt/configs/tiny_gpt.yaml"), "--train-iters", "7"]
    env = {**os.environ, "WORLD_SIZE": "4"}
    spare = WarmSpare((sys.executable, "-u", str(script), *flags), env, bound_to_this_process())
    process = spare.hand_over({**env, "OUT": str(tmp_path / "spare.txt")})
    assert process.wait(timeout=120) == 0
    seen = json.loads((tmp_path / "spare.txt").read_text())
    assert seen["prepared"] is True and seen["train"] >= 7 * 8  # megatron's mock data has more
    fresh = {**env, "OUT": str(tmp_path / "fresh.txt")}
    subprocess.run([sys.executable, "-u", str(script), *flags], env=fresh, check=True, timeout=120)
    assert json.loads((tmp_path / "fresh.txt").read_text())["prepared"] is False  # the control
