"""Random-weight model FILES that ComfyUI's own loaders (UNETLoader, VAELoader,
ControlNetLoader) detect as FLUX.1-dev, HunyuanVideo, Wan 2.1 text-to-video, Wan 2.2's 5B
text/image-to-video model, the FLUX VAE, the HunyuanVideo 3D VAE, the Wan 2.1 and Wan 2.2 VAEs
and an XLabs-style FLUX ControlNet.

Each file has the real key layout, so ComfyUI's detection (`comfy.model_detection`,
`comfy.sd.VAE`) picks the real model class from it. Sizes are as small as that detection
allows (ComfyUI 0.3.64):
- HunyuanVideo: width comes from the weights, so it is tiny (hidden 256 = 2 heads of 128,
  1 double + 1 single block, text width 32).
- FLUX: ComfyUI hard-codes hidden 3072 / 24 heads / text width 4096 for any FLUX file and
  only counts blocks, so the file is full width with 1 double + 2 single blocks (687M
  parameters, 1.4 GB in bf16; two single blocks so that regional Compile finds a repeated
  block class).
- Wan 2.1: width, heads (width / 128), MLP width and depth come from the weights, so it is
  tiny (width 256 = 2 heads of 128, 2 blocks); the text embedder keeps Wan's 4096-wide input
  (the detection does not read it). Wan 2.2 5B: the same with 48 latent channels in and out.
- FLUX ControlNet (XLabs layout, its own hint encoder): full width for the same reason, 1
  double block (395M parameters, 0.8 GB in bf16).
- VAEs: ComfyUI builds the VAEs at full width from their keys, so they are full-size random
  VAEs (FLUX 2D: 84M, HunyuanVideo 3D: 250M, Wan 2.1: 127M, Wan 2.2: 705M parameters).
Shapes come from ComfyUI's own classes built on the meta device; values from a seeded
generator. Files are written once into a cache folder and reused. Nothing is downloaded.
Call `comfy_para_attn.adapters.comfy.env.make_importable` first.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .comfy_models import complete_config

# Bump when the recipe changes: cached files of another version are rewritten.
RECIPE_VERSION = "3"  # a new kind of file needs no bump: missing files are written

# Tiny file name -> (kind, real file name it stands in for in the shipped workflows).
TINY_FILES = {
    "tiny_random_flux1-dev.safetensors": ("flux", "flux1-dev.safetensors"),
    "tiny_random_hunyuan_video_t2v.safetensors": ("hunyuan_video", "hunyuan_video_t2v_720p_bf16.safetensors"),
    "tiny_random_flux_ae.safetensors": ("flux_vae", "ae.safetensors"),
    "tiny_random_hunyuan_video_vae.safetensors": ("hunyuan_video_vae", "hunyuan_video_vae_bf16.safetensors"),
    "tiny_random_flux_controlnet.safetensors": ("flux_controlnet", "flux-canny-controlnet-v3.safetensors"),
    "tiny_random_wan2.1_t2v.safetensors": ("wan", "wan2.1_t2v_1.3B_bf16.safetensors"),
    "tiny_random_wan_2.1_vae.safetensors": ("wan_vae", "wan_2.1_vae.safetensors"),
    "tiny_random_wan2.2_ti2v_5B.safetensors": ("wan22", "wan2.2_ti2v_5B_fp16.safetensors"),
    # Wan 2.2 14B's two experts have Wan 2.1's architecture (each file its own seed), stored as
    # the fp8_scaled files ComfyUI's example loads.
    "tiny_random_wan2.2_t2v_high_noise_fp8_scaled.safetensors": (
        "wan_fp8_scaled", "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"),
    "tiny_random_wan2.2_t2v_low_noise_fp8_scaled.safetensors": (
        "wan_fp8_scaled", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"),
    "tiny_random_wan2.2_vae.safetensors": ("wan22_vae", "wan2.2_vae.safetensors"),
}
FOLDERS = {"flux": "diffusion_models", "hunyuan_video": "diffusion_models", "wan": "diffusion_models",
           "wan_fp8_scaled": "diffusion_models",
           "wan22": "diffusion_models", "flux_vae": "vae", "hunyuan_video_vae": "vae", "wan_vae": "vae",
           "wan22_vae": "vae", "flux_controlnet": "controlnet"}
# Real name -> tiny name, for rewriting a shipped workflow.
SUBSTITUTES = {real: tiny for tiny, (_, real) in TINY_FILES.items()}

# What ComfyUI's detection infers for FLUX files whatever the weights say.
_FLUX_DETECTED = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                      mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=2, axes_dim=[16, 56, 56],
                      theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, image_model="flux")
# HunyuanVideo: heads = hidden // 128 and vec_in_dim = 768 are fixed by the detection.
HUNYUAN_CONTEXT_DIM = 32
_HUNYUAN_TINY = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=HUNYUAN_CONTEXT_DIM,
                     hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                     axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
                     byt5=False, meanflow=False, image_model="hunyuan_video")
# Wan 2.1 text-to-video as ComfyUI detects it from a file of these shapes (freq_dim, patch size
# and the norms are fixed by the detection).
_WAN_TINY = dict(image_model="wan2.1", model_type="t2v", dim=256, out_dim=16, num_heads=2, ffn_dim=512,
                 num_layers=2, in_dim=16, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
                 cross_attn_norm=True, eps=1e-6)
_WAN22_TINY = dict(_WAN_TINY, in_dim=48, out_dim=48)  # Wan 2.2 5B: 48-channel latents (its own VAE)


def _diffusion_model_shapes(kind: str) -> dict:
    import comfy.supported_models

    cls, unet_config = {"flux": ("Flux", _FLUX_DETECTED), "hunyuan_video": ("HunyuanVideo", _HUNYUAN_TINY),
                        "wan": ("WAN21_T2V", _WAN_TINY), "wan22": ("WAN22_T2V", _WAN22_TINY)}[kind]
    model_config = getattr(comfy.supported_models, cls)(complete_config(kind, unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        model = model_config.get_model({}, device=torch.device("meta"))
    return {k: v.shape for k, v in model.diffusion_model.state_dict().items()}


def _controlnet_shapes() -> dict:
    """An XLabs FLUX ControlNet's keys: ComfyUI's ControlNetFlux with the detected FLUX config,
    its own conv hint encoder, 1 double block (the detection counts the blocks)."""
    import comfy.ldm.flux.controlnet
    import comfy.ops

    config = complete_config("flux", dict(_FLUX_DETECTED, depth_single_blocks=0))
    with torch.device("meta"):
        model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, device="meta",
                                                        dtype=torch.float32, **config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _vae_shapes(kind: str) -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    if kind in ("wan_vae", "wan22_vae"):  # the configs comfy.sd.VAE builds for these keys
        import comfy.ldm.wan.vae
        import comfy.ldm.wan.vae2_2

        module, dim, z_dim = (comfy.ldm.wan.vae, 96, 16) if kind == "wan_vae" else (comfy.ldm.wan.vae2_2, 160, 48)
        with torch.device("meta"):
            model = module.WanVAE(dim=dim, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                  temperal_downsample=[False, True, True], dropout=0.0)
        return {k: v.shape for k, v in model.state_dict().items()}
    # The configs comfy.sd.VAE builds for these key layouts (16 latent channels).
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        if kind == "flux_vae":
            model = AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
        else:
            model = AutoencoderKL(ddconfig=dict(ddconfig, conv3d=True, time_compress=4), embed_dim=16)
    return {k: v.shape for k, v in model.state_dict().items()}


def random_state_dict(shapes: dict, *, seed: int, dtype=torch.bfloat16) -> dict:
    """Seeded weights: matrices ~ N(0, 1/fan_in) (activations keep their scale through the
    network), norm scales near 1, other vectors small."""
    torch.manual_seed(seed)  # the default generator's randn is the fast vectorized one
    state = {}
    for name, shape in shapes.items():
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape) / math.sqrt(max(1, fan_in))
        elif "norm" in name or "scale" in name:
            value = 1.0 + 0.02 * torch.randn(shape)
        else:
            value = 0.02 * torch.randn(shape)
        state[name] = value.to(dtype).contiguous()
    return state


def fp8_scaled_state_dict(state: dict, comfy_fp8_matmuls: bool = True) -> dict:
    """`state` as an fp8_scaled checkpoint stores it: every 2-D (linear) weight in fp8 e4m3fn
    with its own `scale_weight` (amax / 448, fp32; ComfyUI makes every linear layer of such a
    model fp8), a `scaled_fp8` marker; the rest as it is. The marker's size tells ComfyUI
    whether it may run its own fp8 matmuls on a GPU that has them (empty: yes; 2 values: no,
    it computes with the dequantized weights)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight") and value.ndim == 2:
            scale = value.float().abs().amax() / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            if comfy_fp8_matmuls:  # ComfyUI's fp8 matmuls then read an input scale too
                out[key.removesuffix("weight") + "scale_input"] = torch.ones(())
        else:
            out[key] = value
    out["scaled_fp8"] = torch.empty(0 if comfy_fp8_matmuls else 2, dtype=torch.float8_e4m3fn)
    return out


