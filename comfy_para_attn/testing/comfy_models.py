"""Tiny random-weight ComfyUI models (Flux, HunyuanVideo, Wan) built with ComfyUI's own
classes and wrapped as a real `ModelPatcher`, plus matching conditioning and latents.

Sizes are parameters: `flux_config("dev")` gives FLUX.1-dev's shapes for the benchmarks.
Call `comfy_para_attn.adapters.comfy.env.make_importable` before using this module.
Nothing is downloaded; weights come from a seeded generator.
"""
from __future__ import annotations

import math

import torch

FLUX_DEV = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
FLUX_TINY = dict(FLUX_DEV, vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=4, depth=2,
                 depth_single_blocks=2, axes_dim=[4, 6, 6])
HUNYUAN_TINY = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
                    mlp_ratio=4.0, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                    theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False,
                    meanflow=False)
# Newer ComfyUI's FLUX.2 (the same Flux class: one modulation for all blocks, SiLU-gated MLPs, 128 latent channels)
FLUX2_TINY = dict(in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=32, hidden_size=64, mlp_ratio=3.0,
                  num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 4, 4, 4], theta=2000, patch_size=1,
                  qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
                  default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3])
WAN_TINY = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=64, ffn_dim=128,
                freq_dim=32, text_dim=32, out_dim=16, num_heads=4, num_layers=3, window_size=(-1, -1),
                qk_norm=True, cross_attn_norm=True, eps=1e-6)

WAN22_TINY = dict(WAN_TINY, in_dim=48, out_dim=48)  # Wan 2.2 5B's layout: 48-channel latents

HUNYUAN_13B = dict(HUNYUAN_TINY, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24, depth=20,
                   depth_single_blocks=40, axes_dim=[16, 56, 56])

# family -> (unet config, latent size, text tokens) of the full-size benchmark models:
# FLUX.1-dev at 1024x1024 (4096 image tokens); HunyuanVideo 13B at 544x960 x 33 frames
# (latent 9 x 68 x 120 -> 18,360 image tokens).
BENCHMARK_SIZES = {
    "flux": (FLUX_DEV, dict(height=128, width=128), 512),
    "hunyuan_video": (HUNYUAN_13B, dict(frames=9, height=68, width=120), 256),
}
TINY_SIZES = {"flux": (dict(height=16, width=16), 16), "hunyuan_video": (dict(frames=3, height=8, width=12), 16)}

_FAMILIES = {  # family -> (supported_models class name, image_model, tiny config)
    "flux": ("Flux", "flux", FLUX_TINY),
    "hunyuan_video": ("HunyuanVideo", "hunyuan_video", HUNYUAN_TINY),
    "flux2": ("Flux2", "flux2", FLUX2_TINY),  # newer ComfyUI only
    "wan": ("WAN21_T2V", "wan2.1", WAN_TINY),
    "wan22": ("WAN22_T2V", "wan2.1", WAN22_TINY),  # text/image-to-video 5B: per-frame timesteps
}


# Wan variants Context Parallel refuses, built tiny through ComfyUI's own model config classes.
_WAN_VARIANTS = {f"wan_{kind}": (cls, "wan2.1", dict(WAN_TINY, model_type=kind))
                 for kind, cls in (("vace", "WAN21_Vace"), ("s2v", "WAN22_S2V"), ("humo", "WAN21_HuMo"),
                                   ("animate", "WAN22_Animate"))}


def flux_config(size: str = "tiny", **overrides) -> dict:
    """Flux unet config: "tiny" (2+2 blocks, width 64) or "dev" (FLUX.1-dev shapes)."""
    return dict({"tiny": FLUX_TINY, "dev": FLUX_DEV}[size], **overrides)


def benchmark_size(family: str, tiny: bool = False) -> tuple[dict, dict, int]:
    """(unet config overrides, `latent_shape` kwargs, text tokens) for the benchmarks: the
    full-size model, or with `tiny` the tiny one on a small latent (CPU smoke runs)."""
    if tiny:
        latent, tokens = TINY_SIZES[family]
        return {}, latent, tokens
    return BENCHMARK_SIZES[family]


