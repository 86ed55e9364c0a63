"""Agreed failures on a real GPU (gpu tier, one CUDA worker): a real CUDA out-of-memory in an
agreed step fails the job, keeps the worker, and frees what the step held; a device-side
assert (a broken CUDA context) ends the pool."""
from __future__ import annotations

import pytest
import torch

from comfy_para_attn.pool import Pool, PoolError, PoolJobError

JOBS = "comfy_para_attn.testing.pool_jobs"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_real_cuda_failures_in_agreed_steps():
    pool = Pool(1, device="cuda")
    try:
        before = pool.run(f"{JOBS}:cuda_memory_allocated", None, timeout_s=60)
        pids = pool.pids
        with pytest.raises(PoolJobError) as info:
            pool.run(f"{JOBS}:cuda_failure_in_agreed_step", "oom", timeout_s=60)
        assert info.value.reason == "out_of_memory" and "still running" in str(info.value)
        assert pool.alive and pool.pids == pids
        assert pool.run(f"{JOBS}:cuda_memory_allocated", None, timeout_s=60) == before  # the 1 GiB went
        with pytest.raises(PoolError, match="device-side assert|CUDA error") as info:
            pool.run(f"{JOBS}:cuda_failure_in_agreed_step", "assert", timeout_s=60)
        assert not isinstance(info.value, PoolJobError) and not pool.alive
    finally:
        pool.shutdown()
