"""Tiny random VAEs with ComfyUI's and diffusers' own classes, and local fake decoders.

ComfyUI: `tiny_comfy_vae("flux")` is a `comfy.sd.VAE` whose model is ComfyUI's
AutoencodingEngine with its 2D Decoder (the FLUX VAE's classes, 16 latent channels, 8x);
`tiny_comfy_vae("hunyuan_video")` uses AutoencoderKL with the causal 3D decoder (conv3d,
time_compress 4: the HunyuanVideo VAE's classes, 16 channels, 4x time, 8x space). Both at
32 channels (GroupNorm's 32 groups are the minimum) with one res block per level.
`tiny_comfy_vae("wan")` is ComfyUI's Wan 2.1 WanVAE (causal 3D with a per-frame feature
cache, RMS norms; 16 channels, 4x time, 8x space) at 8 base channels; `"wan22"` the Wan 2.2
VAE (48 channels, 4x time, 16x space: 2x2 patches) at 8/16 base channels.
`"hunyuan_image"` is HunyuanImage 2.1's VAE (AutoencodingEngine with the hunyuan_video.vae
2D decoder: 64 channels, 32x, a mid attention block) and `"hunyuan_video15"` HunyuanVideo
1.5's (the vae_refiner causal 3D decoder: 32 channels, 4x time, 16x space), both at 32
channels per level. ComfyUI
picks full-size configs from state-dict keys, so a tiny VAE carries its own rebuild
recipe (`para_attn_rebuild`), which the parallel decode uses to rebuild it in the workers.
Nothing is downloaded.
"""
from __future__ import annotations

import logging
import math

import torch

KINDS = ("flux", "hunyuan_video", "wan", "wan22", "hunyuan_image", "hunyuan_video15")
VIDEO_KINDS = ("hunyuan_video", "wan", "wan22", "hunyuan_video15")
LATENT_CHANNELS = 16
CHANNELS = {"wan22": 48, "hunyuan_image": 64, "hunyuan_video15": 32}  # latent channels where not LATENT_CHANNELS
SPATIAL = {"wan22": 16, "hunyuan_image": 32, "hunyuan_video15": 16}  # spatial compression where not 8
# comfy.sd.VAE's ddconfigs of the HunyuanImage 2.1 / HunyuanVideo 1.5 VAEs, narrow and one res block a level
_HUNYUAN_15_STYLE = {  # kind: (decoder module, factors, levels, regularizer)
    "hunyuan_image": ("comfy.ldm.hunyuan_video.vae", dict(ffactor_spatial=32), 6, "DiagonalGaussianRegularizer"),
    "hunyuan_video15": ("comfy.ldm.hunyuan_video.vae_refiner", dict(ffactor_spatial=16, ffactor_temporal=4),
                        5, "EmptyRegularizer"),
}


def latent_channels(kind: str) -> int:
    return CHANNELS.get(kind, LATENT_CHANNELS)


def _ddconfig(kind: str, ch: int) -> dict:
    config = {"double_z": True, "z_channels": LATENT_CHANNELS, "resolution": 256, "in_channels": 3,
              "out_ch": 3, "ch": ch, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
              "attn_resolutions": [], "dropout": 0.0}
    if kind == "hunyuan_video":
        config.update(conv3d=True, time_compress=4)
    return config


