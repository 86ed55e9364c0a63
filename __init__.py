"""ComfyUI entry point for comfy-para-attn.

ComfyUI imports this file as a custom node package. It imports nothing heavy: each node
module defers torch.distributed, torchao and triton until the node is used, so the pack
loads even without a GPU, triton or torchao (the affected node explains what is missing).
"""
import os
import sys

# Make `import comfy_para_attn` work when the pack is cloned into custom_nodes/ without
# being pip-installed. Appended, not prepended: our `nodes/` package must never shadow
# ComfyUI's own top-level `nodes` module.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

if __package__:  # loaded as a package, as ComfyUI loads custom nodes
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
else:  # imported as a bare module (e.g. pytest collecting a checkout named "comfy-para-attn")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
