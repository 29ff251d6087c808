"""unicron-run end to end: torchrun's environment, fail-fast, restarts, signals, nodes, --unicron, bad input.

Every job goes through the real launcher (``python -m megatron_unicron.launch``) and real gloo workers;
every fault test checks that the fault fired (the worker's own "failing now" line, or the signal sent).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_unicron.testing.harness import (
    REPO_ROOT,
    JobRunner,
    JobTimeout,
    assert_no_leaks,
    free_port,
    launcher_argv,
    marked_processes,
)

pytestmark = pytest.mark.slow

# Variables torchrun 2.13 sets for a worker; TORCHELASTIC_ERROR_FILE differs by path only.
TORCHRUN_VARS = {
    "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
    "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_SIGNALS_TO_HANDLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "OMP_NUM_THREADS",
}


def _gone(pids: list[int], timeout_s: float = 5.0) -> bool:
    """Whether every pid is dead (or a zombie) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def test_worker_env_matches_torchrun(jobs: JobRunner, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "torchrun"
    ours.mkdir()
    theirs.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS and not k.startswith("UNICRON_")}
    env["PYTHONPATH"] = REPO_ROOT
    port_a, port_b = free_port(), free_port()
    flags = ["--nnodes", "1", "--master-addr", "127.0.0.1", "--max-restarts", "1", "--rdzv-id", "envtest"]
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port_a),
         *flags, jobs.worker("env_dump.py"), str(theirs)],
        env=env, check=True, timeout=60, capture_output=True,
    )
    result = jobs.run([*flags, "--master-port", str(port_b), jobs.worker("env_dump.py"), str(ours)],
                      nproc_per_node=2, env={"OMP_NUM_THREADS": None})
    assert result.returncode == 0, result.output
    for rank in (0, 1):
        t = json.loads((theirs / f"env-{rank}.json").read_text())
        o = json.loads((ours / f"env-{rank}.json").read_text())
        assert {k for k in t if k not in env} == TORCHRUN_VARS  # the table is complete
        for key in sorted(TORCHRUN_VARS - {"MASTER_PORT", "TORCHELASTIC_ERROR_FILE"}):
            assert o.get(key) == t[key], f"rank {rank}: {key} is {o.get(key)!r}, torchrun sets {t[key]!r}"
        assert (t["MASTER_PORT"], o["MASTER_PORT"]) == (str(port_a), str(port_b))
        assert o["TORCHELASTIC_ERROR_FILE"].endswith("error.json")
        assert (o["UNICRON_JOB"], o["UNICRON_NODE"], "UNICRON_MODE" in o) == ("envtest", "node0", False)


def test_four_rank_allreduce_without_leaks(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("allreduce.py")], nproc_per_node=4)
    assert result.returncode == 0, result.output
    assert sorted(re.findall(r"rank (\d)/4 on node0: sum 6 ok", result.stdout)) == ["0", "1", "2", "3"]
    assert_no_leaks(result, ranks=range(4))


def test_worker_exit_code_ends_group(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("fail.py"), "--rank", "1", "--code", "3"], nproc_per_node=3)
    assert "rank 1 attempt 0 failing now" in result.stdout  # the fault fired
    assert result.returncode == 3, result.output
    assert result.duration_s < 30  # the survivors (sleeping 60 s) were stopped, not waited for
    summary = [line for line in result.stderr.splitlines() if line.startswith("unicron-run:   rank")]
    assert len(summary) == 1 and "rank 1 (local_rank 1, node0" in summary[0], result.stderr
    assert "exited with code 3" in summary[0]
    assert result.survivors == ()


def test_sigkilled_worker_gives_137(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("fail.py"), "--rank", "2", "--signal", "SIGKILL"], nproc_per_node=3)
    assert "rank 2 attempt 0 failing now" in result.stdout
    assert result.returncode == 137, result.output
    assert "rank 2 (local_rank 2, node0" in result.stderr and "killed by SIGKILL" in result.stderr
    assert result.survivors == ()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_launcher_stops_all_workers(jobs: JobRunner, signum: int) -> None:
    job = jobs.start([jobs.worker("sleep.py")], nproc_per_node=3)
    job.wait_for_output("ready rank", count=3)
    workers = job.worker_pids()
    assert len(workers) == 3
    t0 = time.monotonic()
    job.signal_node(0, signum)
    result = job.wait()
    assert time.monotonic() - t0 < 10, result.output
    assert result.returncode == 128 + signum, result.output
    assert f"stopped by {signal.Signals(signum).name}" in result.stderr
    assert result.survivors == () and _gone(workers, 0.0)


def test_sigkilled_launcher_takes_its_workers(jobs: JobRunner) -> None:
    job = jobs.start([jobs.worker("sleep.py")], nproc_per_node=2)
    job.wait_for_output("ready rank", count=2)
    workers = job.worker_pids()
    assert len(workers) == 2
    job.kill_node(0)
    assert _gone(workers), "workers outlived their SIGKILLed launcher"
    result = job.wait()
    assert result.returncode == -signal.SIGKILL
    assert result.survivors == ()


def test_max_restarts_restarts_the_group(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("fail.py"), "--rank", "1", "--code", "5", "--attempts", "0"],
                      nproc_per_node=2, launcher_args=["--max-restarts", "2"])
    assert "rank 1 attempt 0 failing now" in result.stdout
    assert result.returncode == 0, result.output
    # Unbuffered workers write a line and its newline separately: two lines may interleave.
    assert set(re.findall(r"rank (\d) attempt 1 all_reduce 2", result.stdout)) == {"0", "1"}, result.output
    assert "attempt 2" not in result.stdout
    assert "restarting, attempt 1 of 2" in result.stderr and "succeeded after 1 restart(s)" in result.stderr