@torch.no_grad()
def init_random_weights(module: torch.nn.Module, seed: int = 0) -> None:
    """Seeded weights on the module's own device: matrices ~ N(0, 1/fan_in), norm scales
    near 1, other vectors ~ N(0, 0.02). ComfyUI's ops leave parameters uninitialized."""
    gen = {}
    for i, (name, p) in enumerate(module.named_parameters()):
        g = gen.get(p.device)
        if g is None:
            g = gen[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        x = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        if p.ndim >= 2:
            x.normal_(0.0, 1.0 / math.sqrt(max(1, p[0].numel())), generator=g)
        elif "norm" in name or "scale" in name:
            x.normal_(1.0, 0.02, generator=g)
        else:
            x.normal_(0.0, 0.02, generator=g)
        p.copy_(x)


# Fields newer ComfyUI requires of these models' configs, with the values its own detection
# gives the original checkpoints (FLUX.1: no text ids; HunyuanVideo 1.0: none of 1.5's parts),
# by family: (module, params class, fields).
_NEWER_FIELDS = {
    "flux": ("comfy.ldm.flux.model", "FluxParams", dict(txt_ids_dims=[])),
    "hunyuan_video": ("comfy.ldm.hunyuan_video.model", "HunyuanVideoParams",
                      dict(use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)),
}


def complete_config(family: str, unet_config: dict) -> dict:
    """`unet_config` plus the fields the running ComfyUI requires of `family` ("flux" also for
    FLUX ControlNets) that it lacks."""
    return dict(_newer_fields(family), **unet_config)


def _newer_fields(family: str) -> dict:
    """The `_NEWER_FIELDS` of `family` that the running ComfyUI's params class has."""
    import dataclasses
    import importlib

    if family not in _NEWER_FIELDS:
        return {}
    module_name, cls, fields = _NEWER_FIELDS[family]
    names = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module_name), cls))}
    return {k: v for k, v in fields.items() if k in names}


def build(family: str, *, dtype=torch.float32, device="cpu", seed: int = 0, **config):
    """A ModelPatcher around a random-weight ComfyUI model of `family` ("flux", "flux2"
    (newer ComfyUI), "hunyuan_video", "wan", "wan22", or a Wan variant "wan_vace", "wan_s2v", "wan_humo",
    "wan_animate"); `config` overrides the tiny unet config."""
    import comfy.model_patcher
    import comfy.supported_models

    cls_name, image_model, tiny = _FAMILIES[family] if family in _FAMILIES else _WAN_VARIANTS[family]
    unet_config = complete_config(family, dict(tiny, **config, image_model=image_model))
    model_config = getattr(comfy.supported_models, cls_name)(unet_config)
    model_config.set_inference_dtype(dtype, None)
    device = torch.device(device)
    with torch.device(device):  # ComfyUI's ops create parameters with torch.empty
        model = model_config.get_model({}, device=device)
    init_random_weights(model.diffusion_model, seed)
    model.diffusion_model.to(device=device, dtype=dtype)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def sdpa_attention(func, *args, **kwargs):
    """An `optimized_attention_override`: ComfyUI's own SDPA attention (what CUDA runs). On CPU
    ComfyUI picks sub-quadratic attention, which asks psutil for free memory: a graph break."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def use_sdpa_attention(patcher):
    """`patcher` (in place) with attention routed to `sdpa_attention`; returns it."""
    patcher.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sdpa_attention
    return patcher


def latent_shape(family: str, *, batch: int = 1, height: int = 8, width: int = 8, frames: int = 2) -> tuple:
    """Latent shape (pixel size / 8): 4D for Flux, 5D [B, C, T, H, W] for the video models."""
    if family == "flux":
        return (batch, 16, height, width)
    return (batch, 48 if family == "wan22" else 16, frames, height, width)


def conditioning(patcher, *, tokens: int = 8, seed: int = 1, strength: float = 1.0, device="cpu") -> list:
    """A ComfyUI CONDITIONING list for `patcher`'s model with random text embeddings."""
    dm = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    if hasattr(dm, "text_dim"):  # Wan
        ctx = torch.randn(1, tokens, dm.text_dim, generator=g) * strength
        return [[ctx.to(device), {}]]
    params = dm.params
    ctx = torch.randn(1, tokens, params.context_in_dim, generator=g) * strength
    extra = {"guidance": 3.5}
    if getattr(params, "vec_in_dim", None):
        extra["pooled_output"] = (torch.randn(1, params.vec_in_dim, generator=g) * strength).to(device)
    return [[ctx.to(device), extra]]


