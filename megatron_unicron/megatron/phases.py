"""Where in an iteration a worker is: forward, backward, gradient all-reduce, optimizer, p2p, save.

The trainer marks the phases it drives itself (forward steps, the gradient all-reduce of
``finalize_model_grads``, the optimizer step, checkpoint saves); backward is marked by a gradient hook on
each forward output, and pipeline point-to-point by wrapping megatron's ``P2PCommunicator._communicate``
(the only path of its p2p traffic). Listeners hear every phase entry with the iteration in flight: the
fault injector fires there, and a failure report names the phase it happened in.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from megatron_unicron.events import Phase
from megatron_unicron.megatron.patching import PatchSet, PatchSite

Listener = Callable[[int, Phase], None]

SITES: tuple[PatchSite, ...] = (
    PatchSite(
        "megatron.core.pipeline_parallel.p2p_communication:P2PCommunicator",
        "_communicate",
        "marks the p2p phase of pipeline sends and receives",
    ),
)


class PhaseTracker:
    """The current phase and iteration (1-based, the one in flight), and who wants to hear about them."""

    def __init__(self) -> None:
        self.phase = Phase.OTHER
        self.iteration = 0
        self.listeners: list[Listener] = []
        self._patches = PatchSet("megatron_unicron phase marks")

    def enter(self, phase: Phase) -> None:
        """Mark ``phase`` as current and tell the listeners."""
        self.phase = phase
        for listener in self.listeners:
            listener(self.iteration, phase)

    @contextlib.contextmanager
    def inside(self, phase: Phase) -> Iterator[None]:
        """Run a block in ``phase``, then return to the enclosing phase."""
        previous = self.phase
        self.enter(phase)
        try:
            yield
        finally:
            self.phase = previous

    def mark_backward(self, output: Any) -> None:
        """Enter the backward phase when the gradient of ``output`` starts flowing."""
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._backward_hook)

    def _backward_hook(self, grad: torch.Tensor) -> torch.Tensor:
        self.enter(Phase.BACKWARD)
        return grad

    def wrap_forward_step(self, forward_step: Callable[..., Any]) -> Callable[..., Any]:
        """A forward-step function that runs in the forward phase and marks backward on its output."""

        @functools.wraps(forward_step)
        def wrapped(data_iterator: Any, model: Any) -> Any:
            with self.inside(Phase.FORWARD):
                output, loss_func = forward_step(data_iterator, model)
            self.mark_backward(output)
            return output, loss_func

        return wrapped

    def wrap(self, phase: Phase, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function`` run inside ``phase``."""

        @functools.wraps(function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.inside(phase):
                return function(*args, **kwargs)

        return wrapped

    def install_p2p_mark(self) -> None:
        """Mark megatron's pipeline point-to-point communication as the p2p phase."""
        if self._patches.applied:
            return
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        self._patches.replace(
            P2PCommunicator, "_communicate", self.wrap(Phase.P2P, P2PCommunicator._communicate)
        )

    def uninstall(self) -> None:
        """Remove the p2p mark."""
        self._patches.revert()
