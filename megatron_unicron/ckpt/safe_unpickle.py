"""A restricted unpickler for Megatron-LM checkpoint files, and the matching pickler.

Megatron-LM checkpoints are pickles: ``args`` is an ``argparse.Namespace`` holding ``torch.dtype`` values and
enums of the Megatron-LM version that wrote the file (``megatron.core.enums.ModelType``,
``megatron.core.transformer.enums.AttnBackend``, ...), which the installed megatron-core may lack or name
differently. Unpickling them with the plain ``pickle`` module would import and call whatever the file names.

``RestrictedUnpickler.find_class`` decides every global instead:

* an allowlist of data-only globals (containers, ``argparse.Namespace``, dtypes, numpy arrays of the RNG
  state, torch tensor rebuild functions and storages, DCP metadata classes when asked for);
* every ``megatron.*`` global becomes a ``Placeholder`` subclass that records the name and the constructor
  arguments (an enum member keeps its value), so a checkpoint from an older or newer Megatron-LM loads;
* anything else is refused with one line naming the global (``CheckpointError``): nothing is executed.

``torch.serialization.add_safe_globals`` + ``weights_only=True`` was the alternative; it was not taken
because it needs every megatron global's exact name registered before the load (a file from another
Megatron-LM version names classes nobody registered) and it cannot hand back placeholders.

``Pickler`` writes placeholders back as the global they came from (``GLOBAL megatron.core.enums ModelType``
+ the recorded arguments), so a converted checkpoint loads in Megatron-LM with its real enums. This module
can itself be passed as ``pickle_module`` to ``torch.load(..., weights_only=False)`` / ``torch.save``.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import datetime
import io
import pathlib
import pickle
import signal
import types
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, cast

import torch

from megatron_unicron.ckpt.errors import CheckpointError

__all__ = ["Pickler", "Placeholder", "RestrictedUnpickler", "Unpickler", "dumps", "loads"]


class Placeholder:
    """Stand-in for an instance of a ``megatron.*`` class named by a checkpoint.

    ``args`` are the constructor arguments (an enum member: ``(value,)``), ``state`` the pickled
    ``__dict__`` (dataclasses, plain classes), ``member`` the member name when the pickle named it.
    """

    qualified_name: ClassVar[str] = "megatron.<unknown>"
    args: tuple[Any, ...] = ()
    state: Any = None
    member: str | None = None

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def value(self) -> Any:
        """The enum value (the single constructor argument), or the argument tuple."""
        return self.args[0] if len(self.args) == 1 else self.args

    def plain(self) -> Any:
        """A plain-Python rendering: the enum value, the member name, or the state dict."""
        if self.member is not None:
            return self.member
        if self.args:
            return self.value
        return self.state

    def __reduce__(self) -> Any:
        if self.member is not None:
            return (getattr, (type(self), self.member))
        return (type(self), self.args, self.state)

    def _key(self) -> tuple[Any, ...]:
        return (self.qualified_name, self.args, repr(self.state), self.member)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placeholder) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.qualified_name, repr(self.args), self.member))

    def __repr__(self) -> str:
        inner = self.member if self.member is not None else ", ".join(map(repr, self.args))
        return f"<{self.qualified_name}({inner})>"


class _PlaceholderMeta(type):
    """Metaclass so that ``getattr(PlaceholderClass, 'MEMBER')`` yields a member placeholder."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        inst: Any = object.__new__(cast(type, cls))
        inst.member = name
        return inst


def placeholder_class(module: str, name: str) -> type[Placeholder]:
    """A fresh ``Placeholder`` subclass standing for the global ``module.name``."""
    namespace = {"qualified_name": f"{module}.{name}", "__module__": module, "__qualname__": name}
    meta = {"metaclass": _PlaceholderMeta}
    cls = types.new_class(name, (Placeholder,), meta, lambda ns: ns.update(namespace))
    return cast("type[Placeholder]", cls)


def _numpy_globals() -> dict[str, Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency of torch users
        return {}
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["_reconstruct"])
        except ImportError:
            continue
        out[f"{mod_name}._reconstruct"] = mod._reconstruct
        out[f"{mod_name}.scalar"] = mod.scalar
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for attr in dir(dtypes):
            if attr.endswith("DType"):
                out[f"numpy.dtypes.{attr}"] = getattr(dtypes, attr)
    return out


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # protocol < 2 objects (copyreg._reconstructor) are rebuilt only for allowlisted classes
    if base is not object:
        raise CheckpointError(f"refusing copyreg._reconstructor with base {base!r}")
    obj = object.__new__(cls)
    if state is not None:
        obj.__dict__.update(state)
    return obj


def _data_globals() -> dict[str, Any]:
    """Globals that only build plain data (no code runs beyond constructing containers and tensors)."""
    out: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.Counter": collections.Counter,
        "collections.defaultdict": collections.defaultdict,
        "argparse.Namespace": argparse.Namespace,
        "types.SimpleNamespace": types.SimpleNamespace,
        "pathlib.PosixPath": pathlib.PosixPath,
        "pathlib.PurePosixPath": pathlib.PurePosixPath,
        "datetime.timedelta": datetime.timedelta,
        "_io.BytesIO": io.BytesIO,
        "io.BytesIO": io.BytesIO,
        "_codecs.encode": __import__("_codecs").encode,
        "signal.Signals": signal.Signals,
        "torch.Size": torch.Size,
        "torch.Tensor": torch.Tensor,
        "torch.device": torch.device,
        "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.serialization._get_layout": torch.serialization._get_layout,
    }
    for b in (
        "list",
        "dict",
        "set",
        "frozenset",
        "tuple",
        "int",
        "float",
        "str",
        "bool",
        "complex",
        "bytearray",
        "bytes",
        "slice",
        "range",
        "object",
    ):
        out[f"builtins.{b}"] = getattr(__import__("builtins"), b)
    out.update(_numpy_globals())
    return out


