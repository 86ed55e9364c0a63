"""Large payload tensors travel once (`pool.sent_once`): the controller's view and a
worker's cache stay in step; changed tensors, another pool and failed jobs send again."""
import pickle

import pytest
import torch

from comfy_para_attn.pool import Pool
from comfy_para_attn.pool.sent_once import MIN_BYTES, TensorsSentOnce, unpack

JOBS = "comfy_para_attn.testing.pool_jobs"


def _payload():
    g = torch.Generator().manual_seed(0)
    return {"conds": torch.randn(512, 1024, generator=g),  # 2 MiB: travels by token
            "lora": [torch.randn(3072, 4, generator=g) for _ in range(3)],  # 48 KiB each
            "small": torch.randn(8, generator=g),  # inline
            "noise": torch.randn(256, 512, generator=g)}  # inline by request: the job may change it


def _sizes(envelope) -> tuple:
    return len(envelope["new"]), len(envelope["held"]), len(pickle.dumps(envelope))


def test_unchanged_tensors_travel_once_and_arrive_equal():
    payload, sender, cache = _payload(), TensorsSentOnce(), {}
    first = sender.pack(payload, pids=[1, 2], inline=("noise",))
    assert _sizes(first)[:2] == (4, 0)  # conds and the three LoRA matrices
    assert all(t.numel() * t.element_size() >= MIN_BYTES for t in first["new"].values())
    got = unpack(first, cache)
    for key in ("conds", "small", "noise"):
        assert torch.equal(got[key], payload[key])
    assert all(torch.equal(a, b) for a, b in zip(got["lora"], payload["lora"]))
    sender.confirm()

    second = sender.pack(payload, pids=[1, 2], inline=("noise",))
    new, held, size = _sizes(second)
    assert (new, held) == (0, 4) and size < 600_000 and _sizes(first)[2] > 2_500_000  # the noise (512 KiB) still travels
    again = unpack(second, cache)
    assert again["conds"] is got["conds"] and torch.equal(again["conds"], payload["conds"])
    assert torch.equal(again["noise"], payload["noise"]) and again["noise"] is not got["noise"]
    assert len(cache) == 4


def test_a_changed_tensor_another_pool_or_a_failed_job_send_again():
    payload, sender, cache = _payload(), TensorsSentOnce(), {}
    unpack(sender.pack(payload, pids=[1, 2]), cache)
    sender.confirm()
    with torch.inference_mode():  # ComfyUI's conds are inference tensors: no version counter
        inference = payload["conds"] * 1
    payload["conds"] = inference
    unpack(sender.pack(payload, pids=[1, 2]), cache)
    sender.confirm()
    with torch.inference_mode():
        inference.fill_(0.5)  # changed in place, same object: its values give it away
    changed = sender.pack(payload, pids=[1, 2])
    assert _sizes(changed)[:2] == (1, 4)  # the noise too travels by token here
    assert torch.equal(unpack(changed, cache)["conds"], torch.full((512, 1024), 0.5))
    sender.confirm()
    assert _sizes(sender.pack(payload, pids=[3, 4]))[:2] == (5, 0)  # another pool holds nothing
    sender.forget()  # the job failed: what the workers kept is unknown
    assert _sizes(sender.pack(payload, pids=[3, 4]))[:2] == (5, 0)


def test_a_worker_that_lacks_a_held_tensor_says_so():
    sender = TensorsSentOnce()
    payload = _payload()
    sender.pack(payload, pids=[1])
    sender.confirm()
    with pytest.raises(RuntimeError, match="believes this worker holds"):
        unpack(sender.pack(payload, pids=[1]), {})


def test_through_a_real_pool_the_second_job_sends_tokens_and_every_rank_reuses_its_copy():
    payload, sender = _payload(), TensorsSentOnce()
    del payload["lora"]
    with Pool(2) as pool:
        results = []
        for _ in range(2):
            envelope = sender.pack(payload, pool.pids, inline=("noise",))
            results.append((_sizes(envelope), pool.run(f"{JOBS}:unpack_sent_once", envelope, timeout_s=60)))
            sender.confirm()
        payload["conds"] = payload["conds"] + 1  # a new tensor: sent, and the old one leaves the caches
        envelope = sender.pack(payload, pool.pids, inline=("noise",))
        results.append((_sizes(envelope), pool.run(f"{JOBS}:unpack_sent_once", envelope, timeout_s=60)))
    (first, r1), (second, r2), (third, r3) = results
    assert first[:2] == (1, 0) and second[:2] == (0, 1) and third[:2] == (1, 0)
    assert second[2] < first[2] / 2
    assert r1["conds"][1] is False and r2["conds"][1] is True and r3["conds"][1] is False
    assert r2["conds"][0] == r1["conds"][0] == pytest.approx(float(_payload()["conds"].double().sum()))
    assert r3["conds"][0] == pytest.approx(r1["conds"][0] + 512 * 1024, rel=1e-6)
    assert r1["cache sizes"] == r2["cache sizes"] == r3["cache sizes"] == [1, 1]
