"""Worker pool with real processes and real gloo collectives (unit tier, CPU): jobs, progress,
interrupts, start-up settings and the pool's reuse and replacement.

Each test that breaks a pool starts its own; the others share one 2-rank pool (conftest's `pool`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from comfy_para_attn.pool import (
    Pool,
    PoolError,
    PoolInterrupted,
    PoolStartError,
    get_pool,
)
from comfy_para_attn.pool.launch import HOST_THREADS_ENV, PoolLayout, worker_env
from comfy_para_attn.testing.processes import child_pids, process_gone, wait_until

JOBS = "comfy_para_attn.testing.pool_jobs"
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_all_reduce_job_returns_rank0_result(pool):
    result = pool.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)
    assert result == {"sum": 3.0, "world_size": 2, "device": "cpu", "pid": pool.pids[0]}
    assert pool.start_seconds is not None and pool.start_seconds > 0  # its time: bench_context_parallel.py


def test_progress_arrives_in_order_from_rank0_only(pool):
    seen = []
    result = pool.run(f"{JOBS}:count_steps", {"steps": 25}, timeout_s=20,
                      on_progress=lambda step, total, extra: seen.append((step, total, extra)))
    assert result == "counted"
    assert seen == [(step, 25, {"rank": 0}) for step in range(1, 26)]


def test_cache_persists_across_jobs_on_every_rank(pool):
    pids = pool.pids
    assert pool.run(f"{JOBS}:remember", {"key": "model", "value": [1, 2, 3]}, timeout_s=20) == pids[0]
    cached = pool.run(f"{JOBS}:gather_from_ranks", ("cache", "model"), timeout_s=20)
    assert cached == [{"value": [1, 2, 3], "rank": rank, "pid": pids[rank]} for rank in (0, 1)]
    assert pool.pids == pids and pool.alive


def test_timeout_is_a_deadline_on_silence_not_on_total_time(pool):
    seen = []
    began = time.monotonic()
    result = pool.run(f"{JOBS}:slow_but_chatty", {"steps": 8, "sleep_s": 0.3}, timeout_s=1.0,
                      on_progress=lambda step, total, extra: seen.append(step))
    assert result == 8 and time.monotonic() - began > 2.0  # ran past timeout_s, not hung
    assert seen == [1, 3, 5, 7]  # heartbeats reset the deadline without calling on_progress


def test_interrupt_stops_every_rank_at_the_same_step_and_pool_stays_usable(pool):
    pids, seen = pool.pids, []
    began = time.monotonic()
    with pytest.raises(PoolInterrupted):
        pool.run(f"{JOBS}:steady_steps", {"steps": 400, "sleep_s": 0.05}, timeout_s=20,
                 on_progress=lambda step, total, extra: seen.append(step),
                 should_interrupt=lambda: len(seen) >= 3)
    assert time.monotonic() - began < 10
    last_steps = pool.run(f"{JOBS}:gather_from_ranks", ("cache", "last_step"), timeout_s=20)
    assert last_steps[0] == last_steps[1], "ranks stopped at different steps"
    assert 3 <= last_steps[0] < 30
    assert pool.pids == pids and pool.alive
    assert pool.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)["sum"] == 3.0


def test_exception_in_on_progress_interrupts_and_is_reraised(pool):
    class StopFromCallback(Exception):
        pass

    def on_progress(step, total, extra):
        if step == 2:
            raise StopFromCallback("hook raised")

    with pytest.raises(StopFromCallback, match="hook raised"):
        pool.run(f"{JOBS}:steady_steps", {"steps": 400, "sleep_s": 0.05}, timeout_s=20,
                 on_progress=on_progress)
    last_steps = pool.run(f"{JOBS}:gather_from_ranks", ("cache", "last_step"), timeout_s=20)
    assert last_steps[0] == last_steps[1] and 2 <= last_steps[0] < 30
    assert pool.alive


def test_sys_path_env_and_init_reach_every_rank(tmp_path):
    (tmp_path / "pool_test_extra_jobs.py").write_text(textwrap.dedent("""
        import os

        def describe(ctx, payload):
            return {"init": ctx.cache["init"], "flag": os.environ["POOL_TEST_FLAG"],
                    "payload": payload}
    """))
    with Pool(2, sys_path=[tmp_path], env={"POOL_TEST_FLAG": "on"},
              init=(f"{JOBS}:init_remember", {"settings": 7})) as extra:
        result = extra.run("pool_test_extra_jobs:describe", "hello", timeout_s=20)
        assert result == {"init": {"payload": {"settings": 7}, "rank": 0}, "flag": "on",
                          "payload": "hello"}
        inits = extra.run(f"{JOBS}:gather_from_ranks", ("cache", "init"), timeout_s=20)
        assert inits == [{"payload": {"settings": 7}, "rank": rank} for rank in (0, 1)]


def test_cuda_ranks_sample_on_one_host_thread_and_cpu_ranks_take_their_share(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(HOST_THREADS_ENV, raising=False)
    share = str(max(1, (os.cpu_count() or 1) // 2))
    cuda = worker_env(PoolLayout.create(2, device="cuda"), 1234)
    assert (cuda["OMP_NUM_THREADS"], cuda[HOST_THREADS_ENV]) == ("1", share)
    cpu = worker_env(PoolLayout.create(2), 1234)
    assert (cpu["OMP_NUM_THREADS"], cpu[HOST_THREADS_ENV]) == (share, share)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's setting wins everywhere
    cuda = worker_env(PoolLayout.create(2, device="cuda"), 1234)
    assert (cuda["OMP_NUM_THREADS"], cuda[HOST_THREADS_ENV]) == ("5", "5")


def test_comfyui_folder_comes_before_the_pack_on_the_workers_import_path(tmp_path, monkeypatch):
    """ComfyUI's `nodes` module must win over this pack's `nodes/` package in a worker, also
    when ComfyUI was started from another folder."""
    from comfy_para_attn.pool.launch import REPO_ROOT as PACK

    monkeypatch.delenv("PYTHONPATH", raising=False)
    comfy_folder = tmp_path / "ComfyUI"
    comfy_folder.mkdir()
    (comfy_folder / "nodes.py").write_text("WHO = 'comfyui'\n")
    layout = PoolLayout.create(2, sys_path=[str(comfy_folder), PACK])
    paths = worker_env(layout, 1234)["PYTHONPATH"].split(os.pathsep)
    assert paths == [str(comfy_folder.resolve()), PACK]
    found = subprocess.run([sys.executable, "-c", "import nodes; print(nodes.WHO)"], cwd=tmp_path, text=True,
                           capture_output=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)))
    assert found.stdout.strip() == "comfyui", found.stderr


def test_a_start_that_fails_before_any_worker_leaves_no_descriptor(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(PoolStartError, match="GPU index 1 is not among CUDA_VISIBLE_DEVICES=0"):
            Pool(2, device="cuda", gpus=[0, 1])
    assert len(os.listdir("/proc/self/fd")) == before


def test_an_interrupt_while_the_workers_start_stops_the_start():
    """ComfyUI's Cancel while a first prompt starts the pool (seconds: the workers import torch
    and join their group) stops it then, not after the start and the model load."""
    before = child_pids()
    asked = time.monotonic() + 0.3
    began = time.monotonic()
    with pytest.raises(PoolInterrupted, match="start was interrupted"):
        Pool(2, should_interrupt=lambda: time.monotonic() > asked)
    assert time.monotonic() - began < 2.0  # a start takes several seconds here (importing torch)
    assert child_pids() <= before, "the interrupted start left worker processes behind"
    with Pool(2, should_interrupt=lambda: False) as pool:  # polled, never true: starts as usual
        assert pool.run(f"{JOBS}:all_reduce_ranks", None, timeout_s=30)["sum"] == 3.0


def test_host_threads_raises_the_thread_count_for_a_block_and_restores_it():
    share = max(1, (os.cpu_count() or 1) // 2)
    with Pool(2, env={HOST_THREADS_ENV: "3"}) as threaded:
        counts = threaded.run(f"{JOBS}:thread_counts", None, timeout_s=20)
    assert counts == {"before": share, "inside": 3, "after": share}


def test_four_ranks_reduce_and_agree_on_interrupt():
    with Pool(4) as four:
        assert four.run(f"{JOBS}:all_reduce_ranks", timeout_s=30)["sum"] == 10.0
        seen = []
        with pytest.raises(PoolInterrupted):
            four.run(f"{JOBS}:steady_steps", {"steps": 400, "sleep_s": 0.02}, timeout_s=30,
                     on_progress=lambda step, total, extra: seen.append(step),
                     should_interrupt=lambda: len(seen) >= 2)
        last_steps = four.run(f"{JOBS}:gather_from_ranks", ("cache", "last_step"), timeout_s=30)
        assert len(set(last_steps)) == 1 and last_steps[0] < 100


def test_worker_that_died_between_jobs_fails_the_next_run_and_is_replaced(clean_registry):
    first = get_pool(1)
    os.kill(first.pids[0], signal.SIGKILL)
    assert wait_until(lambda: not first.alive, 5.0)
    with pytest.raises(PoolError) as info:
        first.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)
    assert info.value.reason == "died" and "between jobs" in str(info.value)
    assert get_pool(1) is not first


def test_a_pool_whose_worker_died_idle_is_replaced_with_a_warning(clean_registry, caplog):
    """The host's OOM killer takes a worker between prompts: the next prompt starts a new
    pool (and loads the model again) and the log says why it is slower."""
    first = get_pool(1)
    os.kill(first.pids[0], signal.SIGKILL)
    assert wait_until(lambda: not first.alive, 5.0)
    with caplog.at_level("WARNING", logger="comfy_para_attn.pool"):
        second = get_pool(1)
    assert second is not first and second.alive
    assert "was killed by SIGKILL" in caplog.text and "between jobs" in caplog.text
    assert "starting a new pool" in caplog.text


def test_get_pool_reuses_until_the_layout_changes(clean_registry, caplog):
    two = get_pool(2)
    assert get_pool(2) is two
    with caplog.at_level("INFO", logger="comfy_para_attn.pool"):
        one = get_pool(1)
    assert one is not two and not two.alive
    assert "layout changed from 2 CPU rank(s) to 1 CPU rank(s); restarting it" in caplog.text
    assert all(process_gone(pid) for pid in two.pids)
    assert one.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)["sum"] == 1.0

    flagged = get_pool(1, env={"POOL_TEST_FLAG": "x"})
    assert flagged is not one and not one.alive
    assert get_pool(1, env={"POOL_TEST_FLAG": "x"}) is flagged
    assert flagged.run(f"{JOBS}:gather_from_ranks", ("env", "POOL_TEST_FLAG"), timeout_s=20) == ["x"]


def test_alternating_layouts_warn_once_that_each_switch_restarts_the_pool(clean_registry, caplog):
    """Two nodes asking for different rank counts (Context Parallel on 2, Parallel VAE Decode
    on 1) restart the pool at every switch: the first return to a replaced layout warns,
    once, naming both; a plain change of layout does not."""
    import logging

    with caplog.at_level(logging.WARNING, logger="comfy_para_attn.pool"):
        get_pool(2)
        get_pool(1)
        assert "keeps switching" not in caplog.text  # one change: nothing to say
        get_pool(2)
        get_pool(1)
        get_pool(2)
    warnings = [r.getMessage() for r in caplog.records if "keeps switching" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "1 CPU rank(s)" in warnings[0] and "2 CPU rank(s)" in warnings[0] and "gpus" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="comfy_para_attn.pool"):
        for flag in ("a", "b", "a"):  # same ranks, another environment
            get_pool(1, env={"POOL_TEST_FLAG": flag})
    warnings = [r.getMessage() for r in caplog.records if "keeps switching" in r.getMessage()]
    assert len(warnings) == 1 and "environment" in warnings[0] and "gpus" not in warnings[0], warnings


def test_shutdown_exits_cleanly_reaps_and_closes_descriptors():
    descriptors_before = len(os.listdir("/proc/self/fd"))
    single = Pool(1)
    pids = single.pids
    assert len(os.listdir("/proc/self/fd")) > descriptors_before
    single.shutdown()
    assert single.returncodes == [0], "workers should leave on the shutdown message, not be killed"
    assert all(process_gone(pid) for pid in pids)
    assert len(os.listdir("/proc/self/fd")) == descriptors_before
    with pytest.raises(PoolError) as info:
        single.run(f"{JOBS}:all_reduce_ranks", timeout_s=5)
    assert info.value.reason == "dead"


def test_worker_output_reaches_comfyuis_log_interceptor(comfyui_path):
    """ComfyUI replaces sys.stderr / sys.stdout with its LogInterceptor (the frontend's log
    panel and /internal/logs read what it keeps); the workers' warnings and prints go through
    it, not around it to the inherited descriptor. Without an interceptor they inherit."""
    script = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(comfyui_path)!r})
        from comfy_para_attn.pool import Pool
        from comfy_para_attn.pool.launch import output_needs_relay
        plain = output_needs_relay()
        from app.logger import get_logs, setup_logger
        setup_logger(log_level="INFO")
        relayed = output_needs_relay()
        pool = Pool(2)
        ranks = pool.run("{JOBS}:log_and_print", "hello-relay", timeout_s=60)
        pool.shutdown()
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline and text.count("hello-relay") < 4:
            time.sleep(0.1)
            text = "".join(entry["m"] for entry in get_logs())
        sys.__stdout__.write(json.dumps({{"plain": plain, "relayed": relayed, "ranks": ranks, "text": text}}) + "\\n")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["plain"] and result["relayed"]
    for rank in (0, 1):
        assert f"[para-attn rank {rank}] WARNING comfy_para_attn.test: logged by rank {rank}: hello-relay" in result["text"]
        assert f"printed by rank {rank}: hello-relay" in result["text"]


def test_info_lines_a_job_captures_for_the_controller_are_not_printed_by_the_worker_too(capfd):
    """The sampling job lowers the root level to collect INFO lines (the controller logs them);
    the worker's console handler keeps its own WARNING level (each line showed twice or three
    times in ComfyUI's log)."""
    single = Pool(1)
    try:
        lines = single.run(f"{JOBS}:log_while_capturing_info", "xyzzy", timeout_s=30)
        single.run(f"{JOBS}:all_reduce_ranks", timeout_s=30)  # the first job's output is out by now
    finally:
        single.shutdown()
    printed = capfd.readouterr().err
    assert lines == ["info for the controller xyzzy", "warning for the console xyzzy"]
    assert "warning for the console xyzzy" in printed and "info for the controller xyzzy" not in printed
