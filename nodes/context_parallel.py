"""Context Parallel node: the KSampler after it samples on several GPUs (a background
worker pool) with Ulysses x Ring context parallelism. Thin: inputs, one call into the pack."""


class ParaAttnContextParallel:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A FLUX, HunyuanVideo or Wan model (after LoRA, First Block Cache, "
                                               "FP8 and Compile nodes). Any sampler node can follow."}),
                "gpus": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip":
                                 "GPUs to sample on (one background worker each). 0 = all visible GPUs; 1 = no "
                                 "worker pool (sampling stays in ComfyUI). Without a GPU (or with --cpu) 0 means "
                                 "2 CPU worker processes, and other values count CPU processes."}),
                "layout": (["auto", "manual"], {"default": "auto", "tooltip":
                           "auto: cfg parallel if enabled; then ring for 2 GPUs (measured fastest there), as much "
                           "Ulysses as the heads allow for more, ring for the rest (logged). manual: use the "
                           "degrees below."}),
                "ulysses_degree": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                                           "Ulysses group size (manual layout): heads are split across these GPUs. "
                                           "Must divide the model's attention heads (24 for FLUX, HunyuanVideo and "
                                           "Wan 2.2 5B; 12 for Wan 1.3B; 40 for Wan 14B)."}),
                "ring_degree": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                                        "Ring group size (manual layout): key/value blocks travel around these "
                                        "GPUs. ulysses x ring x (2 if cfg parallel) must equal gpus."}),
                "cfg_parallel": ("BOOLEAN", {"default": False, "tooltip":
                                             "Run the positive and negative halves of CFG on different GPUs. "
                                             "Needs CFG > 1 with a negative prompt (not FLUX guidance-distilled "
                                             "models at cfg 1) and an even number of GPUs; where either is "
                                             "missing, layout auto samples without it (logged), manual refuses."}),
                "attention_backend": (["from model", "auto", "sdpa", "triton", "triton-fp8"], {
                    "default": "from model", "tooltip":
                    "Local attention kernel inside the ring/ulysses paths. from model: what an Attention Backend "
                    "node before this one chose, else sdpa. sdpa: PyTorch's flash/cuDNN. auto: the fastest kernel "
                    "that meets the accuracy bar on these GPUs (measured once per worker). triton / triton-fp8: "
                    "our kernels (fp8 is fastest on long video sequences, slightly less exact)."}),
                "timeout_s": ("FLOAT", {"default": 600.0, "min": 5.0, "max": 86400.0, "step": 5.0, "tooltip":
                                        "Longest silence allowed from the workers (model loading or one step) "
                                        "before the run fails with an error instead of hanging."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model; the next sampler runs it on the worker pool.",)
    FUNCTION = "apply"
    CATEGORY = "para_attn"
    DESCRIPTION = ("Samples on several GPUs at once with context parallelism (Ulysses x Ring), in a pool of "
                   "background workers that stays alive between prompts. No special sampler or loader needed. "
                   "FLUX ControlNets work too (each GPU runs the whole ControlNet).")

    def apply(self, model, gpus, layout, ulysses_degree, ring_degree, cfg_parallel, timeout_s, attention_backend="from model"):
        from comfy_para_attn.adapters.comfy.pool_sampling import apply_context_parallel, make_settings

        settings = make_settings(model, gpus, ulysses_degree, ring_degree, cfg_parallel, timeout_s,
                                 auto=layout == "auto", attention_backend=attention_backend)
        return (apply_context_parallel(model, settings),)


NODE_CLASS_MAPPINGS = {"ParaAttnContextParallel": ParaAttnContextParallel}
NODE_DISPLAY_NAME_MAPPINGS = {"ParaAttnContextParallel": "Context Parallel"}
