"""FP8 Quantize node: fp8 weights (and activations) for the linear layers of a DiT, via
torchao. Thin: declarative inputs, one call into `comfy_para_attn`."""

_GRANULARITY = {"row-wise": "row-wise", "tensor-wise": "tensor-wise"}
_MODE = {"dynamic activation + weight": "dynamic", "weight-only": "weight-only", "off": "off"}


def _default_exclude():
    from comfy_para_attn.quant.fp8 import DEFAULT_EXCLUDE  # torch only; no torchao at import

    return DEFAULT_EXCLUDE


class ParaAttnFP8Quantize:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A FLUX, HunyuanVideo or Wan diffusion model: bf16/fp16 weights, or an "
                                               "fp8 checkpoint (fp8_scaled files, weight_dtype fp8_e4m3fn), whose stored "
                                               "fp8 weights are used as they are. LoRAs may come before or after this "
                                               "node."}),
                "granularity": (list(_GRANULARITY), {
                    "default": "row-wise",
                    "tooltip": "Scale per output row of each weight and per token of each activation (row-wise: "
                               "closest to bf16; with dynamic mode the MLPs' GELU is also fused into the activation "
                               "quantization), or one scale per tensor (tensor-wise: less accurate). Row-wise needs "
                               "bf16 weights; other dtypes use tensor-wise."}),
                "mode": (list(_MODE), {
                    "default": "dynamic activation + weight",
                    "tooltip": "dynamic activation + weight: fp8 tensor-core matmuls (GPU with compute capability "
                               ">= 8.9: RTX 40xx, L40, H100/H200, B200; fastest under Compile Model). weight-only: "
                               "fp8 storage, bf16 matmuls (half the weight memory, no speedup). Other GPUs and the "
                               "CPU fall back to weight-only, said once in the log. off: no quantization (also undoes an "
                               "FP8 Quantize earlier in the chain)."}),
                "exclude": ("STRING", {
                    "default": _default_exclude(), "multiline": False,
                    "tooltip": "Comma-separated glob patterns of layer names (relative to the diffusion model) "
                               "that stay in bf16; a pattern also covers everything below a matching module. The "
                               "default keeps embedders, modulation and the final layer in bf16. Patterns are "
                               "case-sensitive; one of yours that matches no layer is named in the log."}),
            },
            "optional": {
                "modulation": (["original", "int8"], {
                    "default": "original",
                    "tooltip": "The modulation (adaLN) layers that exclude keeps out of fp8, about a quarter of "
                               "FLUX's weights. original: leave them as loaded. int8: 8-bit weights with a scale per "
                               "row, ~1% weight error (less than fp8's): 3 GiB less GPU memory for FLUX.1-dev, the "
                               "same step time with one image per batch (H100); larger batches are slower."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, quantized to fp8 when it is loaded (after its LoRA patches are merged).",)
    FUNCTION = "apply"
    CATEGORY = "para_attn"
    DESCRIPTION = ("Quantizes the transformer's linear layers to fp8 with torchao each time the model is loaded, "
                   "after LoRA patches are merged (a LoRA change re-quantizes). Pair with Compile Model for speed.")

    def apply(self, model, granularity, mode, exclude, modulation="original"):
        from comfy_para_attn.adapters.comfy.fp8 import apply_fp8, warn_unmatched_patterns
        from comfy_para_attn.quant import FP8Settings

        settings = FP8Settings(granularity=_GRANULARITY[granularity], mode=_MODE[mode], exclude=exclude,
                               modulation=modulation)
        warn_unmatched_patterns(model, settings)
        return (apply_fp8(model, settings),)


NODE_CLASS_MAPPINGS = {"ParaAttnFP8Quantize": ParaAttnFP8Quantize}
NODE_DISPLAY_NAME_MAPPINGS = {"ParaAttnFP8Quantize": "FP8 Quantize"}
