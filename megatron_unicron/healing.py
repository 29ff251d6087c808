"""The self-healing loop of a worker (``--unicron``): detect in-band, report, follow the decision.

Every step of the training loop (an iteration, an evaluation, a checkpoint save) runs through
:meth:`Healer.attempt`. A failure inside it does not end the process:

1. *Detect.* An exception raised in the step (megatron's own, a gloo error from a dead peer, a
   :class:`~megatron_unicron.megatron.timed_collectives.CollectiveTimeout` when a collective exceeds
   its adaptive timeout, an injected fault) is caught and classified (``taxonomy.classify_exception``).
   The iteration monitor thread reports a hang when the main thread is stuck outside any timed wait.
2. *Report* a :class:`FaultEvent` to the store and wait for the coordinator's decision for the next
   generation (the worker stays alive; its broken process groups are abandoned, not destroyed).
3. *Follow* it: reattempt in place, take a restarted peer back, move to a new layout, or stop. The
   transition (``transition.controller``) brings every live process to the same committed iteration,
   so the iteration in flight is redone from the state before it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from megatron_unicron.decision_watch import DecisionWatch
from megatron_unicron.detect.watchdog import AdaptiveTimeouts, IterationMonitor, TimeoutPolicy
from megatron_unicron.errors import UnicronError
from megatron_unicron.events import Action, Decision, ErrorKind, FaultEvent
from megatron_unicron.megatron import groups, timed_collectives
from megatron_unicron.protocol import JobChannel
from megatron_unicron.taxonomy import classify_exception, error_text
from megatron_unicron.transition.controller import TransitionReport, run_transition

if TYPE_CHECKING:
    from megatron_unicron.megatron.train import Trainer
    from megatron_unicron.testing.injector import FaultInjector

logger = logging.getLogger(__name__)

T = TypeVar("T")
EXIT_REPLACED = 75  # a process the coordinator restarts leaves with this code (EX_TEMPFAIL)


class JobStopped(UnicronError):
    """The coordinator stopped the job (its reason says why and how to resume)."""


class TrainingDone(Exception):
    """A warm spare learns that training finished without it."""


def _release_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames that ``error`` and its causes unwound through.

    Those frames hold the failed step's model, optimizer, process groups and pending gloo work. A warm
    spare stays in :meth:`Healer.recover` until it trains again, or until the job ends: ``TrainingDone``
    or ``JobStopped`` then carry the error as their ``__context__``. Without this, the broken
    generation's groups outlive their release from the graveyard (``groups.release_drained``), each
    with its sockets, pipes and threads. The frames' code and line numbers stay: tracebacks still print.
    """
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)  # skips frames still executing (the caller's)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


