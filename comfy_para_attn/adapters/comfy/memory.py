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
  unloads nothing when there is room).
"""
from __future__ import annotations

import functools
import logging

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


def install() -> bool:
    """Wrap `comfy.model_management.unload_all_models` once; False without ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return False
    original = mm.unload_all_models
    if getattr(original, "para_attn_wrapped", False):
        return True

    @functools.wraps(original)
    def unload_all_models(*args, **kwargs):
        result = original(*args, **kwargs)
        try:
            release_worker_models("as ComfyUI unloaded all models")
        except Exception:  # never turn ComfyUI's own unloading into an error
            log.exception("could not make the worker pool unload its models")
        return result

    unload_all_models.para_attn_wrapped = True
    mm.unload_all_models = unload_all_models
    return True


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
        models = mm.free_memory(int(need_bytes) + WORKER_MARGIN_BYTES, device)
        names = [type(getattr(m.model, "model", m.model)).__name__ for m in models]
        if names:
            log.info("unloaded %s from %s: %s needs %.1f GiB there", ", ".join(names), device, what,
                     need_bytes / 2**30)
        unloaded += names
    return unloaded
