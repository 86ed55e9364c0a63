"""Compile Model node: torch.compile of the repeated transformer blocks (regional) or of the
whole diffusion model. Thin: declarative inputs, one call into `comfy_para_attn`."""


class ParaAttnCompile:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A diffusion model (FLUX, HunyuanVideo, Wan, or any model with "
                                               "repeated transformer blocks for regional scope)."}),
                "scope": (["regional", "whole", "off"], {
                    "default": "regional",
                    "tooltip": "regional: compile each repeated transformer block class once (FLUX: 2 graphs), "
                               "warm-up in seconds, same speed as a whole-model compile in practice. whole: compile "
                               "the entire diffusion model like TorchCompileModel (minutes of warm-up). off: no compile "
                               "(removes an earlier Compile Model's; ComfyUI's TorchCompileModel, if used, stays)."}),
                "mode": (["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"], {
                    "default": "default",
                    "tooltip": "torch.compile mode. default: fastest warm-up. reduce-overhead: the blocks replay as "
                               "CUDA graphs (no per-kernel launch cost; more memory, recorded once per shape): "
                               "helps where the GPU outruns Python, e.g. FP8 under Context Parallel (see "
                               "docs/measurements.md); no gain for bf16 on one GPU. max-autotune-no-cudagraphs: "
                               "benchmarks matmul kernels at warm-up (slower warm-up, sometimes faster steps). "
                               "max-autotune: both."}),
                "dynamic": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "On: a graph specialized for the first shape; the first change of resolution, "
                               "batch or prompt length (HunyuanVideo does not pad its prompt) compiles one graph "
                               "generic in that size, then no more (as ComfyUI's TorchCompileModel). Off: a "
                               "specialized graph for every new shape, every new prompt length included; past "
                               "torch's limit of 8 the blocks run uncompiled."}),
                "fullgraph": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "On: fail with an error on any graph break instead of running that part eager "
                               "(to check that a block compiles as one graph), also where the same blocks ran "
                               "compiled with it off before."}),
            },
            "optional": {
                "cuda_graph": (["off", "model call"], {
                    "default": "off",
                    "tooltip": "model call: from the second step, each whole model call replays as one CUDA graph "
                               "(no Python or kernel launch cost between the blocks; FLUX.1-dev fp8, 28 steps: 87.2 -> "
                               "86.0 ms/step on an H100, 85.2 -> 84.4 on an H200). Only on a GPU, and only where "
                               "nothing decides per step on the host: calls with First Block Cache, Context "
                               "Parallel, a ControlNet, LoRA hooks or other packs' model patches run normally (the "
                               "log says why). Holds one more copy of a step's activations while the model is "
                               "loaded, which ComfyUI's memory estimate does not see: leave it off on a nearly full "
                               "GPU. Use with mode default."}),
                "modulation": (["precomputed", "per step"], {
                    "default": "precomputed",
                    "tooltip": "FLUX only. precomputed: at a run's first step, the blocks' modulation (a quarter of "
                               "FLUX's weights, read at every step for one row per image) is computed for every step "
                               "of the schedule in one pass over those weights; each step then reads its rows "
                               "(FLUX.1-dev fp8 on an H100: 89.9 -> 87.9 ms/step; ~2 MB per step and image). "
                               "Samplers that evaluate between the schedule's sigmas (dpm_2, dpmpp_sde, ...) compute "
                               "it per step; one not known to do so is found at the end of its first run, which is "
                               "then sampled again (the log says so). Other packs' model wrappers or block patches "
                               "and Context Parallel's cfg split also mean per step. per step: as ComfyUI does it."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, compiled at its first sampling step.",)
    FUNCTION = "apply"
    CATEGORY = "para_attn"
    DESCRIPTION = ("torch.compile for DiT sampling. Regional scope compiles each transformer block class once, so "
                   "warm-up takes seconds. No recompile when the prompt's words, seed, LoRA strength or cache "
                   "threshold change (adding a first LoRA to the model recompiles once); at most one when the "
                   "prompt's length or the resolution does, and one more at the first batch size above 1. Each "
                   "other setting of this node or of FP8 Quantize compiles graphs of its own, and torch keeps at "
                   "most 8 per block code: after many changes in one session the blocks run uncompiled until "
                   "ComfyUI restarts (the log says so). "
                   "Works with FP8 Quantize, First Block Cache and Context Parallel in any order.")

    def apply(self, model, scope, mode, dynamic, fullgraph, cuda_graph="off", modulation="precomputed"):
        from comfy_para_attn.adapters.comfy.compile import apply_compile
        from comfy_para_attn.compile import CompileSettings

        settings = CompileSettings(scope=scope, mode=mode, dynamic=dynamic, fullgraph=fullgraph, cuda_graph=cuda_graph,
                                   modulation=modulation)
        return (apply_compile(model, settings),)


NODE_CLASS_MAPPINGS = {"ParaAttnCompile": ParaAttnCompile}
NODE_DISPLAY_NAME_MAPPINGS = {"ParaAttnCompile": "Compile Model"}
