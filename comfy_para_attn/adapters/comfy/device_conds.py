"""Conditioning tensors on the model's device for a whole sampling run.

ComfyUI keeps text embeddings, pooled vectors and FLUX's guidance on the CPU and copies them
to the GPU inside every model call (`BaseModel._apply_model`): three pageable copies per FLUX
call, and CUDA starts a copy from pageable host memory only once the GPU has finished
everything queued before it. A SAMPLER_SAMPLE wrapper, which runs after ComfyUI has encoded
this run's conds, moves them to the device once, so the per-call copies become no-ops (GPU
test: the run's pageable copies no longer grow with its step count). It replaces the cond
objects in the run's own dicts and never touches the graph's conditioning, which other nodes
share. Every node of the pack installs it (one key: once).
"""
from __future__ import annotations

import torch

WRAPPER_KEY = "para_attn_device_conds"


def _on_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_on_device(v, device) for v in value)
    return value


def conds_on_device(conds: dict, device) -> dict:
    """`conds` (prompt type -> list of cond dicts, as `process_conds` leaves them) with every
    tensor of each cond's `model_conds` on `device`; new dicts and cond objects, the given
    ones untouched."""
    device = torch.device(device)
    moved = {}
    for kind, items in conds.items():
        moved[kind] = []
        for cond in items:
            model_conds = cond.get("model_conds") if isinstance(cond, dict) else None
            if not model_conds:
                moved[kind].append(cond)
                continue
            new = {}
            for name, value in model_conds.items():
                inner = getattr(value, "cond", None)
                target = _on_device(inner, device)
                new[name] = value if target is inner else value._copy_with(target)
            moved[kind].append({**cond, "model_conds": new})
    return moved


class DeviceConds:
    """SAMPLER_SAMPLE wrapper: the guider's encoded conds go to its model's load device."""

    def __call__(self, executor, guider, *args, **kwargs):
        conds = getattr(guider, "conds", None)
        patcher = getattr(guider, "model_patcher", None)
        if isinstance(conds, dict) and patcher is not None:
            guider.conds = conds_on_device(conds, patcher.load_device)
        return executor(guider, *args, **kwargs)

    def __repr__(self):
        return "DeviceConds()"


def keep_conds_on_device(model_patcher) -> None:
    """Install the wrapper on `model_patcher` (in place: pass a clone); idempotent."""
    import comfy.patcher_extension

    sampler_sample = comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE
    if not model_patcher.get_wrappers(sampler_sample, WRAPPER_KEY):
        model_patcher.add_wrapper_with_key(sampler_sample, WRAPPER_KEY, DeviceConds())
