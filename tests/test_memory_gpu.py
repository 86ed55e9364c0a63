"""ComfyUI's models on the GPU that rank 0 shares with it (gpu tier; skipped without CUDA)."""
import pytest
import torch

from comfy_para_attn.testing.comfy_pool_checks import room_for_comfyui_on_a_shared_gpu, room_for_workers_on_a_shared_gpu
from comfy_para_attn.testing.distributed import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_comfyui_models_leave_the_pool_gpu_only_when_the_workers_need_the_room(comfyui_path):
    (seen,) = run_ranks(room_for_workers_on_a_shared_gpu, 1, str(comfyui_path), timeout=300)
    assert seen["loaded_on"] == "cuda"
    assert seen["roomy"] == [] and seen["after_roomy"] == "cuda", seen
    assert seen["other_gpus_only"] == [] and seen["after_other"] == "cuda", seen
    assert seen["tight"] == ["Linear"] and seen["after_tight"] == "cpu", seen


def test_the_workers_leave_the_pool_gpu_only_when_comfyui_needs_the_room(comfyui_path):
    (seen,) = run_ranks(room_for_comfyui_on_a_shared_gpu, 1, str(comfyui_path), timeout=300)
    assert seen["finite"] and seen["held"], seen
    for prompt in ("pool prompt", "one-GPU prompt"):
        assert seen[prompt, "roomy"] == ("cuda", True), seen  # ComfyUI's model loaded beside the worker's VAE
    assert seen["pool prompt", "tight"] == ("cpu", True), seen  # ComfyUI unloaded its own only
    assert seen["one-GPU prompt", "tight"] == ("cpu", False), seen  # ... then the worker dropped its VAE
    assert len(seen["messages"]) == 1 and "workers dropped their cached vae (1) for ComfyUI's own models" \
        in seen["messages"][0], seen
