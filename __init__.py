"""ComfyUI entry point for comfy-para-attn.

ComfyUI imports this file as a custom node package. It imports nothing heavy: each node
module defers torch.distributed, torchao and triton until the node is used, so the pack
loads even without a GPU, triton or torchao (the affected node explains what is missing).
Loading it also removes the /dev/shm folders of ComfyUI processes that were killed (torch
is loaded by then: ComfyUI imports it first).
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

    try:  # a ComfyUI killed with its workers (systemd stops the whole group) left its weights in /dev/shm
        from comfy_para_attn.pool.launch import reap_previous_workers
        from comfy_para_attn.pool.shm import sweep_stale_dirs

        sweep_stale_dirs(log=True)
        reap_previous_workers()  # a ComfyUI restarted in place (os.execv) left its workers as zombies
    except Exception:  # never let housekeeping stop the pack from loading
        pass
else:  # imported as a bare module (e.g. pytest collecting a checkout named "comfy-para-attn")
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