class Healer:
    """Runs training steps for one worker, recovering from failures as the coordinator decides."""

    def __init__(
        self,
        trainer: Trainer,
        channel: JobChannel,
        *,
        launch_rank: int,
        node: str,
        generation: int,
        injector: FaultInjector | None = None,
        decision_timeout: timedelta = timedelta(minutes=10),
    ) -> None:
        self.trainer = trainer
        self.channel = channel
        self.launch_rank = launch_rank
        self.node = node
        self.generation = generation
        self.injector = injector
        self.decision_timeout = decision_timeout
        detection = trainer.args.unicron.detection
        self.timeouts = AdaptiveTimeouts(
            TimeoutPolicy(
                slow_factor=detection.slow_factor,
                warmup_floor_s=detection.warmup_floor_s,
                min_timeout_s=detection.min_timeout_s,
            )
        )
        self.relaxed_s = detection.pg_timeout_s
        timed_collectives.apply(self.timeouts, superseded=self._next_generation_decided)
        # The monitor thread's own store connection (a client connection is not shared between threads).
        self.monitor_channel = JobChannel(channel.store.clone(), channel.keys)
        self.monitor = IterationMonitor(
            self.timeouts,
            on_hang=self._report_hang,
            in_timed_wait=timed_collectives.in_timed_wait,
            beat=lambda: self.monitor_channel.post_beat(launch_rank),
        )
        # Planned switches are looked up before every iteration: from a poller, not a store round trip.
        self.next_decision = DecisionWatch(channel, JobChannel(channel.store.clone(), channel.keys))
        self.next_decision.start()
        self.resume_pending = False
        self.transitions: list[TransitionReport] = []
        self._entering: int | None = None  # the generation a transition in progress enters

    # ------------------------------------------------------------------ the step wrapper
    def attempt(self, step: Callable[[], T]) -> T:
        """Run ``step``; on failure recover as decided and run it again."""
        is_iteration = getattr(step, "__func__", None) is type(self.trainer).train_step
        if is_iteration:
            self._maybe_switch(self.trainer.progress.iteration)
        while True:
            try:
                if is_iteration:
                    self.monitor.iteration_started(self.trainer.progress.iteration + 1)
                started = time.monotonic()
                if is_iteration:
                    result = step()
                else:  # evaluations and saves: rare and uneven, no statistics to judge them by
                    with self.timeouts.relaxed(self.relaxed_s):
                        result = step()
                if is_iteration:
                    self.monitor.iteration_finished()
                    self._after_iteration(time.monotonic() - started)
                return result
            except (KeyboardInterrupt, SystemExit, JobStopped, TrainingDone):
                raise
            except Exception as error:  # every other failure of a step is recoverable in-band
                self.monitor.pause()
                self.recover(error)

    def _after_iteration(self, seconds: float) -> None:
        if self.injector is not None and self.injector.slow_factor > 1.0:
            time.sleep(self.injector.delay_for(seconds))
        iteration = self.trainer.progress.iteration
        self.channel.post_progress(self.launch_rank, iteration, self.generation)
        if self.resume_pending:
            self.channel.post_resumed(self.generation, self.launch_rank, iteration)
            self.resume_pending = False

    def _maybe_switch(self, iteration: int) -> None:
        """Before an iteration: enter a planned generation (a scale-up) once its iteration has come.

        Checked before the next step rather than after the last one, so the finished iteration is still
        reported by the rank that reported it.
        """
        decision = self.next_decision.decision(self.generation + 1)
        if decision is None or decision.at_iteration is None or iteration < decision.at_iteration:
            return
        try:
            report = self.follow(decision, broken=False)
        except Exception as error:  # the planned switch failed part-way: recover from it like a fault
            self._transition_failed(decision, error)
            self._follow_decisions(broken=True, error=error)
            return
        if not report.member:
            self.wait_as_spare()

    # ------------------------------------------------------------------ recovery
    def _event(self, kind: ErrorKind, message: str) -> FaultEvent:
        injected = self.injector.t_fault if self.injector is not None else None
        return FaultEvent(
            job=self.channel.keys.job,
            kind=kind,
            rank=self.launch_rank,
            node=self.node,
            generation=self.generation,
            message=message[:500],
            iteration=self.trainer.phases.iteration,
            phase=self.trainer.phases.phase,
            source="worker",
            t_fault=injected,
            t_detected=time.time(),
        )

    def _report_hang(self, iteration: int, elapsed: float) -> None:
        """Iteration monitor: the main thread is stuck outside any timed wait."""
        message = f"{error_text(ErrorKind.TASK_HANG)}: iteration {iteration} running for {elapsed:.2f}s"
        self.monitor_channel.report(self._event(ErrorKind.TASK_HANG, message))
        if groups.abort_communicators():  # NCCL: unblock the main thread; gloo's waits time out by themselves
            logger.warning("unicron: aborted the NCCL communicators of iteration %d", iteration)

    def _next_generation_decided(self) -> bool:
        """Whether the job decided to leave this generation now (not a switch planned for later); while
        a transition runs, whether it decided to leave the generation being entered."""
        current = self.generation if self._entering is None else self._entering
        decision = self.next_decision.cached(current + 1, hurry=True)
        return decision is not None and decision.at_iteration is None

    def recover(self, error: BaseException) -> None:
        """Report ``error``, then follow decisions until this process trains again."""
        if isinstance(error, timed_collectives.Superseded):  # the incident is decided: nothing to report
            logger.info("unicron: rank %d %s", self.launch_rank, error)
            self._follow_decisions(broken=True, error=error)
            return
        kind = classify_exception(error)
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        event = self._event(kind, f"{type(error).__name__}: {first_line}")
        phase = event.phase.value if event.phase else "-"
        logger.warning(
            "unicron: rank %d detected %s at iteration %s (%s): %s",
            self.launch_rank, kind.value, event.iteration, phase, first_line,
        )  # fmt: skip
        self.channel.report(event)
        self._follow_decisions(broken=True, error=error)

    def _follow_decisions(self, *, broken: bool, error: BaseException) -> None:
        """Follow the coordinator's decisions after ``error`` until this process trains again."""
        while True:
            decision = self.channel.wait_decision(self.generation + 1, self.decision_timeout)
            if decision is None or decision.action is Action.STOP:
                self._stop(decision)
            assert decision is not None
            if self.launch_rank in decision.restart or self.launch_rank not in decision.live:
                self._make_way(decision)
            try:
                report = self.follow(decision, broken=broken)
            except Exception as again:  # a failure while recovering: report it, wait for the next decision
                self._transition_failed(decision, again)
                continue
            broken = False
            if report.member:
                return
            # A spare waits in here, possibly to the end of the job: drop what the error's frames hold,
            # as a member does by returning. Not before the transition: freeing the broken generation's
            # model and pending work while the new world forms broke restarts (kill in an all-reduce).
            _release_frames(error)
            logger.info(
                "unicron: rank %d is a warm spare in generation %d", self.launch_rank, self.generation
            )

    def _transition_failed(self, decision: Decision, error: BaseException) -> None:
        """Report a failure while entering ``decision.generation``; the next decision is awaited next."""
        self.generation = decision.generation
        built = self.trainer.generation
        if built is not None and built.number == decision.generation:
            # Built for the new layout but never filled: freshly initialised weights, not the job's
            # state; it must not be offered as a source in the next transition.
            self.trainer.leave_generation(broken=True)
        kind = classify_exception(error)
        logger.warning(
            "unicron: rank %d failed entering generation %d: %s: %s",
            self.launch_rank,
            decision.generation,
            type(error).__name__,
            (str(error).splitlines() or [""])[0],
        )
        self.channel.report(self._event(kind, f"during transition: {type(error).__name__}: {error}"))

    def follow(self, decision: Decision, *, broken: bool) -> TransitionReport:
        """Enter ``decision.generation`` (the trainer may hold no state: a restarted process)."""
        self._entering = decision.generation
        try:
            report = run_transition(
                self.trainer,
                self.trainer.guard,
                decision,
                launch_rank=self.launch_rank,
                node=self.node,
                broken=broken,
                timeout=self.trainer.timeout,
                settled_timeout=self.trainer.op_timeout,
            )
        finally:
            self._entering = None
        self.generation = decision.generation
        self.timeouts.reset()  # the statistics of the old layout do not describe the new one
        self.transitions.append(report)
        self.resume_pending = report.member
        self._log_transition(decision, report)
        if report.member and self.trainer.is_reporting_rank():
            total = sum(report.seconds.values())
            print(
                f"unicron: generation {decision.generation} ({decision.action.value}, incident "
                f"{decision.incident}): layout {decision.layout}, resumed after iteration "
                f"{report.resume_iteration}, transition {total:.2f}s "
                f"({', '.join(f'{k} {v:.2f}' for k, v in report.seconds.items())}), "
                f"{report.bytes_moved} bytes moved",
                flush=True,
            )
        return report

    def _log_transition(self, decision: Decision, report: TransitionReport) -> None:
        path = self.trainer.args.unicron.transition_log
        if path:
            record = {"rank": self.launch_rank, "action": decision.action.value, "time": time.time()}
            record.update(incident=decision.incident, **dataclasses.asdict(report))
            with open(path, "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")

    def _make_way(self, decision: Decision) -> None:
        """This process is replaced by a fresh one, or excluded (a bad device): leave at once."""
        why = "restarted" if self.launch_rank in decision.restart else "excluded"
        logger.warning(
            "unicron: rank %d is %s for generation %d; exiting", self.launch_rank, why, decision.generation
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_REPLACED)

    def _stop(self, decision: Decision | None) -> None:
        stopped = self.channel.stopped()
        if stopped is None and self.channel.is_done():
            raise TrainingDone()
        reason = (decision.reason if decision is not None else "") or (stopped or {}).get("reason", "stopped")
        raise JobStopped(f"the job was stopped: {reason}")

    def wait_as_spare(self) -> None:
        """A spare (or restarted) process without a layout: follow decisions until it trains again."""
        while self.trainer.generation is None:
            decision = self.channel.wait_decision(self.generation + 1, self.decision_timeout)
            if decision is None or decision.action is Action.STOP:
                self._stop(decision)
            assert decision is not None
            if self.launch_rank not in decision.live:
                self.generation = decision.generation  # a generation without this process: wait on
                continue
            try:
                self.follow(decision, broken=False)
            except Exception as error:  # as in recover: report it, wait for the next decision
                self._transition_failed(decision, error)

    def close(self) -> None:
        """Stop the monitor thread and restore the untimed collectives."""
        self.monitor.close()
        self.monitor_channel.store.close()
        self.next_decision.close()
        self.next_decision.poll_channel.store.close()
        timed_collectives.revert()

    def summary(self) -> dict[str, Any]:
        """What this worker recovered from (for logs and tests)."""
        return {"generation": self.generation, "transitions": len(self.transitions)}