def sample(patcher, positive, negative, latent: torch.Tensor, *, steps: int = 6, cfg: float = 2.0,
           seed: int = 0, sampler_name: str = "euler", scheduler: str = "simple", **kwargs) -> torch.Tensor:
    """Run ComfyUI's real sampling (`comfy.sample.sample`, as the KSampler node does)."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent, seed=seed, disable_pbar=True, **kwargs)


def random_lora(patcher, *, rank: int = 4, scale: float = 0.5, seed: int = 3, max_layers: int = 8) -> dict:
    """A LoRA state dict (generic `<module>.lora_up/down.weight` keys) for the first
    `max_layers` 2-D weights of the diffusion model, loadable with `apply_lora`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in patcher.model.diffusion_model.named_parameters():
        if p.ndim != 2 or not name.endswith(".weight") or len(sd) >= 3 * max_layers:
            continue
        key = "diffusion_model." + name[: -len(".weight")]
        sd[f"{key}.lora_up.weight"] = torch.randn(p.shape[0], rank, generator=g) * scale
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, p.shape[1], generator=g) / math.sqrt(p.shape[1])
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    return sd


def apply_lora(patcher, lora: dict, strength: float = 1.0):
    """ComfyUI's own LoRA path (what LoraLoaderModelOnly does)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)[0]


def flux_controlnet(*, vae=None, seed: int = 0, dtype=torch.float32, **config):
    """A ComfyUI ControlNet around a random-weight ControlNetFlux of the tiny FLUX config
    (`config` overrides it): with `vae` (a comfy VAE), InstantX-style (the hint is encoded by
    the VAE given to `set_cond_hint`); without, XLabs-style (the hint image goes through its
    own conv encoder)."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.flux.controlnet
    import comfy.model_management
    import comfy.ops

    latent = vae is not None
    model = comfy.ldm.flux.controlnet.ControlNetFlux(
        latent_input=latent, control_latent_channels=16 if latent else None, operations=comfy.ops.disable_weight_init,
        device="cpu", dtype=dtype, **complete_config("flux", dict(FLUX_TINY, **config)))
    init_random_weights(model, seed)
    load_device = comfy.model_management.get_torch_device()
    if latent:
        return comfy.controlnet.ControlNet(model, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                                           load_device=load_device, extra_conds=["y", "guidance"])
    return comfy.controlnet.ControlNet(model, load_device=load_device, extra_conds=["y", "guidance"])


def build_sd15_unet(seed: int = 0):
    """A tiny SD1.5-style UNet ModelPatcher on CPU (fp32, random weights, SDPA attention): a
    model the pack's DiT features do not support."""
    import comfy.model_patcher
    import comfy.supported_models

    unet = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1, 1],
            "transformer_depth": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth_middle": 1,
            "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 2,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1], "use_temporal_resblock": False,
            "use_temporal_attention": False, "adm_in_channels": None}
    config = comfy.supported_models.SD15(unet)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device="cpu")
    init_random_weights(model.diffusion_model, seed=seed)
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return use_sdpa_attention(patcher)

