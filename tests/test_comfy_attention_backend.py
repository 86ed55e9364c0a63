"""Attention Backend node in real ComfyUI (comfyui tier): routing the model's attention to our
local kernel gives the plain model's output (fp32 CPU: the SDPA path), and the choice is
validated. The Triton kernels themselves are tested in test_kernels*.py."""
from unittest import mock

import pytest
import torch


@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "wan"])
def test_sdpa_backend_equals_plain(comfyui_path, pack_nodes, family):
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs(family)
    plain = comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=2.0)
    routed = pack_nodes["ParaAttnAttentionBackend"]().apply(patcher, "sdpa")[0]
    from comfy_para_attn.adapters.comfy import attention_backend

    # count the calls that really reach our kernel entry point (it still runs for real)
    with mock.patch.object(attention_backend, "local_attention", wraps=attention_backend.local_attention) as spy:
        out = comfy_models.sample(routed, pos, neg, latent, steps=3, cfg=2.0)
    assert spy.call_count > 0
    assert torch.isfinite(out).all() and plain.abs().mean() > 1e-3
    assert (out - plain).abs().max().item() < 1e-4


def test_unknown_backend_is_rejected(comfyui_path, pack_nodes):
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, *_ = sampling_inputs("flux")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        pack_nodes["ParaAttnAttentionBackend"]().apply(patcher, "fastest")
