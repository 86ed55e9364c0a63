"""The attention engine's shard checks on 2 GPUs with NCCL (gpu tier; skipped without 2 GPUs):
each rank's shard equals the matching slice of full attention computed on the CPU."""
import pytest
import torch

from comfy_para_attn.testing.attention_checks import check_parallel_attention, shard_failures
from comfy_para_attn.testing.distributed import run_ranks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


@pytest.mark.parametrize("ulysses,ring,env", [
    (2, 1, {}), (1, 2, {}), (1, 2, {"PARA_ATTN_RING_FETCH_CHUNKS": "3"}), (1, 2, {"PARA_ATTN_RING_GATHER_TOKENS": "0"}),
], ids=["ulysses2", "ring2-fetch", "ring2-fetch-head-groups", "ring2-overlap"])
def test_shards_match_full_attention_over_nccl(ulysses, ring, env, monkeypatch):
    """Short blocks: a ring of two gathers the keys (in one piece, or in head groups, read by
    the attention kernel as strided views); ring2-overlap forces the overlapping ring with its
    log-sum-exp merge."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # read by each rank at import
    per_rank = run_ranks(check_parallel_attention, 2, ulysses, ring, (False, True), "cuda", backend="nccl",
                         one_gpu_per_rank=True, timeout=600)
    assert all(len(errors) == 24 for errors in per_rank)
    failures = shard_failures(per_rank)
    assert not failures, "\n".join(failures)