def test_restarts_exhausted_fails_with_last_root_cause(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("fail.py"), "--rank", "0", "--code", "6", "--attempts", "0,1"],
                      nproc_per_node=2, launcher_args=["--max-restarts", "1"])
    assert "rank 0 attempt 1 failing now" in result.stdout
    assert result.returncode == 6, result.output
    assert "attempt 1) exited with code 6" in result.stderr


def test_two_nodes_allreduce(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("allreduce.py")], nproc_per_node=2, nnodes=2)
    assert [n.returncode for n in result.nodes] == [0, 0], result.output
    assert "rank 0/4 on node0" in result.nodes[0].stdout and "rank 1/4 on node0" in result.nodes[0].stdout
    assert "rank 2/4 on node1" in result.nodes[1].stdout and "rank 3/4 on node1" in result.nodes[1].stdout
    assert "store 127.0.0.1" in result.nodes[1].stderr and "(node0's)" in result.nodes[1].stderr
    assert_no_leaks(result, ranks=range(4))


def test_failure_on_one_node_ends_every_node(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("fail.py"), "--rank", "3", "--code", "4"], nproc_per_node=2, nnodes=2)
    assert "rank 3 attempt 0 failing now" in result.nodes[1].stdout
    assert [n.returncode for n in result.nodes] == [4, 4], result.output
    assert "rank 3 (local_rank 1, node1" in result.nodes[0].stderr  # node0 names the remote root cause
    assert result.duration_s < 30 and result.survivors == ()


def test_lost_node_launcher_takes_its_workers_and_fails_the_job(jobs: JobRunner) -> None:
    job = jobs.start([jobs.worker("sleep.py"), "--allreduce"], nproc_per_node=2, nnodes=2)
    job.wait_for_output("ready rank", count=2, node_rank=1)
    node1_workers = [p for p in job.worker_pids() if psutil.Process(p).ppid() == job.launcher_pids[1]]
    assert len(node1_workers) == 2
    job.kill_node(1)
    assert _gone(node1_workers), "node1's workers outlived their launcher"
    result = job.wait()
    assert result.nodes[1].returncode == -signal.SIGKILL
    assert result.nodes[0].returncode not in (0, -signal.SIGKILL), result.output
    assert result.survivors == ()


def test_unicron_mode_keeps_survivors_and_records_the_death(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("survive.py"), "1"], nproc_per_node=3, launcher_args=["--unicron"])
    expected = r"rank (\d) alive in mode unicron: store has exited of rank 1 with exit code 3"
    assert set(re.findall(expected, result.stdout)) == {"0", "2"}, result.output
    assert "survivors keep running" in result.stderr
    # The script speaks no unicron protocol (no job config), so the coordinator stops the job.
    assert "never posted the job's unicron config" in result.stderr, result.output
    assert result.returncode == 3  # the death still decides the exit status
    assert result.survivors == ()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--nnodes", "0", "WORKER"],
        ["--nnodes", "two", "WORKER"],
        ["--nnodes", "1:4", "WORKER"],
        ["--nproc-per-node", "0", "WORKER"],
        ["--nnodes", "2", "--node-rank", "2", "WORKER"],
        ["--max-restarts", "-1", "WORKER"],
        ["no_such_script.py"],
        ["--master-port", "BUSY", "WORKER"],
    ],
)
def test_bad_input_is_one_clear_line(args: list[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        argv = [port if a == "BUSY" else str(Path(__file__).parent / "workers/allreduce.py") if a == "WORKER"
                else a for a in args]
        proc = subprocess.run(launcher_argv(argv, nproc_per_node=1), capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("unicron-run: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_module_and_no_python_modes(jobs: JobRunner) -> None:
    result = jobs.run(["-m", "tests.workers.allreduce"], nproc_per_node=2)
    assert result.returncode == 0 and "rank 1/2 on node0: sum 1 ok" in result.stdout, result.output
    result = jobs.run(["--no-python", "sh", "-c", 'echo "shell rank $RANK of $WORLD_SIZE"'], nproc_per_node=2)
    assert result.returncode == 0, result.output
    assert {"shell rank 0 of 2", "shell rank 1 of 2"} <= set(result.stdout.splitlines())


def test_harness_kills_an_overrunning_job_and_shows_its_output(jobs: JobRunner) -> None:
    job = jobs.start(["--no-python", "sh", "-c", "echo still working; exec sleep 60"], nproc_per_node=2,
                     timeout_s=8)
    job.wait_for_output("still working", count=2)
    with pytest.raises(JobTimeout, match="(?s)did not end within 8s.*still working"):
        job.wait()
    assert marked_processes(job.marker) == []


def test_leak_check_catches_leaks(jobs: JobRunner) -> None:
    result = jobs.run([jobs.worker("leaky.py")], nproc_per_node=1)
    assert result.returncode == 0, result.output
    with pytest.raises(AssertionError) as caught:
        assert_no_leaks(result)
    message = str(caught.value)
    assert "rank 0: 1 process group(s) left" in message
    assert "non-daemon thread(s) left: leaky-thread" in message
    assert "fds at start" in message


def test_lost_store_host_ends_the_other_nodes(jobs: JobRunner) -> None:
    job = jobs.start([jobs.worker("sleep.py")], nproc_per_node=1, nnodes=2)
    job.wait_for_output("ready rank 0", node_rank=0)
    job.wait_for_output("ready rank 1", node_rank=1)
    job.kill_node(0)  # node0's launcher hosts the store
    result = job.wait()
    assert result.nodes[0].returncode == -signal.SIGKILL
    assert result.nodes[1].returncode == 1, result.output
    assert "lost the store" in result.nodes[1].stderr
    assert result.survivors == ()
