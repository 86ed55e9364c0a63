"""Attention Backend node: which kernel runs the model's attention on this GPU."""


class ParaAttnAttentionBackend:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model whose attention should use this kernel."}),
                "attention_backend": (["auto", "sdpa", "triton", "triton-fp8"], {"default": "auto", "tooltip":
                    "auto: the fastest kernel that meets the accuracy bar on this GPU (measured once). sdpa: "
                    "PyTorch's flash/cuDNN kernels. triton: our bf16 kernel. triton-fp8: quantized attention "
                    "for Hopper/Ada (fastest on long video sequences, slightly less exact). Unsupported shapes "
                    "or GPUs fall back to sdpa and say why once in the log."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model, its attention routed to the chosen kernel (here and in Context Parallel's "
                       "workers when that node's attention_backend is 'from model').",)
    FUNCTION = "apply"
    CATEGORY = "para_attn"
    DESCRIPTION = ("Chooses the attention kernel (also used by Context Parallel's workers unless that node "
                   "names its own).")

    def apply(self, model, attention_backend):
        from comfy_para_attn.adapters.comfy.attention_backend import apply_attention_backend

        return (apply_attention_backend(model, attention_backend),)


NODE_CLASS_MAPPINGS = {"ParaAttnAttentionBackend": ParaAttnAttentionBackend}
NODE_DISPLAY_NAME_MAPPINGS = {"ParaAttnAttentionBackend": "Attention Backend"}
