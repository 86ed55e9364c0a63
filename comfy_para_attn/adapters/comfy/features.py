"""Our single-GPU features by name, so that pool workers can re-apply them from the
picklable settings the nodes store in `transformer_options["para_attn"]`."""
from __future__ import annotations

import importlib

# name -> "module:function(model_patcher, settings) -> model_patcher"
APPLIERS = {
    "attention_backend": "comfy_para_attn.adapters.comfy.attention_backend:apply_attention_backend",
    "fp8": "comfy_para_attn.adapters.comfy.fp8:apply_fp8",
    "compile": "comfy_para_attn.adapters.comfy.compile:apply_compile",
    "first_block_cache": "comfy_para_attn.adapters.comfy.first_block_cache:apply_first_block_cache",
}


def apply(name: str, model_patcher, settings):
    if name not in APPLIERS:
        raise ValueError(f"unknown comfy-para-attn feature {name!r}; known: {', '.join(APPLIERS)}")
    module, _, function = APPLIERS[name].partition(":")
    return getattr(importlib.import_module(module), function)(model_patcher, settings)
