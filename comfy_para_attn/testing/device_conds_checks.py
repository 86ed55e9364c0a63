"""Conds on the device for the whole run (gpu tier, in a spawned process: the comfyui tier's
own process imports ComfyUI with `--cpu`)."""
from __future__ import annotations

import torch


def pageable_copies_per_run(rank, world_size, comfy_path, cpu=False):
    """A tiny bf16 Flux on CUDA, conditioning on the CPU as ComfyUI's text encoders leave it,
    sampled plain and with `keep_conds_on_device`, each at 2 and 6 steps under the profiler:
    the number of pageable host -> GPU copies of each run, and whether the outputs agree."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=cpu)
    import comfy.model_management
    import comfy.model_patcher

    from comfy_para_attn.adapters.comfy.device_conds import keep_conds_on_device
    from comfy_para_attn.testing import comfy_models as cm

    built = cm.build("flux", dtype=torch.bfloat16, device="cpu", seed=0, **cm.flux_config("tiny"))
    plain = comfy.model_patcher.ModelPatcher(built.model, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=torch.device("cpu"))
    resident = plain.clone()
    keep_conds_on_device(resident)
    positive, negative = cm.conditioning(plain, seed=1), cm.conditioning(plain, seed=2)
    latent = torch.randn(cm.latent_shape("flux"), generator=torch.Generator().manual_seed(3))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def run(model, steps):
        cm.sample(model, positive, negative, latent, steps=steps, cfg=2.0)  # loads the model: not counted
        with torch.profiler.profile(activities=activities) as prof:
            out = cm.sample(model, positive, negative, latent, steps=steps, cfg=2.0)
        copies = sum(1 for e in prof.events() if "Pageable -> Device" in e.name)
        return out, copies

    result = {}
    for name, model in (("plain", plain), ("resident", resident)):
        for steps in (2, 6):
            out, copies = run(model, steps)
            result[f"{name}_{steps}"] = copies
            result[f"out_{name}_{steps}"] = out
    comfy.model_management.unload_all_models()
    outputs = {k: result.pop(k) for k in list(result) if k.startswith("out_")}
    result["same_output"] = all(torch.equal(outputs[f"out_plain_{s}"], outputs[f"out_resident_{s}"]) for s in (2, 6))
    result["finite"] = all(bool(torch.isfinite(o).all()) for o in outputs.values())
    result["scale"] = float(outputs["out_plain_6"].abs().mean())
    return result
