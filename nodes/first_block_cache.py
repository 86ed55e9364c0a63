"""First Block Cache node: reuse the transformer's tail on steps where the first block's
residual barely changed. Thin: declarative inputs, one call into `comfy_para_attn`."""


class ParaAttnFirstBlockCache:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A FLUX, HunyuanVideo or Wan diffusion model to add First Block Cache to."}),
                "residual_diff_threshold": ("FLOAT", {
                    "default": 0.12, "min": 0.0, "max": 1.0, "step": 0.001, "display": "slider",
                    "tooltip": "Reuse the cached output of the rest of the network when the first block's residual "
                               "changed by less than this (relative mean absolute difference to the last computed "
                               "step). Higher is faster, lower is closer to the plain model. Suggested: FLUX 0.12, "
                               "HunyuanVideo 0.10, Wan 0.08. 0 turns the cache off (output identical to the plain "
                               "model)."}),
                "start_percent": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "display": "slider",
                    "tooltip": "Part of the sampling schedule where caching may start (0 = first step; at most "
                               "end_percent). Steps before it are always computed."}),
                "end_percent": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "display": "slider",
                    "tooltip": "Part of the sampling schedule where caching stops (1 = last step). Steps after "
                               "it are always computed."}),
                "max_consecutive_hits": ("INT", {
                    "default": -1, "min": -1, "max": 1000, "step": 1,
                    "tooltip": "Most steps reused in a row before one is computed again. -1 = unlimited, "
                               "0 = never reuse (cache off)."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with First Block Cache; put it before Context Parallel.",)
    FUNCTION = "apply"
    CATEGORY = "para_attn"
    DESCRIPTION = ("Skips most of the transformer on denoising steps where the first block's residual barely "
                   "changed, reusing the residual of the last computed step: the speedup is the share of calls "
                   "reused, which depends on the model, prompt and threshold. Logs how many model calls were "
                   "reused after each sampling run.")

    def apply(self, model, residual_diff_threshold, start_percent, end_percent, max_consecutive_hits):
        from comfy_para_attn.adapters.comfy.first_block_cache import apply_first_block_cache
        from comfy_para_attn.cache import FirstBlockCacheSettings

        settings = FirstBlockCacheSettings(residual_diff_threshold, start_percent, end_percent, max_consecutive_hits)
        return (apply_first_block_cache(model, settings),)


NODE_CLASS_MAPPINGS = {"ParaAttnFirstBlockCache": ParaAttnFirstBlockCache}
NODE_DISPLAY_NAME_MAPPINGS = {"ParaAttnFirstBlockCache": "First Block Cache"}
