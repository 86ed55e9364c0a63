"""ComfyUI's model memory management, extended to the worker pool's processes.

Two gaps it closes, both invisible to ComfyUI because the workers are other processes:

- Unloading. "Unload Models" / "Free model and node cache" (POST /free), an out-of-memory
  error, and every prompt under --disable-smart-memory call
  `comfy.model_management.unload_all_models`. `install()` wraps it so that the workers drop
  their diffusion model and VAE too (their VRAM is freed). The shared-memory copies stay, as
  ComfyUI keeps an unloaded model in RAM: the next prompt reloads without a new transfer.
- Sharing GPUs. Rank 0 runs on ComfyUI's own GPU, where the text encoders and the VAE stay
  loaded after they ran. Before a pool job, `make_room_for_workers` unloads as many of
  ComfyUI's models from the pool's GPUs as the workers need (ComfyUI's `free_memory`, which
  unloads nothing when there is room). The other way round, `install()` wraps `free_memory`,
  which ComfyUI calls before it loads a model of its own: models ComfyUI has freed leave the
  workers then, and in a prompt that does not use the pool (a one-GPU workflow after a
  multi-GPU one), when ComfyUI's unloading left too little room on a GPU the pool shares, the
  workers drop their cached models as ComfyUI's own would be unloaded, so ComfyUI loads in
  full instead of in low-VRAM mode.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading

import torch

log = logging.getLogger("comfy_para_attn")

WORKER_MARGIN_BYTES = 1 << 30  # NCCL buffers, the allocator's slack, the compiled code's workspace


def release_worker_models(reason: str) -> int:
    """Make the live pool's workers drop their cached models and VAEs, and the last prompt's
    tensors (a LoRA's matrices, the conds) on both sides; returns how many models each rank
    dropped (0 without a pool). A pool that cannot do it is shut down."""
    from .pool_sampling import forgetting_sent_tensors
    from .published import unmap_in_workers

    with forgetting_sent_tensors():  # the workers' copies go with their models (worker_jobs.drop_cached)
        return unmap_in_workers("model", why=reason) + unmap_in_workers("vae", why=reason)


_wrapped: set = set()  # (module, name) wrapped once per process
_for_workers = threading.local()  # set while make_room_for_workers has ComfyUI unload for the workers


def make_room_for_comfyui(memory_required: float, device) -> None:
    """What ComfyUI's `free_memory(memory_required, device)` could not do alone: drop freed
    models from the workers; then, on a GPU the pool shares, drop the workers' cached models
    if ComfyUI still has too little room there and the prompt it executes does not use the
    pool (a one-GPU workflow after a multi-GPU one). Not within a prompt that uses it: ComfyUI
    asks for room it would like (the VAE decode's estimate, a text encoder loaded in full) and
    copes with less, so releasing there would reload the model on every prompt."""
    import comfy.model_management as mm

    from ...pool import current_pool
    from .published import drop_freed, holds_models

    pool = current_pool()
    if pool is None or pool.busy or getattr(_for_workers, "active", False):
        return
    drop_freed()
    if device is None or pool.layout.device != "cuda" or not holds_models(pool):
        return
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" as some packs name it: the current GPU
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in pool_gpu_devices(pool.layout.world_size) or prompt_uses_pool():
        return
    if memory_required >= mm.get_total_memory(device):  # "unload everything" (1e30), no size to make room for
        return
    if mm.get_free_memory(device) < memory_required:
        release_worker_models(f"for ComfyUI's own models ({memory_required / 2**30:.1f} GiB needed on {device}; "
                              "this prompt does not use the pool)")


POOL_NODES = ("ParaAttnContextParallel", "ParaAttnParallelVAEDecode")


def _runs_on_pool(node: dict) -> bool:
    """Whether a queued node runs on the worker pool: one of ours whose `gpus` is not 1 (nor
    0 with one GPU visible: both stay in ComfyUI's process); a linked `gpus` counts as yes."""
    if not isinstance(node, dict) or node.get("class_type") not in POOL_NODES:
        return False
    gpus = (node.get("inputs") or {}).get("gpus", 0)
    if not isinstance(gpus, int):
        return True
    if gpus == 0:
        from .comfy_pool import available_device

        return available_device()[1] > 1
    return gpus > 1


def prompt_uses_pool() -> bool:
    """Whether the prompt ComfyUI executes has a node that runs on the worker pool (its graph
    as queued: bypassed and muted nodes are not in it); True where that cannot be told."""
    try:
        from comfy_execution.progress import get_progress_state
    except ImportError:
        return True
    graph = getattr(getattr(get_progress_state(), "dynprompt", None), "original_prompt", None)
    if not isinstance(graph, dict):
        return True
    return any(_runs_on_pool(node) for node in graph.values())


def _wrap_once(mm, name: str, after, failure: str) -> None:
    """Replace `mm.<name>` with a call to it followed by `after(*args, **kwargs)`, whose
    errors are logged: ComfyUI's own memory handling never fails because of the pool."""
    if (mm, name) in _wrapped:  # (by name, not by a mark on the function: another pack may wrap ours)
        return
    _wrapped.add((mm, name))
    original = getattr(mm, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            after(*args, **kwargs)
        except Exception:
            log.exception(failure)
        return result

    setattr(mm, name, wrapped)


def install() -> bool:
    """Wrap `comfy.model_management.unload_all_models` and `free_memory` once; False
    without ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    _wrap_once(mm, "unload_all_models", lambda *a, **k: release_worker_models("as ComfyUI unloaded all models"),
               "could not make the worker pool unload its models")
    _wrap_once(mm, "free_memory", lambda memory_required, device, *a, **k: make_room_for_comfyui(memory_required, device),
               "could not make the worker pool release memory for ComfyUI")
    return True


@contextlib.contextmanager
def _unloading_for_workers():
    _for_workers.active = True
    try:
        yield
    finally:
        _for_workers.active = False


def pool_gpu_devices(gpus: int) -> list[torch.device]:
    """ComfyUI's devices among the first `gpus` GPUs (the pool's): usually just cuda:0."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    if getattr(device, "type", None) != "cuda":
        return []
    index = device.index if device.index is not None else torch.cuda.current_device()
    return [device] if index < gpus else []


def make_room_for_workers(gpus: int, need_bytes: int, what: str) -> list[str]:
    """Unload ComfyUI's models from the pool's GPUs until each has `need_bytes` (plus a
    margin) free; returns the names of the models unloaded."""
    import comfy.model_management as mm

    unloaded = []
    for device in pool_gpu_devices(gpus):
        with _unloading_for_workers():
            models = mm.free_memory(int(need_bytes) + WORKER_MARGIN_BYTES, device)
        names = [type(getattr(m.model, "model", m.model)).__name__ for m in models]
        if names:
            log.info("unloaded %s from %s: %s needs %.1f GiB there", ", ".join(names), device, what,
                     need_bytes / 2**30)
        unloaded += names
    return unloaded
