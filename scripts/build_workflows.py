"""Writes the shipped workflows in workflows/: each in the UI format the ComfyUI editor saves
(`<name>.json`, drag it in) and its API-format twin (`<name>.api.json`, for `POST /prompt`
and `comfy run --workflow`). Edit the specs here and re-run; tests/test_workflows.py checks
both files against a real server and against each other.

    python scripts/build_workflows.py
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = ROOT / "workflows"
# Our nodes' widget names, order and defaults come from their INPUT_TYPES, so a rebuild
# follows a changed node; the specs below name only the values they choose.
PACK_NODE_MODULES = {"ParaAttnFP8Quantize": "fp8", "ParaAttnCompile": "compile",
                     "ParaAttnFirstBlockCache": "first_block_cache", "ParaAttnContextParallel": "context_parallel",
                     "ParaAttnParallelVAEDecode": "parallel_vae"}

# Widget input names per node type, in widgets_values order; None marks the frontend-only
# "control after generate" value that follows a seed.
WIDGETS = {
    "UNETLoader": ["unet_name", "weight_dtype"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "CLIPLoader": ["clip_name", "type", "device"],
    "CLIPTextEncode": ["text"],
    "FluxGuidance": ["guidance"],
    "VAELoader": ["vae_name"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "EmptyHunyuanLatentVideo": ["width", "height", "length", "batch_size"],
    "Wan22ImageToVideoLatent": ["width", "height", "length", "batch_size"],
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "KSamplerAdvanced": ["add_noise", "noise_seed", None, "steps", "cfg", "sampler_name", "scheduler", "start_at_step",
                         "end_at_step", "return_with_leftover_noise"],
    "ModelSamplingSD3": ["shift"],
    "BasicGuider": [], "SamplerCustomAdvanced": [], "VAEDecode": [],
    "KSamplerSelect": ["sampler_name"],
    "BasicScheduler": ["scheduler", "steps", "denoise"],
    "RandomNoise": ["noise_seed", None],
    "VAEDecodeTiled": ["tile_size", "overlap", "temporal_size", "temporal_overlap"],
    "SaveImage": ["filename_prefix"],
    "SaveAnimatedWEBP": ["filename_prefix", "fps", "lossless", "quality", "method"],
    "ControlNetLoader": ["control_net_name"],
    "LoadImage": ["image", None],  # None: the frontend's upload button
    "Canny": ["low_threshold", "high_threshold"],
    "ControlNetApplyAdvanced": ["strength", "start_percent", "end_percent"],
}
OUTPUTS = {
    "UNETLoader": ["MODEL"], "DualCLIPLoader": ["CLIP"], "CLIPLoader": ["CLIP"], "CLIPTextEncode": ["CONDITIONING"],
    "FluxGuidance": ["CONDITIONING"], "VAELoader": ["VAE"], "EmptySD3LatentImage": ["LATENT"],
    "EmptyHunyuanLatentVideo": ["LATENT"], "Wan22ImageToVideoLatent": ["LATENT"], "KSampler": ["LATENT"], "KSamplerAdvanced": ["LATENT"], "ModelSamplingSD3": ["MODEL"],
    "BasicGuider": ["GUIDER"], "KSamplerSelect": ["SAMPLER"], "BasicScheduler": ["SIGMAS"], "RandomNoise": ["NOISE"],
    "SamplerCustomAdvanced": ["LATENT", "LATENT"], "VAEDecode": ["IMAGE"], "VAEDecodeTiled": ["IMAGE"],
    "SaveImage": [], "SaveAnimatedWEBP": [], "ParaAttnFP8Quantize": ["MODEL"], "ParaAttnCompile": ["MODEL"],
    "ParaAttnFirstBlockCache": ["MODEL"], "ParaAttnContextParallel": ["MODEL"], "ParaAttnParallelVAEDecode": ["IMAGE"],
    "Note": [], "ControlNetLoader": ["CONTROL_NET"], "LoadImage": ["IMAGE", "MASK"], "Canny": ["IMAGE"],
    "ControlNetApplyAdvanced": ["CONDITIONING", "CONDITIONING"],
}
OUTPUT_NAMES = {"SamplerCustomAdvanced": ["output", "denoised_output"], "ControlNetApplyAdvanced": ["positive", "negative"]}
PROMPT_FLUX = "a red fox reading a newspaper in a sunlit cafe, detailed fur, 35mm photo"
PROMPT_HUNYUAN = "a cat walks on the grass, realistic style, slow camera pan"
PROMPT_WAN = "a fox trots through fresh snow at dawn, its breath steaming, the camera tracking it low and slow"
NEGATIVE_WAN = "blurry, low quality, static frame, distorted limbs, watermark, subtitles, overexposed"

FLUX_NOTE = """comfy-para-attn on FLUX.1-dev{multi}

Model files (ComfyUI's FLUX example): diffusion_models/flux1-dev.safetensors, vae/ae.safetensors,
text_encoders/clip_l.safetensors + t5xxl_fp16.safetensors.

FP8 Quantize: row-wise fp8 matmuls on GPUs with compute capability >= 8.9 (RTX 40xx, L40, H100);
other GPUs fall back to weight-only. Set mode to off to compare.
Compile Model: regional = each transformer block class compiled once (seconds of warm-up; the
first run is slower). dynamic on if you often change resolution.
First Block Cache: residual_diff_threshold 0.12 is a common FLUX setting; the log says how many
calls were reused (the speedup); lower (0.08) = closer to the plain model, higher = faster. 0 = off.
{multi_note}{controlnet_note}FP8 Quantize, Compile Model and First Block Cache work in any order (Context Parallel goes
last, before the sampler); threshold 0 / mode off / scope off give the plain model."""
FLUX_MULTI_NOTE = """Context Parallel: gpus 0 = all visible GPUs (without GPU: 2 CPU workers). auto layout: ring on
2 GPUs; beyond that as much Ulysses as the 24 heads allow, ring for the rest (logged). The
workers stay alive between prompts.
Parallel VAE Decode: VAE Decode (Tiled) with the tiles spread over the same workers.
"""
FLUX_CONTROLNET_NOTE = """ControlNet: XLabs' flux-canny-controlnet-v3 in models/controlnet; load your own image in Load
Image (Canny turns it into edges). Under Context Parallel every GPU runs the whole ControlNet and
adds its residuals to its own tokens; FLUX ControlNets only (XLabs and InstantX styles).
"""
HUNYUAN_NOTE = """comfy-para-attn on HunyuanVideo{multi}

Model files (ComfyUI's HunyuanVideo example): diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors,
vae/hunyuan_video_vae_bf16.safetensors, text_encoders/clip_l.safetensors + llava_llama3_fp8_scaled.safetensors.

848x480, 73 frames, 20 steps, shift 7, guidance 6 as in ComfyUI's example.
First Block Cache: residual_diff_threshold 0.10 is a common HunyuanVideo setting; the log says how
many calls were reused; 0 = off.
{multi_note}"""
HUNYUAN_SINGLE_NOTE = """Parallel VAE Decode with gpus 1: VAE Decode (Tiled)'s tiles and output, decoded in this
process with the GPU one tile ahead of the blending (faster); gpus 0 spreads the tiles over
all GPUs (tile 256 / overlap 64 / 64 frames as in ComfyUI's example)."""
HUNYUAN_MULTI_NOTE = """Context Parallel: gpus 0 = all visible GPUs (without GPU: 2 CPU workers); auto layout: ring on
2 GPUs; beyond that it splits the 24 heads (Ulysses) and the rest of the sequence (Ring).
Parallel VAE Decode: tiled 3D VAE decode with the tiles spread over the same workers
(tile 256 / overlap 64 / 64 frames as in ComfyUI's example)."""

WAN_NOTE = """comfy-para-attn on {title}{multi}

Model files (ComfyUI's {title} example): diffusion_models/{unet}{unet_remark},
vae/{vae}, text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors.

{width}x{height}, {length} frames, {steps} steps, uni_pc, cfg {cfg:g}, shift 8 as in ComfyUI's example.
FP8 Quantize and Compile Model as for FLUX (fp8 matmuls need compute capability >= 8.9).
First Block Cache: start at residual_diff_threshold 0.08 and compare with 0 (off); higher = faster,
lower = closer to the plain model.
{{multi_note}}"""
WAN_SINGLE_NOTE = """Parallel VAE Decode with gpus 1: VAE Decode (Tiled)'s tiles and output, decoded in this
process with the GPU one tile ahead of the blending."""
WAN_MULTI_NOTE = """Context Parallel: gpus 0 = all visible GPUs (without GPU: 2 CPU workers). cfg > 1 runs the
cond and uncond halves; cfg_parallel on puts them on different GPUs (needs an even GPU count).
Parallel VAE Decode: the Wan VAE's tiles spread over the same workers."""


def pack_widgets(node_type: str) -> dict:
    """{widget name: default} of one of our nodes, in its input order."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"nodes.{PACK_NODE_MODULES[node_type]}")
    inputs = module.NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    out = {}
    for group in ("required", "optional"):
        for name, spec in inputs.get(group, {}).items():
            kind = spec[0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                options = spec[1] if len(spec) > 1 else {}
                out[name] = options.get("default", kind[0] if isinstance(kind, list) else None)
    return out


def node(id, type, pos, widgets=(), inputs=(), title=None, size=(315, 110)):
    """widgets: values in widget order, or for our nodes {name: value} (defaults fill the
    rest); inputs: (name, type, (source id, source slot) or None: an optional input left unlinked)."""
    if isinstance(widgets, dict):
        defaults = pack_widgets(type)
        unknown = set(widgets) - set(defaults)
        assert not unknown, f"{type} has no widgets {unknown}"
        WIDGETS[type] = list(defaults)
        widgets = [widgets.get(name, default) for name, default in defaults.items()]
    return dict(id=id, type=type, pos=list(pos), size=list(size), widgets=list(widgets), inputs=list(inputs),
                title=title)


def flux(multi: bool, controlnet: bool = False) -> list:
    model_out, conds = (10, 0), ((4, 0), (5, 0))
    nodes = [
        node(1, "UNETLoader", (0, 0), ["flux1-dev.safetensors", "default"]),
        node(2, "DualCLIPLoader", (0, 150), ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"]),
        node(3, "CLIPTextEncode", (380, 150), [PROMPT_FLUX], [("clip", "CLIP", (2, 0))], "Positive prompt",
             (400, 160)),
        node(4, "FluxGuidance", (820, 150), [3.5], [("conditioning", "CONDITIONING", (3, 0))]),
        node(5, "CLIPTextEncode", (380, 350), [""], [("clip", "CLIP", (2, 0))], "Negative (unused at cfg 1)",
             (400, 100)),
        node(6, "VAELoader", (0, 330), ["ae.safetensors"]),
        node(7, "EmptySD3LatentImage", (820, 300), [1024, 1024, 1]),
        node(8, "ParaAttnFP8Quantize", (380, -250), dict(granularity="row-wise", mode="dynamic activation + weight"),
             [("model", "MODEL", (1, 0))]),
        node(9, "ParaAttnCompile", (760, -250), dict(scope="regional", mode="default", dynamic=True, fullgraph=False), [("model", "MODEL", (8, 0))]),
        node(10, "ParaAttnFirstBlockCache", (1120, -250), dict(residual_diff_threshold=0.12, start_percent=0.0, end_percent=1.0, max_consecutive_hits=-1), [("model", "MODEL", (9, 0))],
             size=(340, 130)),
    ]
    if controlnet:
        nodes += [
            node(16, "ControlNetLoader", (0, 520), ["flux-canny-controlnet-v3.safetensors"], size=(315, 58)),
            node(17, "LoadImage", (0, 620), ["example.png", "image"], title="Control image", size=(315, 314)),
            node(18, "Canny", (380, 620), [0.4, 0.8], [("image", "IMAGE", (17, 0))], size=(315, 82)),
            node(19, "ControlNetApplyAdvanced", (820, 450), [0.7, 0.0, 1.0],
                 [("positive", "CONDITIONING", (4, 0)), ("negative", "CONDITIONING", (5, 0)),
                  ("control_net", "CONTROL_NET", (16, 0)), ("image", "IMAGE", (18, 0)),
                  ("vae", "VAE", None)], size=(315, 186)),  # InstantX-style ControlNets: link the VAE
        ]
        conds = ((19, 0), (19, 1))
    if multi:
        nodes.append(node(15, "ParaAttnContextParallel", (1500, -250), dict(gpus=0, layout="auto", cfg_parallel=False),
                          [("model", "MODEL", (10, 0))], size=(315, 200)))
        model_out = (15, 0)
    nodes += [
        node(11, "KSampler", (1250, 100), [42, "fixed", 28, 1.0, "euler", "simple", 1.0],
             [("model", "MODEL", model_out), ("positive", "CONDITIONING", conds[0]),
              ("negative", "CONDITIONING", conds[1]), ("latent_image", "LATENT", (7, 0))], size=(315, 262)),
        (node(12, "ParaAttnParallelVAEDecode", (1620, 100), dict(gpus=0, tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8),
              [("samples", "LATENT", (11, 0)), ("vae", "VAE", (6, 0))], size=(315, 180)) if multi else
         node(12, "VAEDecode", (1620, 100), [], [("samples", "LATENT", (11, 0)), ("vae", "VAE", (6, 0))],
              size=(210, 46))),
        node(13, "SaveImage", (1980, 100),
             ["para_attn_flux" + ("_controlnet" if controlnet else "") + ("_multi_gpu" if multi else "")],
             [("images", "IMAGE", (12, 0))], size=(400, 440)),
        node(14, "Note", (0, -330), [FLUX_NOTE.format(
            multi=(" with a ControlNet" if controlnet else "") + (" (multi-GPU)" if multi else " (one GPU)"),
            multi_note=FLUX_MULTI_NOTE if multi else "", controlnet_note=FLUX_CONTROLNET_NOTE if controlnet else "")],
             title="How to use (comfy-para-attn)", size=(360, 300)),
    ]
    return nodes


def decode_and_save(ids, xs, samples, vae, prefix: str, fps: float, multi: bool) -> list:
    """Parallel VAE Decode (gpus 1: in-process; 0: all GPUs) of `samples`, then SaveAnimatedWEBP."""
    (decode, save), (decode_x, save_x) = ids, xs
    return [
        node(decode, "ParaAttnParallelVAEDecode", (decode_x, 100),
             dict(gpus=0 if multi else 1, tile_size=256, overlap=64, temporal_size=64, temporal_overlap=8),
             [("samples", "LATENT", samples), ("vae", "VAE", vae)], size=(315, 180)),
        node(save, "SaveAnimatedWEBP", (save_x, 100), [prefix + ("_multi_gpu" if multi else ""), fps, False, 80, "default"],
             [("images", "IMAGE", (decode, 0))], size=(400, 440)),
    ]


def hunyuan(multi: bool) -> list:
    model_out = (8, 0)
    nodes = [
        node(1, "UNETLoader", (0, 0), ["hunyuan_video_t2v_720p_bf16.safetensors", "default"]),
        node(2, "DualCLIPLoader", (0, 150),
             ["clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors", "hunyuan_video", "default"]),
        node(3, "CLIPTextEncode", (380, 150), [PROMPT_HUNYUAN], [("clip", "CLIP", (2, 0))], "Positive prompt",
             (400, 160)),
        node(4, "FluxGuidance", (820, 150), [6.0], [("conditioning", "CONDITIONING", (3, 0))]),
        node(5, "VAELoader", (0, 330), ["hunyuan_video_vae_bf16.safetensors"]),
        node(6, "EmptyHunyuanLatentVideo", (820, 300), [848, 480, 73, 1], size=(315, 130)),
        node(7, "ModelSamplingSD3", (380, -250), [7.0], [("model", "MODEL", (1, 0))]),
        node(8, "ParaAttnFirstBlockCache", (760, -250), dict(residual_diff_threshold=0.10, start_percent=0.0, end_percent=1.0, max_consecutive_hits=-1), [("model", "MODEL", (7, 0))],
             size=(340, 130)),
    ]
    if multi:
        nodes.append(node(16, "ParaAttnContextParallel", (1140, -250), dict(gpus=0, layout="auto", cfg_parallel=False),
                          [("model", "MODEL", (8, 0))], size=(315, 200)))
        model_out = (16, 0)
    nodes += [
        node(9, "BasicGuider", (1250, 100), [], [("model", "MODEL", model_out),
                                                 ("conditioning", "CONDITIONING", (4, 0))], size=(240, 46)),
        node(10, "KSamplerSelect", (1250, 200), ["euler"], size=(315, 58)),
        node(11, "BasicScheduler", (1250, 300), ["simple", 20, 1.0], [("model", "MODEL", model_out)]),
        node(12, "RandomNoise", (1250, 450), [42, "fixed"], size=(315, 82)),
        node(13, "SamplerCustomAdvanced", (1620, 100), [],
             [("noise", "NOISE", (12, 0)), ("guider", "GUIDER", (9, 0)), ("sampler", "SAMPLER", (10, 0)),
              ("sigmas", "SIGMAS", (11, 0)), ("latent_image", "LATENT", (6, 0))], size=(270, 330)),
        # One GPU: the same node with gpus 1 decodes in-process, ComfyUI's tiles and output bit
        # for bit, 1.2-1.5x faster than VAE Decode (Tiled) (the GPU decodes one tile ahead).
        *decode_and_save((14, 15), (1950, 2300), (13, 0), (5, 0), "para_attn_hunyuan_video", 24.0, multi),
        node(17, "Note", (0, -330), [HUNYUAN_NOTE.format(multi=" (multi-GPU)" if multi else " (one GPU)",
                                                         multi_note=HUNYUAN_MULTI_NOTE if multi else HUNYUAN_SINGLE_NOTE)],
             title="How to use (comfy-para-attn)", size=(360, 300)),
    ]
    return nodes


# Wan releases: (title, diffusion model file, remark, VAE file, latent node, size, frames, steps, cfg, fps)
WAN_RELEASES = {
    "2.1": ("Wan 2.1 text-to-video", "wan2.1_t2v_1.3B_bf16.safetensors", " (the 14B file works the same)",
            "wan_2.1_vae.safetensors", "EmptyHunyuanLatentVideo", (832, 480), 33, 30, 6.0, 16.0),
    "2.2": ("Wan 2.2 5B text-to-video", "wan2.2_ti2v_5B_fp16.safetensors",
            " (image-to-video too: link a picture to the latent node's start_image)",
            "wan2.2_vae.safetensors", "Wan22ImageToVideoLatent", (1280, 704), 121, 30, 5.0, 24.0),
}


def wan_text_nodes() -> list:
    """UMT5-XXL (CLIPLoader, type wan) and the positive / negative prompts: nodes 2, 3, 4."""
    return [
        node(2, "CLIPLoader", (0, 150), ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"]),
        node(3, "CLIPTextEncode", (380, 150), [PROMPT_WAN], [("clip", "CLIP", (2, 0))], "Positive prompt",
             (400, 160)),
        node(4, "CLIPTextEncode", (380, 350), [NEGATIVE_WAN], [("clip", "CLIP", (2, 0))], "Negative prompt",
             (400, 120)),
    ]


def wan_model_chain(ids, unet: str, loader_pos, y: int, multi: bool, title=None) -> tuple[list, tuple]:
    """UNETLoader -> ModelSamplingSD3 (shift 8) -> FP8 Quantize -> Compile Model -> First Block
    Cache (-> Context Parallel on several GPUs) in a row at height `y`; (nodes, model output)."""
    loader, sampling, fp8, compiled, cache, cp = ids
    nodes = [
        node(loader, "UNETLoader", loader_pos, [unet, "default"], title=title),
        node(sampling, "ModelSamplingSD3", (380, y), [8.0], [("model", "MODEL", (loader, 0))]),
        node(fp8, "ParaAttnFP8Quantize", (760, y), dict(granularity="row-wise", mode="dynamic activation + weight"),
             [("model", "MODEL", (sampling, 0))]),
        node(compiled, "ParaAttnCompile", (1120, y), dict(scope="regional", mode="default", dynamic=True,
             fullgraph=False), [("model", "MODEL", (fp8, 0))]),
        node(cache, "ParaAttnFirstBlockCache", (1480, y), dict(residual_diff_threshold=0.08, start_percent=0.0,
             end_percent=1.0, max_consecutive_hits=-1), [("model", "MODEL", (compiled, 0))], size=(340, 130)),
    ]
    if not multi:
        return nodes, (cache, 0)
    nodes.append(node(cp, "ParaAttnContextParallel", (1860, y), dict(gpus=0, layout="auto", cfg_parallel=False),
                      [("model", "MODEL", (cache, 0))], size=(315, 200)))
    return nodes, (cp, 0)


def wan(multi: bool, release: str = "2.1") -> list:
    title, unet, unet_remark, vae, latent_node, (width, height), length, steps, cfg, fps = WAN_RELEASES[release]
    note = WAN_NOTE.format(title=title, unet=unet, unet_remark=unet_remark, vae=vae, width=width, height=height,
                           length=length, steps=steps, cfg=cfg, multi=" (multi-GPU)" if multi else " (one GPU)")
    # Wan 2.2's latent node takes the VAE (it could also encode a start image: image-to-video).
    latent = (node(6, latent_node, (820, 300), [width, height, length, 1], [("vae", "VAE", (5, 0))], size=(315, 150))
              if latent_node == "Wan22ImageToVideoLatent" else
              node(6, latent_node, (820, 300), [width, height, length, 1], size=(315, 130)))
    chain, model_out = wan_model_chain((1, 7, 8, 9, 10, 15), unet, (0, 0), -250, multi)
    loader, *rest = chain  # the loader stays the workflow's first node
    nodes = [loader, *wan_text_nodes(), node(5, "VAELoader", (0, 330), [vae]), latent, *rest]
    nodes += [
        node(11, "KSampler", (1250, 100), [42, "fixed", steps, cfg, "uni_pc", "simple", 1.0],
             [("model", "MODEL", model_out), ("positive", "CONDITIONING", (3, 0)),
              ("negative", "CONDITIONING", (4, 0)), ("latent_image", "LATENT", (6, 0))], size=(315, 262)),
        *decode_and_save((12, 13), (1620, 1980), (11, 0), (5, 0), f"para_attn_wan{release}", fps, multi),
        node(14, "Note", (0, -330), [note.format(multi_note=WAN_MULTI_NOTE if multi else WAN_SINGLE_NOTE)],
             title="How to use (comfy-para-attn)", size=(360, 300)),
    ]
    return nodes


WAN22_EXPERTS_NOTE = """comfy-para-attn on Wan 2.2 14B text-to-video, two experts{multi}

Model files (ComfyUI's Wan 2.2 14B example): diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors
and wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors, vae/wan_2.1_vae.safetensors,
text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors. FP8 Quantize takes the fp8_scaled weights
as they are (no second rounding) and runs fp8 matmuls on GPUs that have them; the fp16 files
work the same.

1280x704, 81 frames, 20 steps (the high-noise expert steps 0-10, the low-noise one 10-20), euler,
cfg 3.5, shift 8 as in ComfyUI's example. Each expert has its own FP8 Quantize, Compile Model and
First Block Cache: start at residual_diff_threshold 0.08 and compare with 0 (off).
{multi_note}"""
WAN22_EXPERTS_MULTI_NOTE = """Context Parallel on each expert: both models stay loaded in the workers (published to
/dev/shm once each), so every prompt switches experts without moving weights again."""


def wan22_experts(multi: bool) -> list:
    """Wan 2.2 14B: a high-noise and a low-noise expert, each sampling part of one schedule
    (two KSamplerAdvanced), as in ComfyUI's example."""
    steps, switch, cfg = 20, 10, 3.5
    nodes = [*wan_text_nodes(), node(5, "VAELoader", (0, 330), ["wan_2.1_vae.safetensors"]),
             node(6, "EmptyHunyuanLatentVideo", (820, 300), [1280, 704, 81, 1], size=(315, 130))]
    experts = []
    for row, (expert, first_id) in enumerate((("high", 20), ("low", 40))):
        y = -600 + row * 250
        chain, model_out = wan_model_chain(range(first_id, first_id + 6),
                                           f"wan2.2_t2v_{expert}_noise_14B_fp8_scaled.safetensors", (0, y), y, multi,
                                           title=f"Load {expert}-noise expert")
        nodes += chain
        experts.append(model_out)
    conds = [("positive", "CONDITIONING", (3, 0)), ("negative", "CONDITIONING", (4, 0))]
    nodes += [
        node(11, "KSamplerAdvanced", (1250, 100), ["enable", 42, "fixed", steps, cfg, "euler", "simple", 0, switch,
                                                   "enable"],
             [("model", "MODEL", experts[0]), *conds, ("latent_image", "LATENT", (6, 0))],
             title="KSampler (Advanced): high-noise steps", size=(315, 334)),
        node(31, "KSamplerAdvanced", (1620, 100), ["disable", 42, "fixed", steps, cfg, "euler", "simple", switch, 10000,
                                                   "disable"],
             [("model", "MODEL", experts[1]), *conds, ("latent_image", "LATENT", (11, 0))],
             title="KSampler (Advanced): low-noise steps", size=(315, 334)),
        *decode_and_save((12, 13), (1990, 2350), (31, 0), (5, 0), "para_attn_wan2.2_14B", 16.0, multi),
        node(14, "Note", (0, -960), [WAN22_EXPERTS_NOTE.format(
            multi=" (multi-GPU)" if multi else " (one GPU)",
            multi_note=WAN22_EXPERTS_MULTI_NOTE if multi else WAN_SINGLE_NOTE)],
             title="How to use (comfy-para-attn)", size=(360, 300)),
    ]
    return nodes


WORKFLOWS = {
    "flux1_dev_single_gpu": flux(False),
    "flux1_dev_multi_gpu": flux(True),
    "flux1_dev_controlnet_multi_gpu": flux(True, controlnet=True),
    "hunyuan_video_single_gpu": hunyuan(False),
    "hunyuan_video_multi_gpu": hunyuan(True),
    "wan2.1_t2v_single_gpu": wan(False),
    "wan2.1_t2v_multi_gpu": wan(True),
    "wan2.2_ti2v_5B_single_gpu": wan(False, "2.2"),
    "wan2.2_ti2v_5B_multi_gpu": wan(True, "2.2"),
    "wan2.2_t2v_14B_single_gpu": wan22_experts(False),
    "wan2.2_t2v_14B_multi_gpu": wan22_experts(True),
}


def to_ui(nodes: list) -> dict:
    """The editor's save format (litegraph serialization, version 0.4)."""
    links, out_links = [], {}
    for n in nodes:
        for slot, (_name, type_, src) in enumerate(n["inputs"]):
            if src is None:  # an optional input left unlinked
                continue
            link_id = len(links) + 1
            links.append([link_id, src[0], src[1], n["id"], slot, type_])
            out_links.setdefault(src, []).append(link_id)
    ui_nodes = []
    for order, n in enumerate(nodes):
        outputs = [{"name": (OUTPUT_NAMES.get(n["type"]) or OUTPUTS[n["type"]])[i], "type": t,
                    "links": out_links.get((n["id"], i), []), "slot_index": i}
                   for i, t in enumerate(OUTPUTS[n["type"]])]
        ui = {"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"], "flags": {}, "order": order,
              "mode": 0, "inputs": [{"name": name, "type": t, "link": links_for(links, n["id"], slot)}
                                    if src is not None else {"name": name, "type": t, "shape": 7, "link": None}
                                    for slot, (name, t, src) in enumerate(n["inputs"])],
              "outputs": outputs, "properties": {"Node name for S&R": n["type"]}, "widgets_values": n["widgets"]}
        if n["title"]:
            ui["title"] = n["title"]
        if n["type"] == "Note":
            ui["properties"] = {"text": ""}
            ui["color"], ui["bgcolor"] = "#432", "#653"
        ui_nodes.append(ui)
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [400, 400]}},
            "version": 0.4}


def links_for(links: list, node_id: int, slot: int):
    return next(link[0] for link in links if link[3] == node_id and link[4] == slot)


def to_api(nodes: list) -> dict:
    prompt = {}
    for n in nodes:
        if n["type"] == "Note":  # frontend-only node: not part of the prompt
            continue
        inputs = {name: value for name, value in zip(WIDGETS[n["type"]], n["widgets"]) if name is not None}
        inputs.update({name: [str(src[0]), src[1]] for name, _type, src in n["inputs"] if src is not None})
        prompt[str(n["id"])] = {"inputs": inputs, "class_type": n["type"],
                                "_meta": {"title": n["title"] or n["type"]}}
    return prompt


def main():
    WORKFLOWS_DIR.mkdir(exist_ok=True)
    for name, nodes in WORKFLOWS.items():
        (WORKFLOWS_DIR / f"{name}.json").write_text(json.dumps(to_ui(nodes), indent=2) + "\n")
        (WORKFLOWS_DIR / f"{name}.api.json").write_text(json.dumps(to_api(nodes), indent=2) + "\n")
        print("wrote", WORKFLOWS_DIR / f"{name}.json", "and .api.json")


if __name__ == "__main__":
    main()
