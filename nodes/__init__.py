"""ComfyUI node classes. Each module defines NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS for its nodes; this file merges them.

Node modules are thin: declarative inputs with tooltips and one call into
`comfy_para_attn`. They must import without ComfyUI's heavy modules at import time.
"""
import importlib

# One module per feature; add new node modules here.
_NODE_MODULES = ("first_block_cache", "fp8", "compile", "context_parallel", "parallel_vae", "attention_backend")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

for _name in _NODE_MODULES:
    _module = importlib.import_module(f"{__name__}.{_name}")
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
