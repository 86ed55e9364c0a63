"""The bf16 originals of the weights FP8 Quantize replaces, kept for ComfyUI to restore at
unload (as it keeps a LoRA'd weight's original), without copying them back from the GPU."""
from __future__ import annotations

import collections
import weakref

import torch

from ...quant import is_quantized

_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # ComfyUI's backup record

# BaseModel -> {weight key: the host tensor that weight was loaded from}. The bf16 original of
# every quantized weight must be kept to restore it at unload (as ComfyUI keeps a LoRA'd
# weight's original), but ComfyUI frees a weight's host copy when it moves the module to the
# GPU, and copying FLUX.1-dev's 20 GiB back took 11 s of a 33 s warm-up on an H100. So an
# OUTER_SAMPLE wrapper, which runs before sampling loads the model, holds the host tensors of
# the layers to quantize, and the load hands them to the patcher's backup. Held tensors are
# the module's own weights (no extra memory) except while another, non-FP8 clone of the same
# model has it loaded on the GPU.
_host_originals: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def hold_host_originals(model_patcher, layers) -> int:
    """Hold the host tensors of `layers()` ((name, module) of the diffusion model that FP8
    Quantize will convert) where they are on the offload device now; returns how many are
    held (0 leaves what was held; a fully loaded model is not walked)."""
    if getattr(model_patcher, "weight_inplace_update", False):
        return 0  # patches would be merged into the very tensors held here
    base, offload = model_patcher.model, torch.device(model_patcher.offload_device)
    load = torch.device(model_patcher.load_device)
    if (load != offload and getattr(base, "device", None) == load and not getattr(base, "model_lowvram", False)
            and getattr(base, "model_loaded_weight_memory", 0) > 0):
        return 0  # fully loaded (the next prompt on a loaded model): no weight is on the host
    held = {}
    for name, module in layers():
        weight = module.weight
        if weight.device == offload and weight.dtype != torch.int8 and not is_quantized(weight):
            held[f"diffusion_model.{name}.weight"] = weight.detach()  # survives the module's move
    if held:
        _host_originals[base] = held
    return len(held)


def _original_of(model_patcher, key: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight to back up: the held host tensor when it is still this weight's source
    (same shape, dtype and first row), else a copy of `weight` on the offload device."""
    original = _host_originals.get(model_patcher.model, {}).get(key)
    if (original is not None and original.shape == weight.shape and original.dtype == weight.dtype
            and torch.equal(_bits(weight[:1].to(original.device)), _bits(original[:1]))):
        return original
    return weight.to(device=model_patcher.offload_device)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (torch.equal has no fp8 kernel on the CPU)."""
    return tensor.contiguous().view(torch.uint8) if tensor.element_size() == 1 else tensor


def back_up(model_patcher, key: str, weight: torch.Tensor) -> None:
    """Keep the original of a weight about to be replaced, for ComfyUI to restore at unpatch.
    A LoRA'd weight's backup already holds it; one ComfyUI would restore by copying into the
    parameter (`weight_inplace_update`) is made a replacement: a copy into the quantized
    tensor would scramble it."""
    backup = model_patcher.backup.get(key)
    if backup is None:
        model_patcher.backup[key] = _Backup(_original_of(model_patcher, key, weight), False)
    elif backup.inplace_update:
        model_patcher.backup[key] = _Backup(backup.weight, False)
