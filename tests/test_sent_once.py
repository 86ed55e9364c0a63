"""Large payload tensors travel once (`pool.sent_once`): the controller's view and a
worker's cache stay in step; changed tensors, a job that wrote into what it received,
another pool and failed jobs send again."""
import pickle
import gc
import threading
import time
import weakref

import pytest
import torch

from comfy_para_attn.pool import Pool
from comfy_para_attn.pool.sent_once import MIN_BYTES, ReceivedTensors, TensorsSentOnce, unpack

JOBS = "comfy_para_attn.testing.pool_jobs"


def _payload():
    g = torch.Generator().manual_seed(0)
    return {"conds": torch.randn(512, 1024, generator=g),  # 2 MiB: travels by token
            "lora": [torch.randn(3072, 4, generator=g) for _ in range(3)],  # 48 KiB each
            "small": torch.randn(8, generator=g),  # inline
            "noise": torch.randn(256, 512, generator=g)}  # inline by request: the job may change it


def _sizes(envelope) -> tuple:
    return len(envelope["new"]), len(envelope["held"]), len(pickle.dumps(envelope))


def _send(sender, payload, pids, cache=None, inline=(), job_does=None):
    """One job: pack, unpack in `cache` (a worker) and let `job_does(received payload)` act."""
    with sender.job(pids) as job:
        envelope = job.pack(payload, inline=inline)
        got = None
        if cache is not None:
            got = unpack(pickle.loads(pickle.dumps(envelope)), cache)  # through the pipe, as in the pool
            if job_does is not None:
                job_does(got)
            if cache.changed_since_unpack():  # what the worker job reports
                cache.clear()
                job.spoil()
    return envelope, got


def test_unchanged_tensors_travel_once_and_arrive_equal():
    payload, sender, cache = _payload(), TensorsSentOnce(), ReceivedTensors()
    first, got = _send(sender, payload, [1, 2], cache, inline=("noise",))
    assert _sizes(first)[:2] == (4, 0)  # conds and the three LoRA matrices
    assert all(t.numel() * t.element_size() >= MIN_BYTES for t in first["new"].values())
    for key in ("conds", "small", "noise"):
        assert torch.equal(got[key], payload[key])
    assert all(torch.equal(a, b) for a, b in zip(got["lora"], payload["lora"]))

    second, again = _send(sender, payload, [1, 2], cache, inline=("noise",))
    new, held, size = _sizes(second)
    assert (new, held) == (0, 4) and size < 600_000 and _sizes(first)[2] > 2_500_000  # the noise (512 KiB) still travels
    assert again["conds"].data_ptr() == got["conds"].data_ptr() and torch.equal(again["conds"], payload["conds"])
    assert torch.equal(again["noise"], payload["noise"]) and again["noise"].data_ptr() != got["noise"].data_ptr()
    assert len(cache) == 4


def test_a_changed_tensor_another_pool_or_a_failed_job_send_again():
    payload, sender, cache = _payload(), TensorsSentOnce(), ReceivedTensors()
    _send(sender, payload, [1, 2], cache)
    with torch.inference_mode():  # ComfyUI's conds are inference tensors: no version counter
        inference = payload["conds"] * 1
    payload["conds"] = inference
    _send(sender, payload, [1, 2], cache)
    with torch.inference_mode():
        inference.fill_(0.5)  # changed in place, same object: its values give it away
    changed, got = _send(sender, payload, [1, 2], cache)
    assert _sizes(changed)[:2] == (1, 4)  # the noise too travels by token here
    assert torch.equal(got["conds"], torch.full((512, 1024), 0.5))
    assert _sizes(_send(sender, payload, [3, 4])[0])[:2] == (5, 0)  # another pool holds nothing
    with pytest.raises(ValueError):
        with sender.job([3, 4]) as job:
            job.pack(payload)
            raise ValueError("the job failed: what the workers kept is unknown")
    assert _sizes(_send(sender, payload, [3, 4])[0])[:2] == (5, 0)


def test_a_job_that_writes_into_what_it_received_makes_both_sides_forget():
    payload, sender, cache = _payload(), TensorsSentOnce(), ReceivedTensors()
    _send(sender, payload, [1], cache)
    _, got = _send(sender, payload, [1], cache, job_does=lambda got: got["conds"].mul_(0))
    assert len(cache) == 0 and got["conds"].abs().sum() == 0 and payload["conds"].abs().sum() > 0
    envelope, again = _send(sender, payload, [1], cache)
    assert _sizes(envelope)[:2] == (5, 0) and torch.equal(again["conds"], payload["conds"])
    # Rebinding what the job got (a module's .to(), `.data =`) leaves the cached tensor alone.
    weight = torch.nn.Parameter(torch.ones(64, 64))
    _send(sender, {"p": weight}, [1], cache,
          job_does=lambda got: setattr(got["p"], "data", torch.zeros(64, 64, dtype=torch.float64)))
    (cached,) = cache.values()
    assert cached.dtype == torch.float32 and torch.equal(cached, torch.ones(64, 64))
    envelope, again = _send(sender, {"p": weight}, [1], cache)
    assert _sizes(envelope)[:2] == (0, 1)
    assert isinstance(again["p"], torch.nn.Parameter) and torch.equal(again["p"], torch.ones(64, 64))


