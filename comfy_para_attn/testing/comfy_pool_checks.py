"""Helpers for the comfyui-tier pool tests: tiny models sampled in-process and through the
Context Parallel pool with the same inputs."""
from __future__ import annotations

import torch


def sampling_inputs(family: str, *, seed: int = 0, tokens: int = 8, latent: dict | None = None):
    from comfy_para_attn.testing import comfy_models

    patcher = comfy_models.build(family, seed=seed)
    positive = comfy_models.conditioning(patcher, tokens=tokens, seed=1)
    negative = comfy_models.conditioning(patcher, tokens=tokens, seed=2)
    shape = comfy_models.latent_shape(family, **(latent or {}))
    image = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.5
    return patcher, positive, negative, image


def record_sampling_jobs(monkeypatch) -> list:
    """Record every Context Parallel sampling job the controller sends, from now on: a list
    of (envelope bytes, the payload unpacked as the workers do) in sending order."""
    import pickle

    from comfy_para_attn.pool import controller
    from comfy_para_attn.pool.sent_once import ReceivedTensors, is_envelope, unpack

    jobs, cache = [], ReceivedTensors()
    encode = controller.protocol.encode

    def recording_encode(message):
        data = encode(message)
        if isinstance(message, controller.protocol.Pickled):  # the sampling job's payload
            envelope = pickle.loads(data)
            assert is_envelope(envelope), type(envelope)
            jobs.append((data, unpack(envelope, cache)))
        return data

    monkeypatch.setattr(controller.protocol, "encode", recording_encode)
    return jobs


class FaultyBlock:
    """A picklable dit block patch (another pack's, as far as the pool knows) that fails
    inside the workers: `raise` raises on rank `rank`, `hang` sleeps past any timeout."""

    def __init__(self, how: str, rank: int = 1):
        self.how = how
        self.rank = rank

    def __call__(self, args, extra):
        import time

        import torch.distributed as dist

        here = dist.get_rank() if dist.is_initialized() else 0
        if here == self.rank:
            if self.how == "raise":
                raise RuntimeError("injected failure in a block patch")
            if self.how == "hang":
                time.sleep(3600)
        return extra["original_block"](args)


class FailsToLoadOnRank:
    """A value in the model's options that travels to the workers and cannot be rebuilt on
    rank `rank` there (as another pack's class that one worker cannot import)."""

    def __init__(self, rank: int = 1):
        self.rank = rank

    def __setstate__(self, state):
        import torch.distributed as dist

        self.__dict__.update(state)
        if dist.is_initialized() and dist.get_rank() == self.rank:
            raise ImportError("injected failure while loading the job on this rank")


ATTENTION_PATCH_CALLS = []  # in this process: how often `unchanged_attention` ran


def unchanged_attention(q, k, v, **kwargs):
    """An `attn1_patch` that changes nothing (newer ComfyUI's FLUX blocks call such patches
    with every token's q/k/v, e.g. its FluxKVCache; 0.3.x's do not call them)."""
    ATTENTION_PATCH_CALLS.append(1)
    return {}


def unchanged_block(args):
    """A `double_block` patch that changes nothing (newer ComfyUI's Wan blocks call such
    patches with every token of the block's output; its FLUX and HunyuanVideo blocks and
    0.3.x's do not call them)."""
    ATTENTION_PATCH_CALLS.append(1)
    return {"img": args["img"]}


APPLY_MODEL_CALLS = []  # in this process: how often `counting_apply_model` ran


def counting_apply_model(executor, *args, **kwargs):
    """An APPLY_MODEL wrapper that changes nothing (ComfyUI's CFGOverride registers its own
    with `add_wrapper`, under no key)."""
    APPLY_MODEL_CALLS.append(1)
    return executor(*args, **kwargs)


def refuse_autograd(apply_model, args):
    """A model function wrapper (picklable: it travels to the workers) that fails a model call
    made with autograd on, as it never is in ComfyUI (its executor runs under inference_mode)."""
    if torch.is_grad_enabled():
        raise RuntimeError("a model call ran with autograd on")
    return apply_model(args["input"], args["timestep"], **args["c"])


def with_faulty_block(patcher, how: str, rank: int = 1):
    model = patcher.clone()
    model.set_model_patch_replace(FaultyBlock(how, rank), "dit", "double_block", 0)
    return model


