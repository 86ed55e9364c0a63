"""Parallel VAE Decode node: ComfyUI's tiled VAE decode with the tiles spread over the GPUs
of the background worker pool (the one Context Parallel uses). Thin: inputs, one call."""


class ParaAttnParallelVAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode: an image (FLUX) or a video "
                                                  "(HunyuanVideo, Wan) latent, any size."}),
                "vae": ("VAE", {"tooltip": "The VAE that belongs to the latent's model (FLUX VAE, "
                                           "HunyuanVideo VAE, Wan 2.1 / 2.2 VAE, ...)."}),
                "gpus": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip":
                                 "GPUs to decode on (one background worker each, shared with Context Parallel). "
                                 "0 = all visible GPUs; 1 = tiled decode in this process. A worker pool Context "
                                 "Parallel is running is used as it is when it has at least this many GPUs (or "
                                 "with 0), so that neither node restarts it. Without a GPU (or with --cpu) 0 "
                                 "means 2 CPU worker processes, and other values count CPU processes."}),
                "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32, "tooltip":
                                      "Tile edge in pixels, as in VAE Decode (Tiled). Smaller tiles use less "
                                      "memory per GPU and give more tiles to share out."}),
                "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32, "tooltip":
                                    "Pixels neighbouring tiles share, blended linearly to hide seams (as in VAE "
                                    "Decode (Tiled): reduced to tile_size / 4 when larger)."}),
                "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4, "tooltip":
                                          "Video VAEs only: frames decoded per tile (as in VAE Decode (Tiled))."}),
                "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4, "tooltip":
                                             "Video VAEs only: frames neighbouring tiles share (as in VAE Decode "
                                             "(Tiled): halved when more than half of temporal_size)."}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image(s) or video frames; the same as VAE Decode (Tiled) with these settings.",)
    FUNCTION = "decode"
    CATEGORY = "para_attn"
    DESCRIPTION = ("VAE Decode (Tiled) on several GPUs: the tiles are shared out to the background workers "
                   "(the VAE is sent once and cached there) and blended with the same weights, so the image "
                   "matches a one-GPU tiled decode (to float rounding), in less time and no more memory per GPU.")

    def decode(self, samples, vae, gpus, tile_size, overlap, temporal_size, temporal_overlap):
        from comfy_para_attn.adapters.comfy.parallel_vae import TiledDecodeSettings, parallel_decode

        settings = TiledDecodeSettings(tile_size, overlap, temporal_size, temporal_overlap)
        return (parallel_decode(vae, samples["samples"], settings, gpus=gpus),)


NODE_CLASS_MAPPINGS = {"ParaAttnParallelVAEDecode": ParaAttnParallelVAEDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"ParaAttnParallelVAEDecode": "Parallel VAE Decode"}