def test_the_controller_lets_go_of_tensors_the_graph_no_longer_uses():
    """A LoRA or ControlNet the graph dropped is freed in ComfyUI's process (it can be hundreds of
    MiB), not kept until the next job; what is still used travels as a token, what replaced the
    dropped ones travels again, and the worker ends up with exactly this job's tensors."""
    payload, sender, cache = _payload(), TensorsSentOnce(), ReceivedTensors()
    _send(sender, payload, [1, 2], cache)
    dropped = [weakref.ref(t) for t in [payload["conds"], *payload["lora"][1:]]]
    payload["conds"] = torch.randn(512, 1024, generator=torch.Generator().manual_seed(7))
    payload["lora"] = payload["lora"][:1]
    gc.collect()
    assert [ref() for ref in dropped] == [None, None, None]
    envelope, got = _send(sender, payload, [1, 2], cache)
    assert _sizes(envelope)[:2] == (1, 2)  # the new conds; the LoRA matrix and the noise still in use
    assert torch.equal(got["conds"], payload["conds"]) and torch.equal(got["lora"][0], payload["lora"][0])
    assert len(cache) == 3


def test_forget_waits_for_a_running_job_and_spoils_one_on_its_own_thread():
    payload, sender = _payload(), TensorsSentOnce()
    _send(sender, payload, [1])
    order = []
    with sender.job([1]) as job:
        job.pack(payload)
        other = threading.Thread(target=lambda: (sender.forget(), order.append("forgot")))
        other.start()
        time.sleep(0.2)
        order.append("job done")
    other.join(5)
    assert order == ["job done", "forgot"]
    assert _sizes(_send(sender, payload, [1])[0])[:2] == (5, 0)
    with sender.job([1]) as job:
        job.pack(payload)
        sender.forget()  # ComfyUI unloading its models from inside the job's own thread
    assert _sizes(_send(sender, payload, [1])[0])[:2] == (5, 0)


def test_no_job_packs_while_the_workers_drop_their_copies():
    """ComfyUI unloading its models (another thread) forgets and has the workers drop their
    copies in one block: a job starting meanwhile waits, then sends everything."""
    payload, sender = _payload(), TensorsSentOnce()
    _send(sender, payload, [1])
    sizes, order = [], []

    def prompt():
        sizes.append(_sizes(_send(sender, payload, [1])[0])[:2])
        order.append("job")

    with sender.forgetting():
        other = threading.Thread(target=prompt)
        other.start()
        time.sleep(0.2)
        order.append("workers dropped")
    other.join(5)
    assert order == ["workers dropped", "job"] and sizes == [(5, 0)]


def test_sparse_and_small_tensors_travel_inline():
    sparse = torch.eye(256).to_sparse()
    sender = TensorsSentOnce()
    envelope, got = _send(sender, {"sparse": sparse, "small": torch.ones(4)}, [1], ReceivedTensors())
    assert envelope["new"] == {} and torch.equal(got["sparse"].to_dense(), torch.eye(256))


def test_a_worker_that_lacks_a_held_tensor_says_so():
    sender = TensorsSentOnce()
    payload = _payload()
    _send(sender, payload, [1])
    with pytest.raises(RuntimeError, match="believes this worker holds"):
        _send(sender, payload, [1], ReceivedTensors())


def test_through_a_real_pool_the_second_job_sends_tokens_and_every_rank_reuses_its_copy():
    payload, sender = _payload(), TensorsSentOnce()
    del payload["lora"]
    results = []

    def run(pool):
        with sender.job(pool.pids) as job:
            envelope = job.pack(payload, inline=("noise",))
            results.append((_sizes(envelope), pool.run(f"{JOBS}:unpack_sent_once", envelope, timeout_s=60)))

    with Pool(2) as pool:
        run(pool)
        run(pool)
        payload["conds"] = payload["conds"] + 1  # a new tensor: sent, and the old one leaves the caches
        run(pool)
    (first, r1), (second, r2), (third, r3) = results
    assert first[:2] == (1, 0) and second[:2] == (0, 1) and third[:2] == (1, 0)
    assert second[2] < first[2] / 2
    assert r1["conds"][1] is False and r2["conds"][1] is True and r3["conds"][1] is False
    assert r2["conds"][0] == r1["conds"][0] == pytest.approx(float(_payload()["conds"].double().sum()))
    assert r3["conds"][0] == pytest.approx(r1["conds"][0] + 512 * 1024, rel=1e-6)
    assert r1["cache sizes"] == r2["cache sizes"] == r3["cache sizes"] == [1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tokens_name_gpu_tensors_too():
    """ControlNet weights are on the GPU under --highvram / --gpu-only: their token must not
    need a host tensor (numpy refused a CUDA one)."""
    from comfy_para_attn.pool.sent_once import tensor_token

    weight = torch.randn(256, 256, device="cuda")
    token = tensor_token(weight)
    assert token == tensor_token(weight)
    weight.add_(1.0)  # a write changes the version and the sample
    assert tensor_token(weight) != token
