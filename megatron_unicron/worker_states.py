"""The agents' view of their worker processes, published in the store for the coordinator.

A hung rank says nothing, so silence alone cannot tell a hang from a rank still inside a timed wait.
The agent of each node can tell: it reads its workers' process state (``T`` = stopped, e.g. by
SIGSTOP) and writes it under ``unicron/<job>/agent/<node>/workers`` whenever it changes (checked every
agent poll, ~0.1 s) and at least once a second: ``{"t": wall_time, "workers": [WorkerState...]}``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import psutil

from megatron_unicron.incidents import EXITED, RUNNING, STOPPED, WorkerState
from megatron_unicron.protocol import JobChannel


def process_status(pid: int) -> str:
    """``running``, ``stopped`` (state T/t: SIGSTOP or a tracer) or ``exited`` (gone, or a zombie)."""
    try:
        status = psutil.Process(pid).status()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return EXITED
    if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return STOPPED
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return EXITED
    return RUNNING


def states_key(channel: JobChannel, node: str) -> str:
    """Where ``node``'s agent publishes its workers' states."""
    return f"{channel.prefix}/agent/{node}/workers"


def post_states(channel: JobChannel, node: str, states: Iterable[WorkerState]) -> None:
    """Publish the states of ``node``'s workers."""
    record = {"t": time.time(), "workers": [s.to_dict() for s in states]}
    channel.store.set(states_key(channel, node), json.dumps(record, sort_keys=True))


def read_states(channel: JobChannel, nodes: Iterable[str]) -> dict[int, WorkerState]:
    """The latest published state of every worker of ``nodes``, by launch rank."""
    found: dict[int, WorkerState] = {}
    for node in nodes:
        raw = channel.store.try_get(states_key(channel, node))
        if raw is None:
            continue
        for item in json.loads(raw)["workers"]:
            state = WorkerState.from_dict(item)
            found[state.rank] = state
    return found

