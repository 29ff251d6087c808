"""Step guard: the state before the optimizer step, so a failed iteration is redone from a clean state.

An iteration mutates the model only in ``optimizer.step()``; until then a failure leaves parameters,
Adam state and the LR schedule as they were, and redoing the iteration needs only the RNG state of its
start. But a failure *inside* the step can leave ranks at two different iterations: ranks that got past
the step's last collective (the gradient-norm all-reduce) finish their update, the others do not. So
right before the step every rank copies what the step changes (inner optimizer parameters and state,
model parameters, the LR scheduler and the loss scaler) and the RNG of the iteration's start. When
recovering, the survivors agree on the oldest iteration any of them holds; a rank one step ahead puts
its copy back. State is therefore never mixed from two iterations: every rank resumes from the end of
the same iteration.

The copy costs one fused memcpy of the optimizer's tensors per iteration into buffers reused from the
previous one (host memory on CPU), plus the model parameters the optimizer does not step itself; which
tensors those are is found again only when the optimizer's state changes shape (``_StateShape``). It
is taken only with ``--unicron`` (without it no recovery ever undoes a step). When an in-memory
snapshot of the same committed iteration has just been copied (``--unicron-snapshot-interval 1``), the
guard takes the tensors that snapshot holds from its slot instead of copying them a second time
(``copy_source``); the slot stays untouched until the next snapshot, which is written after the next
commit, when this copy is no longer needed.
"""

from __future__ import annotations

import copy
import operator
import random
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class RngState:
    """Every generator a step draws from."""

    python: Any
    numpy: Any
    torch_cpu: torch.Tensor
    cuda: torch.Tensor | None
    tracker: dict[str, torch.Tensor]

    @classmethod
    def capture(cls) -> RngState:
        """The current states."""
        from megatron.core import tensor_parallel

        return cls(
            python=random.getstate(),
            numpy=np.random.get_state(),
            torch_cpu=torch.get_rng_state(),
            cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            tracker={k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
        )

    def restore(self) -> None:
        """Put the captured states back."""
        from megatron.core import tensor_parallel

        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)
        tensor_parallel.get_cuda_rng_tracker().set_states({k: v.clone() for k, v in self.tracker.items()})


def restore_scheduler(scheduler: Any, state: dict[str, Any]) -> None:
    """Load a scheduler state into a live scheduler (megatron's ``load_state_dict`` adds to its steps)."""
    scheduler.num_steps = 0
    scheduler.load_state_dict(copy.deepcopy(state))


def _inner_optimizers(optimizer: Any) -> list[Any]:
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def _optimizer_tensors(optimizer: Any) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                tensors.append(param.data)
                tensors.extend(v for v in inner.state.get(param, {}).values() if isinstance(v, torch.Tensor))
    return tensors


@dataclass(frozen=True)
class _StateShape:
    """What can change which tensors an optimizer holds, cheap to compare every iteration.

    torch's optimizers update their state tensors in place; they add state at a parameter's first step
    (more entries) and ``load_state_dict`` replaces the state dict and the groups (other objects)."""

    objects: tuple[Any, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, optimizer: Any) -> _StateShape:
        """The description of ``optimizer`` now."""
        objects: list[Any] = []
        sizes: list[int] = []
        for inner in _inner_optimizers(optimizer):
            state, groups = inner.state, inner.param_groups
            objects += (state, groups, *groups)
            sizes += (len(state), sum(map(len, state.values())), *(len(g["params"]) for g in groups))
        return cls(tuple(objects), tuple(sizes))

    def matches(self, other: _StateShape) -> bool:
        """Whether ``other`` describes the same objects (by identity) with the same sizes."""
        return (self.sizes == other.sizes and len(self.objects) == len(other.objects)
                and all(map(operator.is_, self.objects, other.objects)))  # fmt: skip


@dataclass(frozen=True)
class KeptCopy:
    """Copies of live tensors kept elsewhere (a finished snapshot): ``copies[i]`` holds the bytes
    ``tensors[i]`` had after the commit of ``iteration`` (committed count)."""

    iteration: int
    tensors: Sequence[torch.Tensor]
    copies: Sequence[torch.Tensor]


