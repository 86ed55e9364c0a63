"""Failure injection for Context Parallel sampling in real ComfyUI on 2 CPU worker ranks:
a worker killed mid-run, a worker exception, a hang past the timeout, ComfyUI's interrupt,
and a layout change. Each failure becomes an error within seconds, and the next prompt
succeeds (comfyui tier)."""
import os
import signal
import time

import pytest

from comfy_para_attn.testing.comfy_pool_checks import POOL_TOL, context_parallel


@pytest.fixture(scope="module")
def setup(comfyui_path, pack_nodes):
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    from comfy_para_attn.testing import comfy_models

    reference = comfy_models.sample(patcher, pos, neg, latent, steps=4, cfg=1.0)
    yield pack_nodes, patcher, pos, neg, latent, reference
    from comfy_para_attn.pool import shutdown_pool

    shutdown_pool()


def _sample(model, pos, neg, latent, **kw):
    from comfy_para_attn.testing import comfy_models

    return comfy_models.sample(model, pos, neg, latent, steps=4, cfg=1.0, **kw)


def _next_prompt_succeeds(setup):
    pack_nodes, patcher, pos, neg, latent, reference = setup
    out = _sample(context_parallel(pack_nodes, patcher), pos, neg, latent)
    assert (out - reference).abs().max().item() < POOL_TOL


def _sample_interrupted_at_step_1(model, pos, neg, latent) -> list:
    """Sample with ComfyUI's interrupt raised at step 1; the steps the callback saw."""
    import comfy.model_management

    seen = []

    def interrupt_at_step(step, x0, x, total):
        seen.append(step)
        if step == 1:
            comfy.model_management.interrupt_current_processing(True)

    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _sample(model, pos, neg, latent, callback=interrupt_at_step)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    return seen


def _current_pool():
    from comfy_para_attn.pool import registry

    return registry._current


def test_cancel_while_the_pool_starts_stops_the_start(setup):
    """Cancel pressed while a first prompt starts the workers: the prompt stops as interrupted
    (no error, no half-started pool), and the next prompt starts a pool and succeeds."""
    import comfy.model_management

    from comfy_para_attn.pool import current_pool, shutdown_pool

    pack_nodes, patcher, pos, neg, latent, _ = setup
    shutdown_pool()
    comfy.model_management.interrupt_current_processing(True)
    began = time.monotonic()
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _sample(context_parallel(pack_nodes, patcher), pos, neg, latent)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert time.monotonic() - began < 3.0 and current_pool() is None
    _next_prompt_succeeds(setup)


def test_worker_killed_mid_run(setup):
    from comfy_para_attn.pool import PoolError

    pack_nodes, patcher, pos, neg, latent, _ = setup
    _next_prompt_succeeds(setup)  # the pool is up
    victim = _current_pool().pids[1]

    def kill_at_step(step, x0, x, total):
        if step == 1:
            os.kill(victim, signal.SIGKILL)

    began = time.monotonic()
    with pytest.raises(PoolError, match="rank 1 .*SIGKILL"):
        _sample(context_parallel(pack_nodes, patcher), pos, neg, latent, callback=kill_at_step)
    assert time.monotonic() - began < 20
    _next_prompt_succeeds(setup)
    assert victim not in _current_pool().pids


def test_worker_exception_carries_its_traceback(setup):
    from comfy_para_attn.pool import PoolError
    from comfy_para_attn.testing.comfy_pool_checks import with_faulty_block

    pack_nodes, patcher, pos, neg, latent, _ = setup
    with pytest.raises(PoolError) as info:
        _sample(context_parallel(pack_nodes, with_faulty_block(patcher, "raise")), pos, neg, latent)
    assert "injected failure in a block patch" in str(info.value)
    assert "Traceback" in str(info.value) or "traceback" in str(info.value)
    _next_prompt_succeeds(setup)