def shapes_of(kind: str) -> dict:
    kind = kind.removesuffix("_fp8_scaled")
    if kind == "flux_controlnet":
        return _controlnet_shapes()
    return _diffusion_model_shapes(kind) if kind in ("flux", "hunyuan_video", "wan", "wan22") else _vae_shapes(kind)


def default_cache_dir() -> Path:
    """Where the files are kept between runs (COMFY_PARA_ATTN_TINY_MODELS overrides)."""
    env = os.environ.get("COMFY_PARA_ATTN_TINY_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "comfy-para-attn" / f"tiny-models-v{RECIPE_VERSION}"


def write_tiny_model_files(models_dir: Path | str | None = None, *, seed: int = 0) -> dict:
    """Write (or reuse) every tiny file under `models_dir/<folder>/` and return
    {real file name: tiny file name}. `models_dir` is laid out like ComfyUI's models/."""
    from safetensors.torch import save_file

    models_dir = Path(models_dir) if models_dir is not None else default_cache_dir()
    for i, (name, (kind, _real)) in enumerate(TINY_FILES.items()):
        path = models_dir / FOLDERS[kind] / name
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        state = random_state_dict(shapes_of(kind), seed=seed + i)
        if kind.endswith("_fp8_scaled"):
            state = fp8_scaled_state_dict(state)
        partial = path.with_suffix(".partial")
        save_file(state, str(partial), metadata={"comfy_para_attn": f"tiny random {kind} v{RECIPE_VERSION}"})
        partial.replace(path)  # atomic: a killed run never leaves a truncated model behind
    return dict(SUBSTITUTES)


def link_into(models_dir: Path | str, target_models_dir: Path | str) -> None:
    """Symlink the cached files into another models/ tree (a temporary ComfyUI base dir)."""
    models_dir, target = Path(models_dir), Path(target_models_dir)
    for name, (kind, _real) in TINY_FILES.items():
        link = target / FOLDERS[kind] / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(models_dir / FOLDERS[kind] / name)


if __name__ == "__main__":
    import argparse
    import sys

    from comfy_para_attn.adapters.comfy.env import find_comfyui, make_importable

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", nargs="?", default=None, help="default: %s" % default_cache_dir())
    args = parser.parse_args()
    comfy = find_comfyui()
    if comfy is None:
        sys.exit("ComfyUI not found: set COMFYUI_PATH")
    make_importable(comfy, cpu=True)
    print(write_tiny_model_files(args.models_dir))