def _bytes_key(t: torch.Tensor) -> tuple[int, torch.dtype, int]:
    return t.data_ptr(), t.dtype, t.numel()


def _copies_in(kept: KeptCopy, sources: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """For each of ``sources``, the kept copy of exactly its bytes (viewed in its shape), or None.

    A kept tensor may be a reshaped view of a source (megatron's sharded state adds a layer axis)."""
    found = {
        _bytes_key(t): c
        for t, c in zip(kept.tensors, kept.copies, strict=True)
        if t.is_contiguous() and c.is_contiguous()
    }
    covered: list[torch.Tensor | None] = []
    for source in sources:
        copy_ = found.get(_bytes_key(source)) if source.is_contiguous() else None
        covered.append(copy_.view(source.shape) if copy_ is not None else None)
    return covered


def _fits(buffers: list[torch.Tensor], sources: list[torch.Tensor]) -> bool:
    return len(buffers) == len(sources) and all(
        b.shape == s.shape and b.dtype == s.dtype for b, s in zip(buffers, sources, strict=True)
    )


class _Buffers:
    """Copies of a list of tensors, into buffers reused from the previous step when they still fit (one
    fused copy, no allocation: per-tensor clones of a few hundred small tensors cost more than the
    bytes). Given the very list they were last made from, their shapes are not checked again."""

    def __init__(self) -> None:
        self.copies: list[torch.Tensor] | None = None
        self._made_from: list[torch.Tensor] | None = None

    def take(self, sources: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of ``sources`` as they are now."""
        copies = self.copies
        if copies is not None and (sources is self._made_from or _fits(copies, sources)):
            if copies:
                with torch.no_grad():
                    torch._foreach_copy_(copies, sources)
        else:
            copies = self.copies = [s.detach().clone() for s in sources]
        self._made_from = sources
        return copies

    def forget_sources(self) -> None:
        """Hold no reference to the live tensors last copied (their shapes are checked next time)."""
        self._made_from = None


@dataclass(frozen=True)
class _Sources:
    """The tensors a step of one model and optimizer state changes, in the pre-step copy's order."""

    shape: _StateShape
    model: weakref.ref[Any]
    tensors: list[torch.Tensor]
    optimizer_count: int
    """``tensors[:optimizer_count]`` are the optimizer's (``_optimizer_tensors``), the rest the model's."""
    model_indices: list[int]
    """Which of the model's parameters the rest are (``PreStepCopy.model_indices``)."""


@dataclass
class PreStepCopy:
    """What the optimizer step of ``iteration`` (0-based, not yet committed) will change."""

    iteration: int
    rng: RngState
    optimizer_tensors: list[torch.Tensor]
    model_tensors: list[torch.Tensor]
    model_indices: list[int]
    """Which model parameters ``model_tensors`` copy: those that are not an optimizer tensor already
    (with fp32 training the optimizer steps the model's own parameters; fp16/bf16 has fp32 masters)."""
    scheduler: dict[str, Any]
    grad_scaler: dict[str, Any] | None
    consumed_train_samples: int
    floating_point_operations: float


class StepGuard:
    """Keeps the RNG of the iteration in flight and the pre-step copy of the last step begun."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.iteration_start: RngState | None = None
        self.pre_step: PreStepCopy | None = None
        self.copy_source: Callable[[int], KeptCopy | None] | None = None
        """Asked before each step for a kept copy of the committed iteration (the snapshot service)."""
        self._own = _Buffers()
        self._rest = _Buffers()  # what a kept copy lacks (Adam's step counters)
        self.kept_tensors = 0
        """How many tensors the pre-step copies took from kept copies instead of copying them."""
        # Which source tensors a kept copy holds and which it lacks, found once per kept copy (the two
        # snapshot slots take turns) and source list.
        self._covered_by: list[
            tuple[Sequence[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor]]
        ] = []
        # What the step changes (the optimizer's tensors, then the model's parameters it does not step),
        # found once per model and optimizer state: walking them every iteration cost more than the copy.
        self._sources: _Sources | None = None

    def _sources_of(self, bundle: Any) -> _Sources:
        """What the step of ``bundle`` changes."""
        shape, cached = _StateShape.of(bundle.optimizer), self._sources
        if cached is not None and cached.model() is bundle.gpt and cached.shape.matches(shape):
            return cached
        optimizer_tensors = _optimizer_tensors(bundle.optimizer)
        stepped = {t.data_ptr() for t in optimizer_tensors}
        params = list(bundle.gpt.parameters())
        own = [i for i, p in enumerate(params) if p.data_ptr() not in stepped]
        tensors = [*optimizer_tensors, *(params[i] for i in own)]
        self._sources = _Sources(shape, weakref.ref(bundle.gpt), tensors, len(optimizer_tensors), own)
        return self._sources

    def forget_layout(self) -> None:
        """Drop what was found about the current model and optimizer (their generation is ending): the
        optimizer's state and groups held here can reach its process groups, which must close now."""
        self._sources = None
        self._covered_by = []
        self._own.forget_sources()
        self._rest.forget_sources()

    def begin_iteration(self) -> None:
        """Record the RNG at the start of an iteration (to redo it exactly)."""
        if self.enabled:
            self.iteration_start = RngState.capture()

    def before_step(self, bundle: Any, progress: Any) -> None:
        """Copy what ``optimizer.step()`` of the in-flight iteration is about to change."""
        if not self.enabled:
            return
        assert self.iteration_start is not None
        scaler = getattr(bundle.optimizer, "grad_scaler", None)
        sources = self._sources_of(bundle)
        saved = self._save(sources.tensors, progress.iteration)
        self.pre_step = PreStepCopy(
            iteration=progress.iteration,
            rng=self.iteration_start,
            optimizer_tensors=saved[: sources.optimizer_count],
            model_tensors=saved[sources.optimizer_count :],
            model_indices=sources.model_indices,
            scheduler=copy.deepcopy(bundle.scheduler.state_dict()),
            grad_scaler=copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
            consumed_train_samples=progress.consumed_train_samples,
            floating_point_operations=progress.floating_point_operations,
        )

    def _save(self, sources: list[torch.Tensor], iteration: int) -> list[torch.Tensor]:
        """Copies of ``sources`` as they are now: a kept copy's where it holds them, else our own."""
        kept = self.copy_source(iteration) if self.copy_source is not None else None
        if kept is None or kept.iteration != iteration:
            return list(self._own.take(sources))
        known = [entry for entry in self._covered_by if entry[0] is kept.copies and entry[1] is sources]
        if known:
            _, _, covered, rest = known[0]
        else:
            covered = _copies_in(kept, sources)
            rest = [s for s, c in zip(sources, covered, strict=True) if c is None]
            self._covered_by = [*self._covered_by[-1:], (kept.copies, sources, covered, rest)]
        copies = self._rest.take(rest)
        self.kept_tensors += len(sources) - len(copies)
        own = iter(copies)
        return [c if c is not None else next(own) for c in covered]

    def rewind_in_flight(self) -> None:
        """Undo what the in-flight (uncommitted) iteration changed: only the RNG."""
        if self.iteration_start is not None:
            self.iteration_start.restore()

    def can_undo_step(self, iteration: int) -> bool:
        """Whether the committed step of ``iteration`` can be undone on this rank."""
        return self.pre_step is not None and self.pre_step.iteration == iteration

    def undo_step(self, bundle: Any, progress: Any) -> None:
        """Put back the state from before the last committed step; progress goes back one iteration."""
        copy_ = self.pre_step
        assert copy_ is not None
        with torch.no_grad():
            for live, saved in zip(
                _optimizer_tensors(bundle.optimizer), copy_.optimizer_tensors, strict=True
            ):
                live.copy_(saved)
            params = list(bundle.gpt.parameters())
            for index, saved in zip(copy_.model_indices, copy_.model_tensors, strict=True):
                params[index].copy_(saved)
        restore_scheduler(bundle.scheduler, copy_.scheduler)
        scaler = getattr(bundle.optimizer, "grad_scaler", None)
        if scaler is not None and copy_.grad_scaler is not None:
            scaler.load_state_dict(copy.deepcopy(copy_.grad_scaler))
        copy_.rng.restore()
        progress.iteration = copy_.iteration
        progress.consumed_train_samples = copy_.consumed_train_samples
        progress.floating_point_operations = copy_.floating_point_operations
        self.pre_step = None
