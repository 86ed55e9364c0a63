"""comfy-para-attn: fast DiT sampling for ComfyUI and diffusers.

Importing this package is cheap and needs neither ComfyUI nor a GPU.
"""
__version__ = "0.1.0"
