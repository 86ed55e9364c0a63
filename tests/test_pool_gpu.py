"""The worker pool on CUDA: one GPU per rank through CUDA_VISIBLE_DEVICES, NCCL among the
workers (gpu tier; skipped without 2 GPUs)."""
from __future__ import annotations

import time

import pytest
import torch

from comfy_para_attn.pool import Pool, PoolError, PoolInterrupted
from comfy_para_attn.pool.transfer import fingerprint_tensors, publish_tensors

JOBS = "comfy_para_attn.testing.pool_jobs"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


@pytest.fixture(scope="module")
def cuda_pool():
    began = time.monotonic()
    pool = Pool(2, device="cuda")
    print(f"\n2-rank CUDA pool started in {time.monotonic() - began:.1f} s")
    yield pool
    pool.shutdown()


def test_each_rank_sees_its_own_gpu_and_nccl_reduces(cuda_pool):
    assert cuda_pool.run(f"{JOBS}:all_reduce_ranks", timeout_s=60)["sum"] == 3.0
    visible = cuda_pool.run(f"{JOBS}:gather_from_ranks", ("env", "CUDA_VISIBLE_DEVICES"), timeout_s=60)
    assert len(set(visible)) == 2, visible


def test_interrupt_is_agreed_over_nccl(cuda_pool):
    seen = []
    with pytest.raises(PoolInterrupted):
        cuda_pool.run(f"{JOBS}:steady_steps", {"steps": 400, "sleep_s": 0.02}, timeout_s=60,
                      on_progress=lambda step, total, extra: seen.append(step),
                      should_interrupt=lambda: len(seen) >= 3)
    last = cuda_pool.run(f"{JOBS}:gather_from_ranks", ("cache", "last_step"), timeout_s=60)
    assert last[0] == last[1] < 100


def test_published_tensors_load_onto_the_gpu(cuda_pool):
    weights = {"w": torch.randn(256, 256).to(torch.bfloat16), "b": torch.randn(256) + 2.0}
    handle = publish_tensors(weights, "gpu-test")
    try:
        loaded = cuda_pool.run(f"{JOBS}:load_published", handle, timeout_s=60)
    finally:
        handle.release()
    assert all(torch.equal(loaded[name], weights[name]) for name in weights)
    on_gpu = {name: tensor.cuda() for name, tensor in weights.items()}
    assert fingerprint_tensors(on_gpu) == fingerprint_tensors(weights)


def test_real_cuda_out_of_memory_is_named_and_pool_is_replaced():
    pool = Pool(2, device="cuda")
    try:
        with pytest.raises(PoolError) as info:
            pool.run(f"{JOBS}:allocate", 1 << 44, timeout_s=60)  # 16 TiB
        assert info.value.reason == "out_of_memory" and "out of memory" in str(info.value)
        # The rank is named with the controller's GPU index (inside, torch calls each one GPU 0).
        assert f"rank {info.value.rank} (GPU {info.value.rank})" in str(info.value)
        assert not pool.alive
    finally:
        pool.shutdown()
