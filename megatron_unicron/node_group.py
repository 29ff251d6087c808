"""How the node agents of one job meet through the store: registration, leases, attempts, leaving.

Protocol (keys in ``store.JobKeys`` / ``store.AttemptKeys``):

- *register*: each agent claims ``nodes/<node>/owner`` (first writer wins, so two launchers cannot both
  be node 1), writes its lease, and checks its shape (nnodes, nproc_per_node, ...) against node 0's
  ``spec``. A lease is a wall-clock timestamp renewed every ``lease_interval_s`` by a thread.
- *open an attempt*: every agent sets ``attempt<a>/ready/<node>``; node 0 waits for all of them,
  clears the workers' rendezvous keys of the previous attempt and sets ``attempt<a>/go``.
- *fail*: the agent that sees a failure publishes it under ``attempt<a>/failure`` (first writer wins:
  the root cause); everyone polls it. ``abort`` (first writer wins) ends the job on every node.
- *finish*: an agent whose workers all succeeded sets ``attempt<a>/done/<node>`` and waits for all.
- *leave*: ``nodes/<node>/left``; node 0 hosts the store, so it waits for the others to leave first.

While waiting for a peer, a peer that left or whose lease expired ends the wait with ``AgentError``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from megatron_unicron.store import (
    AttemptKeys,
    JobKeys,
    Store,
    StoreError,
    clear_worker_keys,
    lease_age,
    renew_lease,
)
from megatron_unicron.workers import WorkerExit

log = logging.getLogger(__name__)


class AgentError(RuntimeError):
    """The agent cannot go on (a peer node is missing or inconsistent); the message says why."""


class NodeGroup:
    """One node's side of the protocol; ``idle(seconds)`` is called between polls (it may raise)."""

    def __init__(
        self, store: Store, keys: JobKeys, *, node_rank: int, nnodes: int, join_timeout_s: float,
        lease_interval_s: float, lease_timeout_s: float, poll_interval_s: float,
        idle: Callable[[float], None], tolerate_lost_nodes: bool = False,
    ) -> None:
        self.store = store
        self.keys = keys
        # --unicron: a lost node is the coordinator's business (the job goes on without it), so waits
        # for every node skip a node whose lease expired instead of failing on it.
        self.tolerate_lost_nodes = tolerate_lost_nodes
        self.rejoined = False  # this launcher took over a lost node's place in a running job
        self.node_rank = node_rank
        self.node = f"node{node_rank}"
        self.nodes = [f"node{k}" for k in range(nnodes)]
        self.join_timeout_s = join_timeout_s
        self.lease_interval_s = lease_interval_s
        self.lease_timeout_s = lease_timeout_s
        self.poll_interval_s = poll_interval_s
        self._idle = idle
        self._lease_stop = threading.Event()
        self._lease_thread: threading.Thread | None = None

    # -------------------------------------------------------------------------------- registration

    def register(self, spec: Mapping[str, Any]) -> None:
        """Claim this node's id, start the lease, and check ``spec`` against node 0's."""
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        held = self.store.compare_set(self.keys.node_owner(self.node), "", token).decode()
        if held != token and self._may_take_over(held):
            # --unicron: a node that was lost comes back (a new launcher for the same --node-rank)
            held = self.store.compare_set(self.keys.node_owner(self.node), held, token).decode()
            self.rejoined = held == token
        if held != token:
            raise AgentError(f"{self.node} of job {self.keys.job!r} is already registered (by {held}); "
                             "give every launcher its own --node-rank")
        renew_lease(self.store, self.keys.lease(self.node))
        self._lease_thread = threading.Thread(target=self._renew_lease, name="unicron-lease", daemon=True)
        self._lease_thread.start()
        if self.node_rank == 0:
            self.store.set(self.keys.spec, json.dumps(dict(spec), sort_keys=True))
            return
        self._poll(lambda: self.store.check([self.keys.spec]), self.join_timeout_s, "node0 to register")
        theirs = json.loads(self.store.get(self.keys.spec, timedelta(seconds=10)))
        diff = [f"{k}={v} (node0 has {theirs.get(k)})" for k, v in spec.items() if theirs.get(k) != v]
        if diff:
            raise AgentError(f"{self.node} is launched differently from node0: {', '.join(diff)}")

    def _may_take_over(self, held: str) -> bool:
        """Whether a registration may replace ``held``: a lost node's, in a job that tolerates losses."""
        if not self.tolerate_lost_nodes or self.node_rank == 0:
            return False
        age = lease_age(self.store, self.keys.lease(self.node))
        return age is not None and age > self.lease_timeout_s and not self.store.check([self.keys.abort])

    def _renew_lease(self) -> None:
        try:
            store = self.store.clone()  # a connection of its own: the main one may block in a wait
        except StoreError:
            return
        try:
            while not self._lease_stop.wait(self.lease_interval_s):
                renew_lease(store, self.keys.lease(self.node))
        except StoreError as e:
            log.debug("lease renewal stopped: %s", e)
        finally:
            store.close()

    # ------------------------------------------------------------------------------------ attempts

    def open_attempt(self, attempt: int) -> None:
        """Wait until every node is ready for ``attempt`` (node 0 clears the old worker keys first)."""
        keys = self.keys.attempt(attempt)
        self.store.set(keys.ready(self.node), "1")
        if self.node_rank != 0:
            self._poll(lambda: self.store.check([keys.go]), self.join_timeout_s,
                       f"node0 to open attempt {attempt}")
            return

        def missing() -> str:
            return ", ".join(n for n in self.nodes if not self.store.check([keys.ready(n)]))

        self._poll(lambda: self._settled(keys.ready), self.join_timeout_s,
                   f"{len(self.nodes)} nodes to join attempt {attempt}", missing)
        cleared = clear_worker_keys(self.store)
        log.debug("cleared %d worker key(s) before attempt %d", cleared, attempt)
        self.store.set(keys.go, "1")

    def publish_failure(self, attempt: int, worker_exit: WorkerExit) -> WorkerExit:
        """Publish a failure for ``attempt``; return the attempt's root cause (the first published)."""
        held = self.store.compare_set(self.keys.attempt(attempt).failure, "", worker_exit.to_json())
        return WorkerExit.from_json(held)

    def failure(self, attempt: int) -> WorkerExit | None:
        """The root cause of ``attempt``'s failure, if one was published; raise if the job was aborted."""
        self.check_abort()
        raw = self.store.try_get(self.keys.attempt(attempt).failure)
        return WorkerExit.from_json(raw) if raw else None

    def finish_attempt(self, attempt: int) -> WorkerExit | None:
        """Mark this node's workers done; wait for every node's, or return the attempt's failure."""
        keys: AttemptKeys = self.keys.attempt(attempt)
        self.store.set(keys.done(self.node), "1")
        found: list[WorkerExit] = []

        def settled() -> bool:
            root = self.failure(attempt)
            if root is not None:
                found.append(root)
                return True
            return self._settled(keys.done)

        self._poll(settled, self.join_timeout_s, f"every node to finish attempt {attempt}")
        return found[0] if found else None

    # ------------------------------------------------------------------------------ abort and leave

    def check_abort(self) -> None:
        """Raise ``AgentError`` if some node aborted the job."""
        reason = self.store.try_get(self.keys.abort)
        if reason is not None:
            raise AgentError(f"the job was aborted ({reason.decode()})")

    def abort(self, reason: str) -> None:
        """Tell every node to stop (the first reason wins); never raises."""
        try:
            self.store.compare_set(self.keys.abort, "", reason)
        except StoreError as e:
            log.debug("could not publish the abort: %s", e)

    def leave(self, outcome: str, grace_s: float) -> None:
        """Announce this node is out and stop the lease; node 0 first waits (up to ``grace_s`` plus two
        lease timeouts) for the others, since they lose the store when it exits. Never raises."""
        try:
            self.store.set(self.keys.left(self.node), outcome)
            if self.node_rank == 0:
                deadline = time.monotonic() + grace_s + 2 * self.lease_timeout_s
                while (waiting := self._still_here()) and time.monotonic() < deadline:
                    time.sleep(self.poll_interval_s)
                if waiting:
                    log.warning("leaving while %s may still use the store", ", ".join(waiting))
        except StoreError as e:
            log.debug("could not announce leaving: %s", e)
        finally:
            self._lease_stop.set()
            if self._lease_thread is not None:
                self._lease_thread.join()

    def _still_here(self) -> list[str]:
        """Other registered nodes that neither left nor let their lease expire."""
        here = []
        for node in self.nodes:
            if node == self.node or self.store.check([self.keys.left(node)]):
                continue
            age = lease_age(self.store, self.keys.lease(node))
            if age is not None and age <= self.lease_timeout_s:
                here.append(node)
        return here

    # ----------------------------------------------------------------------------------- waiting

    def _settled(self, key_of: Callable[[str], str]) -> bool:
        """Whether every node set ``key_of(node)``; raise if a node we wait for is gone."""
        pending = [n for n in self.nodes if not self.store.check([key_of(n)])]
        for node in list(pending):
            left = self.store.try_get(self.keys.left(node))
            if left is not None:
                raise AgentError(f"{node} left the job ({left.decode()})")
            age = lease_age(self.store, self.keys.lease(node))
            if age is not None and age > self.lease_timeout_s:
                if self.tolerate_lost_nodes:
                    pending.remove(node)
                    continue
                raise AgentError(f"{node} is gone (its lease expired {age:.1f}s ago)")
        return not pending

    def _poll(self, ready: Callable[[], bool], timeout_s: float, what: str,
              missing: Callable[[], str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_abort()
            if ready():
                return
            if time.monotonic() >= deadline:
                detail = f" (missing: {missing()})" if missing is not None else ""
                raise AgentError(f"timed out after {timeout_s:g}s waiting for {what}{detail}")
            self._idle(self.poll_interval_s)