def _first_stage_model(kind: str, ch: int):
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    ddconfig = _ddconfig(kind, ch)
    if kind == "flux":  # comfy.sd.VAE's branch for the FLUX VAE (no post_quant_conv)
        return AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    if kind == "hunyuan_video":  # comfy.sd.VAE's branch for "decoder.conv_in.conv.weight"
        return AutoencoderKL(ddconfig=ddconfig, embed_dim=LATENT_CHANNELS)
    if kind == "wan":  # comfy.sd.VAE's Wan 2.1 branch, at ch // 4 base channels
        from comfy.ldm.wan.vae import WanVAE

        return WanVAE(dim=max(4, ch // 4), z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                      attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    if kind in _HUNYUAN_15_STYLE:  # comfy.sd.VAE's "decoder.conv_in.weight" 64 / 32-channel branches
        from comfy.ldm.models.autoencoder import AutoencodingEngine

        module, factors, levels, regularizer = _HUNYUAN_15_STYLE[kind]
        # the deepest level a multiple of the latent channels (the decoder adds the latent repeated to it)
        config = dict(block_out_channels=[ch] * (levels - 1) + [max(ch, latent_channels(kind))], in_channels=3,
                      out_channels=3, num_res_blocks=1, downsample_match_channel=True, upsample_match_channel=True,
                      z_channels=latent_channels(kind), **factors)
        return AutoencodingEngine(
            regularizer_config={"target": f"comfy.ldm.models.autoencoder.{regularizer}"},
            encoder_config={"target": f"{module}.Encoder", "params": config},
            decoder_config={"target": f"{module}.Decoder", "params": config})
    if kind == "wan22":  # comfy.sd.VAE's Wan 2.2 branch, tiny
        from comfy.ldm.wan.vae2_2 import WanVAE as Wan22VAE

        return Wan22VAE(dim=max(4, ch // 4), dec_dim=max(4, ch // 2), z_dim=latent_channels(kind),
                        dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                        temperal_downsample=[False, True, True], dropout=0.0)
    raise ValueError(f"unknown tiny VAE kind {kind!r}; expected one of {KINDS}")


def _randomize(model: torch.nn.Module, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
            value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
        elif tensor.ndim > 1:
            fan_in = tensor[0].numel()
            value = torch.randn(tensor.shape, generator=generator) / math.sqrt(fan_in)
        else:
            value = 0.05 * torch.randn(tensor.shape, generator=generator)
        state[name] = value.to(tensor.dtype)
    return state


def tiny_comfy_vae(kind: str, *, ch: int = 32, seed: int = 0, state_dict: dict | None = None,
                   dtype=torch.float32):
    """A comfy.sd.VAE around a tiny ComfyUI VAE model of `kind` (random weights from `seed`,
    or `state_dict`), set up the way comfy.sd.VAE sets up that kind."""
    import comfy.sd

    model = _first_stage_model(kind, ch)
    state = state_dict if state_dict is not None else _randomize(model, seed)
    # VAE(config=...) builds an AutoencoderKL; use it for everything comfy.sd.VAE sets up
    # (device, dtype, patcher), then put the right model and the kind's attributes in.
    config = {"params": {"ddconfig": _ddconfig(kind, ch), "embed_dim": LATENT_CHANNELS}}
    if kind == "hunyuan_video":
        vae = comfy.sd.VAE(sd=state, dtype=dtype, config=config)
    else:
        logging.disable(logging.WARNING)  # the placeholder AutoencoderKL's "missing keys"
        try:
            vae = comfy.sd.VAE(sd={}, dtype=dtype, config=config)
        finally:
            logging.disable(logging.NOTSET)
    if kind in ("flux", "wan", "wan22", *_HUNYUAN_15_STYLE):
        import comfy.model_patcher

        model.load_state_dict(state, strict=True)
        vae.first_stage_model = model.eval().to(vae.vae_dtype)
        vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.device,
                                                       offload_device=vae.patcher.offload_device)
        vae.latent_channels = latent_channels(kind)
    else:
        vae.first_stage_model.load_state_dict(state, strict=True)
        vae.first_stage_model.to(vae.vae_dtype)
    if kind == "hunyuan_image":
        vae.upscale_ratio = vae.downscale_ratio = SPATIAL[kind]
    if kind in VIDEO_KINDS:  # the scale factors comfy.sd.VAE sets for these video VAEs
        space = SPATIAL.get(kind, 8)
        vae.upscale_ratio = (lambda a: max(0, a * 4 - 3), space, space)
        vae.upscale_index_formula = (4, space, space)
        vae.downscale_ratio = (lambda a: max(0, math.floor((a + 3) / 4)), space, space)
        vae.downscale_index_formula = (4, space, space)
        vae.latent_dim = 3
        vae.latent_channels = latent_channels(kind)
    vae.para_attn_rebuild = ("comfy_para_attn.testing.vae_models:rebuild_tiny_comfy_vae",
                             {"kind": kind, "ch": ch})
    return vae


def rebuild_tiny_comfy_vae(state_dict, dtype=torch.float32, *, kind: str, ch: int):
    """The rebuild recipe of `tiny_comfy_vae` (runs in the pool's workers)."""
    return tiny_comfy_vae(kind, ch=ch, state_dict=dict(state_dict), dtype=dtype)


def latent(kind: str, *, batch: int = 1, frames: int = 3, height: int = 5, width: int = 7, seed: int = 0):
    """A random latent for a VAE of `kind` (frames only for video)."""
    shape = (batch, latent_channels(kind)) + ((frames,) if kind in VIDEO_KINDS else ()) + (height, width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- diffusers ----------------------------------------------------------------------------

def tiny_diffusers_vae(kind: str, *, seed: int = 0):
    """diffusers AutoencoderKL ("flux": 16 latent channels, 8x) or AutoencoderKLHunyuanVideo
    ("hunyuan_video": 16 channels, 4x time, 8x space), tiny and random."""
    torch.manual_seed(seed)
    if kind == "flux":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
                            use_quant_conv=False, use_post_quant_conv=False)
    elif kind == "hunyuan_video":
        from diffusers import AutoencoderKLHunyuanVideo

        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
            block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
            spatial_compression_ratio=8, temporal_compression_ratio=4)
    else:
        raise ValueError(f"unknown tiny VAE kind {kind!r}; expected one of {KINDS}")
    return vae.eval()


# -- fake local decoders (unit tests without ComfyUI) ------------------------------------

def nearest_decoder(spatial: int = 8, temporal: int | None = None):
    """A decode function whose output element depends only on the latent element under it,
    so tiled decodes agree with the whole decode: nearest upsampling by `spatial` (and, for
    video, causal `temporal`: frame j of a tile comes from latent frame ceil(j / temporal))."""

    def decode(z: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(z[:, :3] * 0.7 + z[:, 3:6] * 0.3)
        for d in range(x.ndim - 2 - (temporal is not None)):
            x = x.repeat_interleave(spatial, dim=x.ndim - 1 - d)
        if temporal is not None:
            frames = x.shape[2]
            index = torch.tensor([math.ceil(j / temporal) for j in range(max(0, frames * temporal - temporal + 1))],
                                 device=x.device)
            x = x.index_select(2, index)
        return x

    return decode


def rebuild_failing_on_rank_1(state_dict, dtype=torch.float32, **kwargs):
    """A rebuild recipe that raises on rank 1 (worker-failure tests)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() == 1:
        raise RuntimeError("injected VAE rebuild failure")
    return rebuild_tiny_comfy_vae(state_dict, dtype, **kwargs)


def rebuild_out_of_memory_on_rank_1(state_dict, dtype=torch.float32, **kwargs):
    """A rebuild recipe whose VAE runs out of memory on rank 1's second tile (a tile too
    large for one GPU): the failure comes in a decode round, after rank 1 decoded a tile."""
    import torch.distributed as dist

    vae = rebuild_tiny_comfy_vae(state_dict, dtype, **kwargs)
    if dist.is_initialized() and dist.get_rank() == 1:
        decode, calls = vae.first_stage_model.decode, []

        def failing(*args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB (injected)")
            return decode(*args, **kw)

        vae.first_stage_model.decode = failing
    return vae


def rebuild_as_another_class(state_dict, dtype=torch.float32, **kwargs):
    """A rebuild recipe that gives another VAE class than ComfyUI's (a type the workers'
    rebuild gets wrong)."""
    vae = rebuild_tiny_comfy_vae(state_dict, dtype, **kwargs)
    vae.first_stage_model = torch.nn.Identity()
    return vae


def full_size_comfy_vae(kind: str, *, seed: int = 0, dtype=None):
    """A comfy.sd.VAE with the real FLUX or HunyuanVideo VAE architecture and random weights,
    detected by comfy.sd.VAE from the state dict's keys like a real checkpoint (benchmarks)."""
    import comfy.sd

    ddconfig = {**_ddconfig(kind, 128), "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2}
    if kind == "flux":
        from comfy.ldm.models.autoencoder import AutoencodingEngine

        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    else:
        from comfy.ldm.models.autoencoder import AutoencoderKL

        model = AutoencoderKL(ddconfig=ddconfig, embed_dim=LATENT_CHANNELS)
    state = _randomize(model, seed)
    del model
    return comfy.sd.VAE(sd=state, dtype=dtype)