def room_for_comfyui_on_a_shared_gpu(rank, world_size, comfy_path):
    """The reverse of `room_for_workers_on_a_shared_gpu`: a CUDA worker holds a VAE after a
    Parallel VAE Decode. In a prompt with a pool node ComfyUI's own loads leave it there even
    when short (ComfyUI copes; releasing would reload it every prompt); in a prompt without one,
    they leave it while the GPU has room and make the worker drop it when ComfyUI's unloading
    alone leaves too little. Returns what it saw."""
    import logging

    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=False)
    import comfy.model_management as mm
    import comfy.model_patcher
    from comfy_execution.graph import DynamicPrompt
    from comfy_execution.progress import reset_progress_state

    from comfy_para_attn.adapters.comfy import parallel_vae
    from comfy_para_attn.adapters.comfy.published import holds_models
    from comfy_para_attn.pool import current_pool, shutdown_pool
    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("comfy_para_attn").addHandler(handler)
    logging.getLogger("comfy_para_attn").setLevel(logging.INFO)
    device = mm.get_torch_device()
    try:
        vae = tiny_comfy_vae("flux")
        z = latent("flux", height=9, width=11)
        plan = parallel_vae.plan_decode(vae, z, parallel_vae.TiledDecodeSettings(64, 16, 64, 8))
        image = parallel_vae.decode_in_pool(vae, z, plan, world=1, device="cuda")
        seen = {"finite": bool(torch.isfinite(image).all()), "held": holds_models(current_pool())}
        encoder = torch.nn.Linear(16384, 16384, bias=False)  # 1 GiB of fp32: fits beside the worker
        patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=device, offload_device=torch.device("cpu"))
        graphs = {"pool prompt": {"1": {"class_type": "ParaAttnParallelVAEDecode", "inputs": {"gpus": 2}}},
                  "one-GPU prompt": {"1": {"class_type": "VAEDecode", "inputs": {}}}}  # a one-GPU workflow
        for prompt, graph in graphs.items():
            reset_progress_state(prompt, DynamicPrompt(graph))  # as ComfyUI's executor starts a prompt
            mm.load_models_gpu([patcher])
            seen[prompt, "roomy"] = (encoder.weight.device.type, holds_models(current_pool()))
            # All but 64 MiB of the GPU: more than unloading ComfyUI's own frees (the worker's CUDA
            # context alone is more), less than the GPU has ("unload everything" is left alone).
            mm.free_memory(mm.get_total_memory(device) - (64 << 20), device)
            seen[prompt, "tight"] = (encoder.weight.device.type, holds_models(current_pool()))
        seen["messages"] = [m for m in messages if "workers dropped" in m]
    finally:
        logging.getLogger("comfy_para_attn").removeHandler(handler)
        shutdown_pool()
    return seen


def room_for_workers_on_a_shared_gpu(rank, world_size, comfy_path):
    """ComfyUI (CUDA) holds a 2 GiB model on its GPU, as a text encoder stays loaded after
    CLIPTextEncode: `make_room_for_workers` leaves it there while the GPU has room for what
    the workers need and unloads it when they need that memory. Returns what it saw."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=False)
    import comfy.model_management as mm
    import comfy.model_patcher

    from comfy_para_attn.adapters.comfy.memory import WORKER_MARGIN_BYTES, make_room_for_workers

    device = mm.get_torch_device()
    encoder = torch.nn.Linear(32768, 16384, bias=False)  # 2 GiB of fp32
    patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=device, offload_device=torch.device("cpu"))
    mm.load_models_gpu([patcher])
    seen = {"loaded_on": encoder.weight.device.type}
    free = mm.get_free_memory(device)
    seen["roomy"] = make_room_for_workers(2, free // 2 - WORKER_MARGIN_BYTES, "test")
    seen["after_roomy"] = encoder.weight.device.type
    seen["other_gpus_only"] = make_room_for_workers(0, free * 2, "test")  # the pool does not use ComfyUI's GPU
    seen["after_other"] = encoder.weight.device.type
    seen["tight"] = make_room_for_workers(2, free + (1 << 30), "test")
    seen["after_tight"] = encoder.weight.device.type
    return seen


POOL_TOL = 2e-4  # pool vs in-process sampling, fp32 tiny models


def context_parallel(pack_nodes, model, **kw):
    """The Context Parallel node applied to `model`: 2 CPU ranks, ulysses 2 unless `kw` says otherwise."""
    args = dict(gpus=2, layout="manual", ulysses_degree=2, ring_degree=1, cfg_parallel=False, timeout_s=120.0)
    args.update(kw)
    return pack_nodes["ParaAttnContextParallel"]().apply(model, **args)[0]


def comfy_extras_module(comfyui_path, name):
    """A comfy_extras module loaded as ComfyUI loads it: named by its file path (what the pool's
    pickler must send by reference)."""
    import importlib.util
    import os
    import sys

    path = os.path.join(comfyui_path, "comfy_extras", f"{name}.py")
    module_name = os.path.splitext(path)[0]
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def with_control(conds, control):
    """ComfyUI conditioning with `control` set on every cond (as ControlNetApply does)."""
    return [[t, {**extra, "control": control, "control_apply_to_uncond": True}] for t, extra in conds]