def test_a_job_that_fails_to_set_up_on_one_rank_keeps_the_pool(setup):
    """A failure while the workers set the job up (here: unpickling on rank 1) fails the
    prompt on every rank together; the same workers, with the model they hold, take the next."""
    from comfy_para_attn.pool import PoolError, PoolJobError
    from comfy_para_attn.testing.comfy_pool_checks import FailsToLoadOnRank

    pack_nodes, patcher, pos, neg, latent, _ = setup
    _next_prompt_succeeds(setup)
    pids = list(_current_pool().pids)
    broken = patcher.clone()
    broken.model_options["transformer_options"]["another_pack"] = FailsToLoadOnRank(1)
    with pytest.raises(PoolJobError, match="injected failure while loading the job") as info:
        _sample(context_parallel(pack_nodes, broken), pos, neg, latent)
    assert not isinstance(info.value, PoolError) and info.value.rank == 1
    assert "the worker pool is still running" in str(info.value)
    _next_prompt_succeeds(setup)
    assert _current_pool().pids == pids


def test_hang_past_timeout(setup):
    from comfy_para_attn.pool import PoolError
    from comfy_para_attn.testing.comfy_pool_checks import with_faulty_block

    pack_nodes, patcher, pos, neg, latent, _ = setup
    _next_prompt_succeeds(setup)
    began = time.monotonic()
    with pytest.raises(PoolError, match="(?i)timeout|timed out|silent|no message") as info:
        _sample(context_parallel(pack_nodes, with_faulty_block(patcher, "hang"), timeout_s=5.0), pos, neg, latent)
    assert time.monotonic() - began < 30
    assert "raise timeout_s on the Context Parallel node (now 5 s)" in str(info.value)  # what the user can do
    _next_prompt_succeeds(setup)


def test_interrupt_stops_all_ranks_and_pool_stays(setup):
    pack_nodes, patcher, pos, neg, latent, _ = setup
    _next_prompt_succeeds(setup)
    pids = list(_current_pool().pids)
    seen = _sample_interrupted_at_step_1(context_parallel(pack_nodes, patcher), pos, neg, latent)
    assert max(seen) < 3, f"sampling ran on after the interrupt: steps {seen}"
    _next_prompt_succeeds(setup)
    assert _current_pool().pids == pids  # same workers: the pool stayed usable


def test_an_interrupted_prompt_with_other_conds_leaves_nothing_stale(setup, monkeypatch):
    """A prompt's tensors travel once (every tensor by token here): prompt A, then an
    interrupted prompt with other conds (the workers may or may not have swapped their
    copies), then A again, which must find what it needs and sample as before."""
    from comfy_para_attn.pool import sent_once
    from comfy_para_attn.testing import comfy_models

    monkeypatch.setattr(sent_once, "MIN_BYTES", 0)
    pack_nodes, patcher, pos, neg, latent, _ = setup
    _next_prompt_succeeds(setup)
    other = comfy_models.conditioning(patcher, tokens=8, seed=11)
    _sample_interrupted_at_step_1(context_parallel(pack_nodes, patcher), other, neg, latent)
    _next_prompt_succeeds(setup)


def test_layout_change_rebuilds_pool(setup):
    pack_nodes, patcher, pos, neg, latent, reference = setup
    _next_prompt_succeeds(setup)
    before = list(_current_pool().pids)
    out = _sample(context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=3, gpus=3), pos, neg, latent)
    assert (out - reference).abs().max().item() < POOL_TOL
    assert _current_pool().pids != before
    _next_prompt_succeeds(setup)


def test_a_model_error_that_fails_in_process_too_keeps_the_pool(setup):
    """HunyuanVideo does not pad its latent: an odd width fails inside ComfyUI's own code on
    every rank alike, as it fails in-process. The prompt fails with that error, and the pool
    stays (no restart and no model reload for the next prompt)."""
    from comfy_para_attn.pool import PoolJobError
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("hunyuan_video", latent=dict(height=8, width=5))
    with pytest.raises(RuntimeError) as in_process:
        _sample(patcher, pos, neg, latent)
    first_line = str(in_process.value).splitlines()[0]
    _next_prompt_succeeds(setup)
    pids = _current_pool().pids
    for layout in (dict(ulysses_degree=2), dict(ulysses_degree=1, ring_degree=2)):
        with pytest.raises(PoolJobError, match="the worker pool is still running") as info:
            _sample(context_parallel(setup[0], patcher, **layout), pos, neg, latent)
        assert first_line in str(info.value), (first_line, str(info.value)[:500])
        assert _current_pool().pids == pids
    _next_prompt_succeeds(setup)
    assert _current_pool().pids == pids
