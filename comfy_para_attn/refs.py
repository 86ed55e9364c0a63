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
import sys


class ObjectRef:
    def __init__(self, obj):
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
        spec = importlib.util.spec_from_file_location(self.module, self.file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[self.module] = module
        spec.loader.exec_module(module)
        return module

    def resolve(self):
        obj = self._module()
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj
