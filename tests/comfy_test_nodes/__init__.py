"""Test-only ComfyUI nodes (never shipped): loaded as an extra custom node by the comfyui
tests and the main job, next to the pack.

ParaAttnTestConditioning stands in for the text encoders (DualCLIPLoader + CLIPTextEncode):
the real CLIP-L / T5-XXL / LLaVA / UMT5 files are gigabytes and cannot be made tiny, so this
node makes random text embeddings with the widths the loaded diffusion model expects.
"""
import hashlib

import torch


class ParaAttnTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the conditioning is for (gives the widths)."}),
                "text": ("STRING", {"multiline": True, "default": "", "tooltip": "Seeds the random embedding."}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "para_attn/testing"
    DESCRIPTION = "Random text conditioning for tests (replaces CLIP/T5/LLaVA text encoders)."

    def encode(self, model, text, tokens):
        diffusion_model = model.model.diffusion_model
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        generator = torch.Generator().manual_seed(seed)
        params = getattr(diffusion_model, "params", None)  # Flux and HunyuanVideo keep their widths here
        if params is None:  # Wan: the text embedder's input width, no pooled vector
            width = diffusion_model.text_embedding[0].weight.shape[1]
            return ([[torch.randn(1, tokens, width, generator=generator), {}]],)
        context = torch.randn(1, tokens, params.context_in_dim, generator=generator)
        extra = {}
        if getattr(params, "vec_in_dim", None):
            extra["pooled_output"] = torch.randn(1, params.vec_in_dim, generator=generator)
        return ([[context, extra]],)


NODE_CLASS_MAPPINGS = {"ParaAttnTestConditioning": ParaAttnTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"ParaAttnTestConditioning": "Test Conditioning (random, tests only)"}
