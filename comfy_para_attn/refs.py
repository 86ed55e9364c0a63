"""Name a module-level class or function so that another process can import it.

Pickle names objects by module only; that fails in a worker or spawned rank when the module
was loaded under a file-path name (ComfyUI loads comfy_extras and custom node packs that
way) or when another package shadows the name (ComfyUI's own `tests` package hides ours
once ComfyUI is on sys.path). An `ObjectRef` also keeps the module's file and falls back to
loading it from there.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import os
import pickle
import sys
import types


class ObjectRef:
    def __init__(self, obj):
        if "<locals>" in obj.__qualname__:  # defined inside a function: no name reaches it
            raise pickle.PicklingError(f"cannot name {obj.__qualname__} of {obj.__module__}: it was defined "
                                       "inside a function")
        self.module = obj.__module__
        self.qualname = obj.__qualname__
        self.file = getattr(sys.modules.get(self.module), "__file__", None)

    def _module(self):
        module = sys.modules.get(self.module)
        if module is not None and (self.file is None or getattr(module, "__file__", None) == self.file):
            return module
        try:
            module = importlib.import_module(self.module)
            if self.file is None or getattr(module, "__file__", None) == self.file:
                return module
        except ImportError:
            if not self.file:
                raise
        return _load_from_file(self.module, self.file)

    def resolve(self):
        obj = self._module()
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj


def _load_from_file(name: str, file: str):
    """Module `name` from `file`, its parent packages first (a submodule of a custom node
    package named by its path makes relative imports)."""
    parent = name.rpartition(".")[0]
    if parent and parent not in sys.modules:
        here = os.path.dirname(file)
        parent_init = os.path.join(os.path.dirname(here) if os.path.basename(file) == "__init__.py" else here,
                                   "__init__.py")
        if os.path.isfile(parent_init):
            _load_from_file(parent, parent_init)
    package = [os.path.dirname(file)] if os.path.basename(file) == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=package)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def resolve(ref: ObjectRef):
    """Unpickles what `dumps` sent by reference."""
    return ref.resolve()


def _named_by_path(module: str) -> bool:
    """ComfyUI names comfy_extras modules and custom node packages by their file path."""
    return not all(part.isidentifier() for part in module.split("."))


def set_state(obj, state) -> None:
    """Unpickles the state of an object `dumps` sent without a `__setstate__` lookup
    (`_answers_any_attribute`): what pickle's default does, an instance dict and slots."""
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if state:
        obj.__dict__.update(state)
    for name, value in (slots or {}).items():
        setattr(obj, name, value)


_OBJECT_GETSTATE = getattr(object, "__getstate__", None)


def _answers_any_attribute(obj) -> bool:
    """An instance of a class whose `__getattr__` may answer any name: newer ComfyUI's model
    configs return None (with a warning) for a missing attribute, `__setstate__` too, and
    unpickling then calls None. Only classes that leave pickling to object's default."""
    cls = type(obj)
    return (isinstance(getattr(cls, "__getattr__", None), types.FunctionType)
            and not hasattr(cls, "__setstate__") and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and getattr(cls, "__getstate__", None) is _OBJECT_GETSTATE)


class Pickler(pickle.Pickler):
    """A pickler that sends the functions and classes of path-named modules by file (`dumps`)."""

    def reducer_override(self, obj):
        if isinstance(obj, (types.FunctionType, type)) and _named_by_path(getattr(obj, "__module__", None) or ""):
            return resolve, (ObjectRef(obj),)  # a local one raises there, as pickle fails it
        if not isinstance(obj, type) and _answers_any_attribute(obj):
            # pickle's own reduction (new-object args, state, list and dict items), its state set
            # by `set_state` instead of the instance's `__setstate__`
            reduced = tuple(object.__reduce_ex__(obj, pickle.DEFAULT_PROTOCOL)) + (None,) * 3
            return reduced[:5] + (set_state,)
        return NotImplemented


def dumps(obj) -> bytes:
    """pickle.dumps, except that functions and classes of modules named by a file path (which
    another process cannot import by that name: a custom node pack's sampler, say) travel as
    an `ObjectRef`, loaded from their file on the other side."""
    buffer = io.BytesIO()
    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()
