"""Name a module-level class or function so that another process can import it.

Pickle names objects by module only; that fails in a worker or spawned rank when the module
was loaded under a file-path name (ComfyUI loads comfy_extras and custom node packs that
way) or when another package shadows the name (ComfyUI's own `tests` package hides ours
once ComfyUI is on sys.path). An `ObjectRef` also keeps the module's file and falls back to
loading it from there.
"""
from __future__ import annotations

import copyreg
import importlib
import importlib.util
import io
import marshal
import os
import pickle
import sys
import types


class ModuleRef:
    """A module by name and file: imported by name where that gives the same file, else
    loaded from the file."""

    def __init__(self, name: str):
        self.module = name
        self.file = getattr(sys.modules.get(name), "__file__", None)

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
        try:
            return _load_from_file(self.module, self.file)
        except Exception as exc:  # a custom node pack that needs ComfyUI's server, say
            raise ImportError(f"this process could not load {self.module} from {self.file}, where a function or "
                              f"class it was sent is defined ({type(exc).__name__}: {exc}); the node that "
                              "added it may need ComfyUI's own process") from exc

    def resolve(self):
        return self._module()


class ObjectRef(ModuleRef):
    def __init__(self, obj):
        if "<locals>" in obj.__qualname__:  # defined inside a function: no name reaches it
            raise pickle.PicklingError(f"cannot name {obj.__qualname__} of {obj.__module__}: it was defined "
                                       "inside a function")
        super().__init__(obj.__module__)
        self.qualname = obj.__qualname__

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
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # half-run: the next attempt fails the same way instead of finding it
        raise
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


class _EmptyCell:
    """Marks a closure variable not assigned yet; unpickles as the same object."""

    def __reduce__(self):
        return "_EMPTY_CELL"


_EMPTY_CELL = _EmptyCell()


def _resolves_to_itself(fn) -> bool:
    """Whether pickle's by-name lookup (module, qualname) finds `fn` itself: not for a function
    defined inside another, a module-level lambda, or a wrapper whose `functools.wraps` copied
    another function's names."""
    obj = sys.modules.get(fn.__module__)
    for part in fn.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is fn


def looks_like_a_model(value) -> bool:
    """A ComfyUI ModelPatcher or model (duck-typed: the pack imports no ComfyUI here)."""
    return ((hasattr(value, "model") and hasattr(value, "patches") and hasattr(value, "model_options"))
            or (hasattr(value, "diffusion_model") and hasattr(value, "model_config")))


def _function_by_value(fn):
    """Pickle's reduction of a function no name reaches (a node's guidance or patch closure):
    its code, the module whose dict is its globals, and as state its closure values, defaults
    and attributes, set once the function exists (a closure that refers to the function itself
    then pickles too). Refused: globals of no importable module (`__main__`, `exec`), and a
    closure over a model, whose weights would travel with every job."""
    module = fn.__globals__.get("__name__")
    if module == "__main__" or getattr(sys.modules.get(module), "__dict__", None) is not fn.__globals__:
        raise pickle.PicklingError(f"cannot send {fn.__qualname__}: its globals are not those of an importable "
                                   f"module ({module})")
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:
            cells.append(_EMPTY_CELL)
    captured = [type(v).__name__ for v in cells + list(fn.__defaults__ or ()) if looks_like_a_model(v)]
    if captured:
        raise pickle.PicklingError(f"{fn.__qualname__} of {module} holds a model ({captured[0]}): its weights "
                                   "would travel with every job")
    state = (tuple(cells), fn.__defaults__, fn.__kwdefaults__, fn.__dict__ or None, fn.__qualname__)
    return (make_function, (marshal.dumps(fn.__code__), ModuleRef(module), fn.__name__, len(cells)),
            state, None, None, set_function_state)


def make_function(code: bytes, module: ModuleRef, name: str, cells: int):
    """Unpickles what `_function_by_value` sent: the function, its closure still empty."""
    closure = tuple(types.CellType() for _ in range(cells)) or None
    return types.FunctionType(marshal.loads(code), module.resolve().__dict__, name, None, closure)


def set_function_state(fn, state) -> None:
    values, fn.__defaults__, fn.__kwdefaults__, attributes, fn.__qualname__ = state
    for cell, value in zip(fn.__closure__ or (), values):
        if value is not _EMPTY_CELL:
            cell.cell_contents = value
    fn.__dict__.update(attributes or {})


# What a class statement puts in a class of its own accord (a body of `pass`)
_CLASS_BOOKKEEPING = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__firstlineno__",
                      "__static_attributes__", "__orig_bases__"}


def _mixes_its_bases(cls) -> bool:
    """A class defined inside a function that only combines its bases (ComfyUI's model
    sampling: `class ModelSampling(s, c): pass`): it can be made again from them."""
    return ("<locals>" in cls.__qualname__ and cls.__bases__ != (object,)
            and set(vars(cls)) <= _CLASS_BOOKKEEPING)


def _reduce_with_mixed_bases(obj):
    """Pickle's default reduction of `obj` (new object, state, list and dict items) with its
    class made again from its bases on the other side; None where a base reduces its own way
    (a tensor, say: plain pickle then fails by name, as before)."""
    cls = type(obj)
    reduced = tuple(obj.__reduce_ex__(pickle.DEFAULT_PROTOCOL)) + (None,) * 4
    if reduced[0] is not copyreg.__newobj__ or reduced[1][0] is not cls:
        return None
    return (instance_of_mixed_bases, (cls.__name__, cls.__bases__, cls.__qualname__, *reduced[1][1:])) + reduced[2:6]


def instance_of_mixed_bases(name: str, bases: tuple, qualname: str, *args):
    """Unpickles what `dumps` sent of an instance of such a class: the class made again (its
    state follows)."""
    cls = type(name, bases, {"__qualname__": qualname})
    return cls.__new__(cls, *args)


class Pickler(pickle.Pickler):
    """A pickler that sends the functions and classes of path-named modules by file (`dumps`)."""

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType) and not _resolves_to_itself(obj):
            return _function_by_value(obj)
        if not isinstance(obj, type) and _mixes_its_bases(type(obj)):
            reduced = _reduce_with_mixed_bases(obj)
            if reduced is not None:
                return reduced
        if isinstance(obj, (types.FunctionType, type)) and _named_by_path(getattr(obj, "__module__", None) or ""):
            return resolve, (ObjectRef(obj),)  # a local class raises there, as pickle fails it
        if not isinstance(obj, type) and _answers_any_attribute(obj):
            # pickle's own reduction (new-object args, state, list and dict items), its state set
            # by `set_state` instead of the instance's `__setstate__`
            reduced = tuple(object.__reduce_ex__(obj, pickle.DEFAULT_PROTOCOL)) + (None,) * 3
            return reduced[:5] + (set_state,)
        return NotImplemented


def dumps(obj) -> bytes:
    """pickle.dumps, except that functions and classes of modules named by a file path (which
    another process cannot import by that name: a custom node pack's sampler, say) travel as
    an `ObjectRef`, loaded from their file on the other side; functions defined inside other
    functions travel by value (code, closure), their globals those of their module there, and
    instances of classes defined inside functions that only combine their bases as those bases
    and their state."""
    buffer = io.BytesIO()
    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()
