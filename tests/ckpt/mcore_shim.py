"""Test-only CPU shim for megatron-core 0.16.1 (so the ckpt tests can train and save on CPU/gloo).

Each imported ``megatron.core.*`` module whose global ``torch`` is the real torch gets a proxy that maps
``device="cuda"`` to CPU in tensor factories and answers ``torch.cuda.*`` with CPU stand-ins; plus the RNG
tracker, ``Tensor.cuda``/``Tensor.type`` and clip-grad patches measured in the project's notes. Kept small and
local to the tests; the project's own patch module replaces it once available.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any

import torch

_REAL_TYPE = torch.Tensor.type


def _cpu(dev: Any) -> Any:
    if (
        isinstance(dev, int)
        or (isinstance(dev, str) and dev.startswith("cuda"))
        or (isinstance(dev, torch.device) and dev.type == "cuda")
    ):
        return "cpu"
    return dev


def _factory(name: str) -> Any:
    real = getattr(torch, name)

    def f(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return real(*args, **kwargs)

    return f


class _Inert:
    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class _Cuda(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    current_device = staticmethod(lambda: "cpu")
    synchronize = staticmethod(lambda *a, **k: None)
    empty_cache = staticmethod(lambda *a, **k: None)
    Stream = _Inert
    Event = _Inert
    stream = staticmethod(lambda *a, **k: contextlib.nullcontext())
    current_stream = staticmethod(lambda *a, **k: _Inert())
    default_stream = staticmethod(lambda *a, **k: _Inert())
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))
    get_rng_state = staticmethod(lambda *a, **k: torch.get_rng_state())
    set_rng_state = staticmethod(lambda s, *a, **k: torch.set_rng_state(s))
    device_count = staticmethod(lambda: 0)
    memory_allocated = staticmethod(lambda *a, **k: 0)
    max_memory_allocated = staticmethod(lambda *a, **k: 0)


class _Torch(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("torch(cpu-shim)")
        self.cuda = _Cuda("torch.cuda(cpu-shim)")
        for n in (
            "zeros",
            "empty",
            "ones",
            "full",
            "tensor",
            "arange",
            "randn",
            "rand",
            "randint",
            "empty_like",
        ):
            setattr(self, n, _factory(n))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_PROXY = _Torch()


def _tensor_type(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any) -> Any:
    if dtype is not None or kw:
        return _REAL_TYPE(self, dtype, non_blocking, **kw)
    r = _REAL_TYPE(self)
    caller = sys._getframe(1).f_globals.get("__name__", "")
    if caller.startswith("megatron.core.optimizer") and not r.startswith("torch.cuda."):
        return "torch.cuda." + r[len("torch.") :]
    return r


def _clip(parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False) -> None:
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def apply() -> None:
    """Patch every imported megatron.core module (call again after more imports)."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and mod is not None and getattr(mod, "torch", None) is torch:
            mod.torch = _PROXY
    import megatron.core.tensor_parallel.random as rnd

    rnd._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state().clone() if clone else torch.get_rng_state()
    )
    rnd._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.Tensor.type = _tensor_type  # type: ignore[method-assign,assignment]
    if "megatron.core.optimizer.optimizer" in sys.modules:
        import megatron.core.optimizer.clip_grads as cg
        import megatron.core.optimizer.optimizer as oo

        cg.clip_grad_by_total_norm_fp32 = _clip
        oo.clip_grad_by_total_norm_fp32 = _clip


def fix_distopt() -> None:
    """Two CPU-path DistributedOptimizer bugs of 0.16.1 (project notes, reshard.md §7.2 b/c)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer, "_ckpt_test_fixed", False):
        return
    orig_load = DistributedOptimizer.load_state_dict

    def set_states(self: Any, model_param: Any, tensors: Any) -> None:
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for k, v in dst.items():
                if k in tensors:
                    v.copy_(tensors[k])

    def load_state_dict(self: Any, state_dict: Any) -> None:
        orig_load(self, state_dict)
        for st in self.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    DistributedOptimizer.load_state_dict = load_state_dict
    DistributedOptimizer._ckpt_test_fixed = True