def _eager_tensor_globals() -> dict[str, Any]:
    out: dict[str, Any] = {"torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2}
    for name in (
        "_rebuild_tensor",
        "_rebuild_tensor_v2",
        "_rebuild_tensor_v3",
        "_rebuild_parameter",
        "_rebuild_parameter_with_state",
    ):
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            out[f"torch._utils.{name}"] = fn
    return out


def dcp_metadata_globals() -> dict[str, Any]:
    """The classes of a ``torch.distributed.checkpoint`` ``.metadata`` file (dataclasses and enums only)."""
    from torch.distributed.checkpoint import filesystem, metadata, planner

    names = {
        metadata: (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        ),
        planner: (
            "SavePlan",
            "WriteItem",
            "WriteItemType",
            "TensorWriteData",
            "LoadPlan",
            "ReadItem",
            "LoadItemType",
        ),
        filesystem: ("_StorageInfo", "_StoragePrefix"),
    }
    return {
        f"{mod.__name__}.{attr}": getattr(mod, attr)
        for mod, attrs in names.items()
        for attr in attrs
        if hasattr(mod, attr)
    }


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` allows data-only globals and placeholders only.

    ``tensor_globals`` replaces the torch tensor rebuild functions (the lazy reader builds tensor
    references instead of tensors); ``extra_globals`` adds allowed globals (DCP metadata classes).
    """

    def __init__(
        self,
        file: Any,
        *,
        source: str = "<pickle>",
        tensor_globals: Mapping[str, Any] | None = None,
        extra_globals: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(file, **kwargs)
        self._source = source
        self._allowed = _data_globals()
        self._allowed.update(_eager_tensor_globals() if tensor_globals is None else tensor_globals)
        self._allowed.update(extra_globals or {})
        self._allowed["copyreg._reconstructor"] = self._checked_reconstructor
        self._allowed["builtins.getattr"] = self._checked_getattr
        self._placeholders: dict[str, type[Placeholder]] = {}

    def _checked_reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        if cls not in self._allowed.values() and not (isinstance(cls, type) and issubclass(cls, Placeholder)):
            raise CheckpointError(f"{self._source}: refusing to rebuild {cls!r} with copyreg")
        return _safe_reconstructor(cls, base, state)

    def _checked_getattr(self, *args: Any) -> Any:
        # pickles of enum members by name: getattr(EnumClass, "MEMBER")
        if len(args) == 2 and isinstance(args[1], str):
            obj, name = args
            if isinstance(obj, type) and issubclass(obj, Placeholder):
                return getattr(obj, name)
            if obj is signal.Signals and isinstance(getattr(signal, name, None), signal.Signals):
                return getattr(signal, name)
        raise CheckpointError(f"{self._source}: refusing getattr{tuple(map(repr, args))!r:.80} in a pickle")

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global or a placeholder; refuse anything else with one line."""
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol-2 names (__builtin__.set, ...)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = f"{module}.{name}"
        if key in self._allowed:
            return self._allowed[key]
        if module == "torch":
            attr = getattr(torch, name, None)
            if isinstance(attr, (torch.dtype, torch.layout, torch.memory_format)):
                return attr
        if module == "signal" and isinstance(getattr(signal, name, None), signal.Signals):
            return getattr(signal, name)
        if module == "megatron" or module.startswith("megatron."):
            if key not in self._placeholders:
                self._placeholders[key] = placeholder_class(module, name)
            return self._placeholders[key]
        raise CheckpointError(
            f"{self._source}: refusing to unpickle global {key} (not a checkpoint data type; "
            "the file may contain foreign code)"
        )


_PurePickler: Any = pickle._Pickler  # the pure-Python pickler (its save_global can be hooked)


class Pickler(_PurePickler):
    """Pure-Python pickler that writes ``Placeholder`` classes as the global they stand for."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        """Emit placeholders as their original ``module.name``; everything else as usual."""
        if isinstance(obj, type) and issubclass(obj, Placeholder) and obj is not Placeholder:
            module, _, qualname = obj.qualified_name.rpartition(".")
            if self.proto >= 4:
                self.save(module)
                self.save(qualname)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + module.encode() + b"\n" + qualname.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


# `torch.load(..., pickle_module=safe_unpickle)` / `torch.save(..., pickle_module=safe_unpickle)`
Unpickler = RestrictedUnpickler
load = pickle.load
dump = pickle.dump


def loads(data: bytes, *, source: str = "<bytes>", extra_globals: Mapping[str, Any] | None = None) -> Any:
    """Unpickle plain bytes (no torch storages) with the restricted unpickler."""
    return RestrictedUnpickler(io.BytesIO(data), source=source, extra_globals=extra_globals).load()


def dumps(obj: Any, protocol: int = 2, persistent_id: Callable[[Any], Any] | None = None) -> bytes:
    """Pickle ``obj`` with ``Pickler`` (placeholders written back as their megatron globals)."""
    buf = io.BytesIO()
    p = Pickler(buf, protocol=protocol)
    if persistent_id is not None:
        p.persistent_id = persistent_id
    p.dump(obj)
    return buf.getvalue()
