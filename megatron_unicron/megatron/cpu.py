"""The CPU patch: lets megatron-core train on CPU with gloo when CUDA is unavailable.

megatron-core assumes CUDA in a few dozen places (tensor factories with ``device="cuda"``,
``torch.cuda.current_device()``, CUDA RNG states, streams, type-string checks such as
``param.type() == "torch.cuda.FloatTensor"``). Instead of touching the global ``torch`` module, every
imported ``megatron.core.*`` module whose global name ``torch`` is the real torch gets a proxy that
forwards everything to torch except:

* tensor factories: ``device="cuda"``, ``"cuda:N"`` or an int index become ``"cpu"``;
* ``torch.cuda``: ``current_device()`` is ``"cpu"``; ``synchronize``/``empty_cache`` do nothing;
  ``Stream``/``Event``/``stream()``/``current_stream()`` are inert stand-ins; ``manual_seed`` and
  ``get_rng_state``/``set_rng_state`` use the CPU generator.

Plus five attribute patches:

* ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``: every
  ``get_cuda_rng_tracker().fork()`` swaps the CPU generator's state instead of a CUDA generator's;
* ``torch.Tensor.cuda``: a no-op (tied embeddings with PP > 1 call ``weight.data.cuda()``);
* ``torch.Tensor.type``: answers ``torch.cuda.*Tensor`` for CPU tensors, but only to callers in
  ``megatron.core.optimizer`` (the type-string checks of the optimizer, distributed optimizer and
  gradient clipping); every other caller sees the true type;
* ``dist_checkpointing.strategies.filesystem_async._get_write_results_queue``: a synchronous torch_dist
  save collects its writers' results in a queue that megatron gets from a *spawned* ``Manager`` process,
  which re-imports the training script and costs 6-8 s at the first save. Synchronous saves collect
  them in this process, so a local queue does (the writers themselves are still forked).

The patch is applied only when CUDA is unavailable; with CUDA nothing is patched. ``apply()`` may be
called again after more megatron modules were imported (a lazily imported module is patched then).
Measured sites and fixes: ``shared/notes/megatron-on-cpu.md`` §3 of the project's design notes.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from megatron_unicron.megatron.patching import PatchSet, PatchSite, check_megatron_core_version

logger = logging.getLogger(__name__)

# Sites replaced by attribute (the module proxies are listed in PROXIED_MODULES).
SITES: tuple[PatchSite, ...] = (
    PatchSite(
        "megatron.core.tensor_parallel.random",
        "_get_cuda_rng_state",
        "RNG tracker fork() reads the CUDA generator: read the CPU generator instead",
    ),
    PatchSite(
        "megatron.core.tensor_parallel.random",
        "_set_cuda_rng_state",
        "RNG tracker fork() writes the CUDA generator: write the CPU generator instead",
    ),
    PatchSite("torch:Tensor", "cuda", "language_module.py moves tied embeddings with weight.data.cuda()"),
    PatchSite("torch:Tensor", "type", "optimizer type-string checks demand torch.cuda.*Tensor"),
    PatchSite(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "_get_write_results_queue",
        "a spawned Manager re-imports the training script at the first save",
    ),
)

# Modules measured to reach a CUDA-only call on the CPU path; each must still exist and use `torch`.
PROXIED_MODULES: tuple[str, ...] = (
    "megatron.core.tensor_parallel.random",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.utils",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
)

_FACTORIES = (
    "zeros", "empty", "ones", "full", "tensor", "arange", "randn", "rand", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like",
)  # fmt: skip

_PATCHES = PatchSet("megatron_unicron CPU patch")
_proxied: set[str] = set()
HITS: collections.Counter[str] = collections.Counter()


def _caller(depth: int) -> str:
    frame = sys._getframe(depth)
    return f"{frame.f_globals.get('__name__', '?')}:{frame.f_lineno}"


def _to_cpu_device(device: Any) -> Any:
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


def _cpu_factory(name: str) -> Callable[..., torch.Tensor]:
    real = getattr(torch, name)

    def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None:
            fixed = _to_cpu_device(device)
            if fixed is not device:
                HITS[f"{_caller(2)} torch.{name}(device={device!r})"] += 1
                kwargs["device"] = fixed
        return real(*args, **kwargs)

    factory.__name__ = name
    return factory


class _Inert:
    """Stand-in for a CUDA Stream or Event: every method does nothing, usable as a context."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None

    def __enter__(self) -> _Inert:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _CudaOnCpu(types.ModuleType):
    """``torch.cuda`` as megatron sees it on a CPU-only machine."""

    def __init__(self) -> None:
        super().__init__("torch.cuda (megatron_unicron CPU patch)")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def _hit(what: str) -> None:
        HITS[f"{_caller(3)} torch.cuda.{what}"] += 1

    def current_device(self) -> str:
        self._hit("current_device()")
        return "cpu"

    def synchronize(self, *args: Any, **kwargs: Any) -> None:
        self._hit("synchronize()")

    def empty_cache(self) -> None:
        self._hit("empty_cache()")

    def Stream(self, *args: Any, **kwargs: Any) -> _Inert:  # noqa: N802 - mirrors torch.cuda.Stream
        self._hit("Stream()")
        return _Inert()

    def Event(self, *args: Any, **kwargs: Any) -> _Inert:  # noqa: N802 - mirrors torch.cuda.Event
        self._hit("Event()")
        return _Inert()

    def stream(self, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager[None]:
        self._hit("stream()")
        return contextlib.nullcontext()

    def current_stream(self, *args: Any, **kwargs: Any) -> _Inert:
        self._hit("current_stream()")
        return _Inert()

    def default_stream(self, *args: Any, **kwargs: Any) -> _Inert:
        self._hit("default_stream()")
        return _Inert()

    def manual_seed(self, seed: int) -> None:
        self._hit("manual_seed()")
        torch.manual_seed(seed)

    def get_rng_state(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._hit("get_rng_state()")
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self._hit("set_rng_state()")
        torch.set_rng_state(state)

    def device_count(self) -> int:
        return 0

    def memory_allocated(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def max_memory_allocated(self, *args: Any, **kwargs: Any) -> int:
        return 0


class _TorchOnCpu(types.ModuleType):
    """``torch`` as megatron modules see it on a CPU-only machine (the real module stays untouched)."""

    def __init__(self) -> None:
        super().__init__("torch (megatron_unicron CPU patch)")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(name))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


TORCH_ON_CPU = _TorchOnCpu()


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    HITS["tensor_parallel.random._get_cuda_rng_state"] += 1
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    HITS["tensor_parallel.random._set_cuda_rng_state"] += 1
    torch.set_rng_state(new_state)


_real_tensor_type = torch.Tensor.type


def _tensor_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    HITS[f"{_caller(2)} Tensor.cuda()"] += 1
    return self


def _tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    if dtype is not None or kwargs:
        return _real_tensor_type(self, dtype, non_blocking, **kwargs)
    answer = _real_tensor_type(self)
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller.startswith("megatron.core.optimizer") and not answer.startswith("torch.cuda."):
        HITS[f"{_caller(2)} Tensor.type() check"] += 1
        return "torch.cuda." + answer[len("torch.") :]
    return answer


def _local_results_queue() -> queue.Queue[object]:
    return queue.Queue()


def needed() -> bool:
    """Whether the patch is needed: CUDA is unavailable."""
    return not torch.cuda.is_available()


def apply() -> int:
    """Patch every imported megatron-core module (idempotent); returns how many modules were newly proxied.

    Does nothing when CUDA is available. Call again after importing more of megatron-core.
    """
    if not needed():
        return 0
    first = not _PATCHES.applied
    if first:
        version = check_megatron_core_version()
    import megatron.core.tensor_parallel.random as tp_random

    newly = 0
    for name, module in list(sys.modules.items()):
        if name in _proxied or not name.startswith("megatron.core") or module is None:
            continue
        _proxied.add(name)
        if getattr(module, "torch", None) is torch:
            _PATCHES.replace(module, "torch", TORCH_ON_CPU)
            newly += 1
    _PATCHES.replace(tp_random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _PATCHES.replace(tp_random, "_set_cuda_rng_state", _cpu_set_rng_state)
    _PATCHES.replace(torch.Tensor, "cuda", _tensor_cuda)
    _PATCHES.replace(torch.Tensor, "type", _tensor_type)
    writers = sys.modules.get("megatron.core.dist_checkpointing.strategies.filesystem_async")
    if writers is not None:
        _PATCHES.replace(writers, "_get_write_results_queue", _local_results_queue)
    if first:
        logger.info(
            "CPU patch applied to megatron-core %s (CUDA unavailable): %d modules proxied, %d attributes",
            version, newly, len(SITES),
        )  # fmt: skip
    return newly


def revert() -> int:
    """Undo every replacement made by ``apply()``; returns how many attributes were restored."""
    _proxied.clear()
    return _PATCHES.revert()


def is_applied() -> bool:
    """Whether the patch is currently in place."""
    return _PATCHES.applied


def hits_report() -> str:
    """The CUDA assumptions the CPU path hit so far, one ``count site`` line each (for debugging)."""
    return "\n".join(f"{count:6d}  {site}" for site, count in sorted(HITS.items()))
