"""Worker pool lifecycle with real processes and real gloo collectives (unit tier, CPU).

Each test that breaks a pool starts its own; the others share one 2-rank pool.
"""
from __future__ import annotations

import json
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from comfy_para_attn.pool import (
    Pool,
    PoolError,
    PoolInterrupted,
    PoolJobError,
    PoolStartError,
    ShmSpaceError,
    get_pool,
    shutdown_pool,
)
from comfy_para_attn.pool.launch import HOST_THREADS_ENV, PoolLayout, worker_env
from comfy_para_attn.pool import shm
from comfy_para_attn.pool.shm import check_shm_space, controller_dir, pid_namespace, sweep_stale_dirs
from comfy_para_attn.pool.worker import ORPHAN_EXIT_CODE
from comfy_para_attn.pool.transfer import fingerprint_tensors, load_tensors, publish_tensors

JOBS = "comfy_para_attn.testing.pool_jobs"
REPO_ROOT = Path(__file__).resolve().parents[1]


def process_gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaps (orphans' new parent may not reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate, timeout_s: float, period_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


def child_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children()}


@pytest.fixture(scope="module")
def pool():
    shared = Pool(2)
    yield shared
    shared.shutdown()


@pytest.fixture
def clean_registry():
    shutdown_pool()
    yield
    shutdown_pool()


# -- jobs that succeed ---------------------------------------------------------------------


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



def test_a_large_payload_runs_and_warns_that_tensors_belong_in_shared_memory(pool, monkeypatch, caplog):
    from comfy_para_attn.pool import controller

    monkeypatch.setattr(controller, "LARGE_PAYLOAD_BYTES", 1 << 20)
    big = {"key": "big", "value": torch.rand(600_000)}  # 2.4 MB pickled
    with caplog.at_level("WARNING", logger="comfy_para_attn.pool"):
        assert isinstance(pool.run(f"{JOBS}:remember", big, timeout_s=30), int)  # the job still runs
        pool.run(f"{JOBS}:remember", {"key": "small", "value": 1}, timeout_s=30)
    warnings = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
    assert len(warnings) == 1 and "'comfy_para_attn.testing.pool_jobs:remember'" in warnings[0], warnings

def test_published_tensors_round_trip_to_workers_and_release_removes_file(pool):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=generator) + 3.0  # nonzero everywhere
    state_dict = {
        "linear.weight": base,
        "linear.bias": torch.rand(48, generator=generator).to(torch.bfloat16) + 1.0,
        "embedding.ids": torch.randint(1, 1000, (50,), generator=generator),
        "transposed": base.t(),  # a view sharing base's storage
    }
    handle = publish_tensors(state_dict, "test/model weights")
    path = Path(handle.path)
    try:
        assert path.is_file() and handle.nbytes >= base.numel() * 4
        for loaded in (load_tensors(handle), pool.run(f"{JOBS}:load_published", handle, timeout_s=30)):
            assert sorted(loaded) == sorted(state_dict)
            for name, tensor in state_dict.items():
                assert loaded[name].dtype == tensor.dtype
                assert torch.equal(loaded[name], tensor), name
    finally:
        handle.release()
    assert not path.exists()


def test_published_layout_keeps_dtypes_views_and_odd_shapes_and_loaded_copies_stay_private():
    """Raw storages at aligned offsets: every dtype (fp8 too), views sharing a storage (still
    sharing after loading), scalars and empty tensors come back bit-exact; the mapping
    outlives the handle's caller; writing to a loaded tensor never reaches the file."""
    import gc

    generator = torch.Generator().manual_seed(1)
    base = torch.randn(33, 17, generator=generator) + 2.0
    state_dict = {
        "f32": base,
        "row_view": base[5],  # shares base's storage, at an element offset
        "t_view": base.t(),
        "bf16": (torch.rand(7, 3, generator=generator) + 0.5).to(torch.bfloat16),
        "f16": (torch.rand(5, generator=generator) + 0.5).half(),
        "fp8": (torch.rand(16, 16, generator=generator) + 0.25).to(torch.float8_e4m3fn),
        "int64": torch.randint(1, 10**9, (9,), generator=generator),
        "bool": torch.rand(11, generator=generator) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "conj": torch.complex(torch.rand(4, generator=generator), torch.rand(4, generator=generator) + 1).conj(),
    }
    handle = publish_tensors(state_dict, "layout test")
    try:
        loaded = load_tensors(handle)
        gc.collect()
        assert sorted(loaded) == sorted(state_dict)
        for name, tensor in state_dict.items():
            got = loaded[name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and got.stride() == tensor.stride(), name
            assert torch.equal(got.view(torch.uint8) if got.is_floating_point() and got.element_size() == 1
                               else got, tensor.view(torch.uint8) if tensor.is_floating_point()
                               and tensor.element_size() == 1 else tensor), name
        assert loaded["row_view"].untyped_storage().data_ptr() == loaded["f32"].untyped_storage().data_ptr()
        assert loaded["bf16"].untyped_storage().nbytes() < handle.file_bytes  # a storage each, not the file
        assert not loaded["conj"].is_conj() and torch.equal(loaded["conj"], state_dict["conj"].resolve_conj())
        loaded["f32"].add_(1.0)  # copy-on-write: this process's pages only
        assert torch.equal(loaded["row_view"], state_dict["row_view"] + 1.0)
        assert torch.equal(load_tensors(handle)["f32"], base)
    finally:
        handle.release()
    for odd in (base.to_sparse(), torch.empty(3, device="meta")):
        with pytest.raises(TypeError, match="only dense tensors"):
            publish_tensors({"odd": odd}, "odd")


def test_publish_reports_its_progress_on_the_calling_thread():
    """`on_progress(written, total)`: bytes grow to the total of the distinct storages (a view
    counts once), on the thread that called publish_tensors."""
    import threading

    generator = torch.Generator().manual_seed(2)
    state_dict = {f"w{i}": torch.randn(64, 32 + i, generator=generator) for i in range(12)}
    state_dict["view"] = state_dict["w0"][3]
    calls = []
    handle = publish_tensors(state_dict, "progress test",
                             on_progress=lambda done, total: calls.append((done, total, threading.get_ident())))
    try:
        total = sum(t.untyped_storage().nbytes() for k, t in state_dict.items() if k != "view")
        assert handle.nbytes == total and len(calls) == 12
        assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1][:2] == (total, total)
        assert all(c[1] == total and c[2] == threading.get_ident() for c in calls)
        assert torch.equal(load_tensors(handle)["w11"], state_dict["w11"])
    finally:
        handle.release()


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


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("agreed", [False, True])
def test_init_failure_is_a_start_error_with_the_worker_traceback(agreed):
    before = child_pids()
    with pytest.raises(PoolStartError) as info:
        Pool(2, init=(f"{JOBS}:init_fail", {"rank": 1, "message": "settings import exploded", "agreed": agreed}))
    message = str(info.value)
    assert "settings import exploded" in message and "init_fail" in message
    assert ("Traceback" in message or "Traceback" in info.value.worker_traceback) and info.value.rank == 1
    assert "still running" not in message
    assert child_pids() <= before, "a failed start left worker processes behind"


def test_a_failure_while_a_worker_sets_up_reaches_the_controller_with_its_message():
    """A bad worker setting failed before the worker could report: the error said only
    "exited with code 1 while starting"."""
    before = child_pids()
    with pytest.raises(PoolStartError) as info:
        Pool(1, env={"COMFY_PARA_ATTN_WORKER_LOG_LEVEL": "verbose"})
    assert "COMFY_PARA_ATTN_WORKER_LOG_LEVEL='VERBOSE' is no logging level" in str(info.value)
    assert "Traceback" in str(info.value)
    assert child_pids() <= before


def test_worker_exception_reports_its_traceback_and_next_get_pool_is_fresh(clean_registry):
    first = get_pool(2)
    old_pids = first.pids
    began = time.monotonic()
    with pytest.raises(PoolError) as info:
        first.run(f"{JOBS}:raise_on_rank", {"rank": 1, "message": "boom from rank one"}, timeout_s=60)
    assert time.monotonic() - began < 5
    error = info.value
    assert error.rank == 1 and error.reason == "exception"
    assert "boom from rank one" in str(error) and "ValueError" in str(error)
    assert "raise_on_rank" in str(error) and "pool_jobs.py" in error.worker_traceback
    assert not first.alive and all(process_gone(pid) for pid in old_pids)

    second = get_pool(2)
    assert second is not first and set(second.pids).isdisjoint(old_pids)
    assert second.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)["sum"] == 3.0


@pytest.mark.parametrize("failing", [[1], [0, 1]])
def test_a_failure_in_an_agreed_step_fails_the_job_and_keeps_the_pool(pool, failing):
    """Ranks that fail in `ctx.run_agreed` (one, or all) make every rank stop there: the job
    raises PoolJobError with the failing rank's message and traceback, and the same workers
    run the next job (their cache kept)."""
    pids = pool.pids
    pool.run(f"{JOBS}:remember", {"key": "kept", "value": 7}, timeout_s=20)
    with pytest.raises(PoolJobError) as info:
        pool.run(f"{JOBS}:fail_agreed_step", {"ranks": failing, "watch": True}, timeout_s=20)
    error = info.value
    assert not isinstance(error, PoolError) and error.rank == failing[0] and error.reason == "exception"
    assert f"setup failed on rank {failing[0]} (toy job)" in str(error) and "still running" in str(error)
    assert "fail_agreed_step" in error.worker_traceback and error.error_type == "ValueError"
    assert ("other ranks failed too" in str(error)) == (len(failing) > 1)
    assert pool.alive and pool.pids == pids
    # the failed step's frames (a model, activations) are not kept alive by the exception's cycle
    assert pool.run(f"{JOBS}:held_alive", timeout_s=20) == [False, False]
    assert pool.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)["sum"] == 3.0
    kept = pool.run(f"{JOBS}:gather_from_ranks", ("cache", "kept"), timeout_s=20)
    assert [entry["value"] for entry in kept] == [7, 7]


def test_a_failure_in_an_agreed_round_stops_every_rank_there_and_keeps_the_pool(pool):
    pids, steps = pool.pids, []
    with pytest.raises(PoolJobError, match=r"round 2 failed \(toy job\)") as info:
        pool.run(f"{JOBS}:fail_in_agreed_round", {"rank": 1, "round": 2}, timeout_s=20,
                 on_progress=lambda step, total, extra: steps.append(step))
    assert info.value.rank == 1 and steps == [1, 2]  # rounds 0 and 1 finished on every rank
    assert pool.alive and pool.pids == pids
    assert pool.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)["sum"] == 3.0


def test_a_cuda_error_in_an_agreed_step_ends_the_pool():
    """Not out of memory but a sticky CUDA error (its CUDA context is broken): no agreed stop,
    the pool goes."""
    from comfy_para_attn.testing.pool_jobs import AcceleratorError

    doomed = Pool(2)
    pids = doomed.pids
    try:
        with pytest.raises(PoolError, match="setup failed on rank 1") as info:
            doomed.run(f"{JOBS}:fail_agreed_step", {"ranks": [1], "error": AcceleratorError}, timeout_s=20)
        assert info.value.rank == 1 and not doomed.alive and all(process_gone(pid) for pid in pids)
    finally:
        doomed.shutdown()


def test_out_of_memory_in_an_agreed_step_is_named_and_keeps_the_pool(pool):
    with pytest.raises(PoolJobError) as info:
        pool.run(f"{JOBS}:fail_agreed_step", {"ranks": [0], "error": torch.OutOfMemoryError}, timeout_s=20)
    assert info.value.reason == "out_of_memory" and "ran out of memory" in str(info.value)
    assert pool.alive


@pytest.mark.parametrize("signum, named, within_s", [
    (signal.SIGKILL, "SIGKILL", 5),
    # SIGTERM to one worker (not the controller): it still ends, after looking up to 2 s for a
    # dead controller's files, and the error says which rank and which signal.
    (signal.SIGTERM, "ended by SIGTERM", 8),
])
def test_worker_signalled_mid_job_names_the_rank_and_signal(signum, named, within_s):
    doomed = Pool(2)
    pids, sent_at = doomed.pids, []

    def signal_rank1(step, total, extra):
        if step == 3 and not sent_at:
            os.kill(pids[1], signum)
            sent_at.append(time.monotonic())

    try:
        with pytest.raises(PoolError) as info:
            doomed.run(f"{JOBS}:steady_steps", {"steps": 1000, "sleep_s": 0.05}, timeout_s=60,
                       on_progress=signal_rank1)
        assert time.monotonic() - sent_at[0] < within_s
        assert info.value.rank == 1 and info.value.reason == "died"
        assert "rank 1" in str(info.value) and named in str(info.value)
    finally:
        doomed.shutdown()
    assert not doomed.alive and all(process_gone(pid) for pid in pids)


@pytest.mark.parametrize("while_", ["processes start", "the init job runs"])
def test_a_pool_shut_down_while_it_starts_raises_interrupted(tmp_path, monkeypatch, while_):
    """ComfyUI exiting (Ctrl-C: its exit handler shuts the pools down) while the first prompt
    starts the pool: the prompt's start ends as an interrupt, not as a failure with a traceback."""
    if while_ == "processes start":
        (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(3)\n")  # workers start 3 s late
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
        init = None
    else:
        init = (f"{JOBS}:steady_steps", {"steps": 1000, "sleep_s": 0.05})
    outcome = []

    def start():
        try:
            outcome.append(Pool(2, init=init, start_timeout_s=60))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    from comfy_para_attn.pool import controller

    running_before = set(controller._live_pools)  # (other tests' pools stay up)
    starter = threading.Thread(target=start)
    starter.start()
    assert wait_until(lambda: set(controller._live_pools) - running_before, 10.0)
    (starting,) = set(controller._live_pools) - running_before
    if init is None:
        time.sleep(1.0)  # its workers are still starting (3 s late)
    else:
        assert wait_until(lambda: starting._running_job is not None, 30.0), "the init job never started"
    starting.shutdown(timeout_s=3.0)  # as the exit handler does
    starter.join(30)
    assert not starter.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], PoolInterrupted), repr(outcome[0])
    assert "shut down while it started" in str(outcome[0])


def test_a_jobs_forked_child_dies_of_sigterm_and_the_worker_stays():
    """A job's child forked without exec (multiprocessing's fork context) gets the usual SIGTERM,
    not the worker's handler, and its signal does not end the worker."""
    with Pool(1) as pool:
        assert pool.run(f"{JOBS}:terminate_a_forked_child", 5.0, timeout_s=60) == -signal.SIGTERM
        assert pool.alive and pool.run(f"{JOBS}:all_reduce_ranks", timeout_s=30)["sum"] == 1.0


def test_workers_of_a_controller_that_ignores_sighup_keep_running_on_it():
    """ComfyUI started under nohup ignores SIGHUP, and so did its workers before they handled it:
    a closed terminal must not end them while the controller runs on."""
    script = textwrap.dedent("""
        import json, signal, sys
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as nohup leaves it
        from comfy_para_attn.pool import Pool
        pool = Pool(2)
        print(json.dumps(pool.pids), flush=True)
        sys.stdin.readline()  # the test has sent SIGHUP
        print(json.dumps(pool.run("comfy_para_attn.testing.pool_jobs:all_reduce_ranks", timeout_s=30)), flush=True)
        pool.shutdown()
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    controller = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                                  stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
    try:
        worker_pids = json.loads(controller.stdout.readline())
        os.killpg(controller.pid, signal.SIGHUP)
        time.sleep(3.0)  # past the 2 s a signalled worker waits before it ends
        assert not any(process_gone(pid) for pid in worker_pids)
        controller.stdin.write("go\n")
        controller.stdin.flush()
        assert json.loads(controller.stdout.readline())["sum"] == 3.0
        assert controller.wait(30) == 0
    finally:
        controller.kill()
        controller.wait(10)


def test_hang_past_timeout_is_reported_with_job_and_timeout():
    hung = Pool(2)
    pids = hung.pids
    began = time.monotonic()
    try:
        with pytest.raises(PoolError) as info:
            hung.run(f"{JOBS}:sleep_silently", {"seconds": 120}, timeout_s=2)
        assert 2 <= time.monotonic() - began < 30  # the job sleeps 120 s
        assert info.value.reason == "timeout"
        assert "sleep_silently" in str(info.value) and "timeout_s=2" in str(info.value)
        assert not hung.alive and all(process_gone(pid) for pid in pids)
    finally:
        hung.shutdown()


def test_a_worker_frozen_halfway_through_an_event_is_a_timeout_not_a_hang():
    """The controller reads events on threads: a partial message blocks a reader, not it."""
    frozen = Pool(2)
    pids = frozen.pids
    outcome = {}

    def run():
        try:
            frozen.run(f"{JOBS}:freeze_mid_event", {"seconds": 120}, timeout_s=2)
        except PoolError as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=run, daemon=True)
    began = time.monotonic()
    caller.start()
    caller.join(15)
    try:
        assert not caller.is_alive(), "the controller blocked on the partial event"
        assert time.monotonic() - began < 8 and outcome["error"].reason == "timeout"
        assert not frozen.alive and all(process_gone(pid) for pid in pids)
    finally:
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
        frozen.shutdown()


def test_a_dead_worker_whose_child_holds_its_pipe_is_reported_and_the_pipe_closed_later():
    """The event pipe belongs to its reader thread: a worker's child keeping it open delays
    neither the error nor later shutdowns, and the descriptor is closed once the child exits."""
    descriptors_before = len(os.listdir("/proc/self/fd"))
    orphaned = Pool(2)
    began = time.monotonic()
    with pytest.raises(PoolError) as info:
        orphaned.run(f"{JOBS}:die_leaving_a_child_on_the_event_pipe", {"seconds": 20}, timeout_s=60)
    assert info.value.reason == "died" and info.value.rank == 0
    assert time.monotonic() - began < 15  # reported while the child still holds the pipe (20 s)
    began = time.monotonic()
    orphaned.shutdown()
    orphaned.shutdown()
    assert time.monotonic() - began < 10  # nothing waits on the stuck reader again (its child: 20 s)
    # the reader closes rank 0's event pipe once the child holding it exits (counting all our
    # descriptors also counted earlier tests' pools, whose readers close theirs meanwhile)
    assert wait_until(lambda: all(worker.events.closed for worker in orphaned._workers), 40)
    assert len(os.listdir("/proc/self/fd")) <= descriptors_before


def test_a_payload_pickled_by_the_caller_is_sent_as_it_is(pool):
    from comfy_para_attn.pool.protocol import Pickled, encode

    data = pickle.dumps({"key": "pre", "value": [4, 5]}, protocol=pickle.HIGHEST_PROTOCOL)
    assert encode(Pickled(data)) == data
    assert isinstance(pool.run(f"{JOBS}:remember", Pickled(data), timeout_s=20), int)
    cached = pool.run(f"{JOBS}:gather_from_ranks", ("cache", "pre"), timeout_s=20)
    assert [entry["value"] for entry in cached] == [[4, 5], [4, 5]]


def test_the_payload_is_pickled_once_and_a_part_that_cannot_travel_is_named(monkeypatch):
    from comfy_para_attn.adapters.comfy import portable

    checked = []
    monkeypatch.setattr(portable, "_check_picklable", lambda what, obj: checked.append(what))
    payload = {"conds": [torch.randn(3, 4)], "seed": 5}
    assert portable.pickle_payload(payload, {"conds": "the conditioning"}) == pickle.dumps(
        payload, protocol=pickle.HIGHEST_PROTOCOL)
    assert checked == []  # nothing pickled twice on the way
    monkeypatch.undo()
    payload["conds"].append(threading.Lock())  # (a local function would travel by value)
    with pytest.raises(portable.NotPortableError, match="cannot send the conditioning"):
        portable.pickle_payload(payload, {"seed": "the seed", "conds": "the conditioning"})
    with pytest.raises(portable.NotPortableError, match="cannot send the job"):
        portable.pickle_payload(payload, {"seed": "the seed"})


def test_out_of_memory_is_named_as_such():
    single = Pool(1)
    try:
        with pytest.raises(PoolError) as info:
            single.run(f"{JOBS}:raise_out_of_memory", timeout_s=20)
        assert info.value.reason == "out_of_memory"
        assert "ran out of memory" in str(info.value) and "OutOfMemoryError" in str(info.value)
    finally:
        single.shutdown()


@pytest.mark.parametrize("ending", ["kill -9 the controller", "SIGTERM to the group", "SIGHUP to the group"])
def test_workers_exit_when_the_controller_is_killed_and_remove_its_published_files(ending):
    """kill -9 runs no atexit handler in the controller: the workers remove the files it
    published (for a real model, gigabytes of host memory in /dev/shm) as they exit. The same
    when SIGTERM or SIGHUP reaches the controller and its workers together (systemd stopping
    ComfyUI, a closed terminal): their default action used to kill the workers first."""
    script = textwrap.dedent("""
        import json, signal, time
        import torch
        from comfy_para_attn.pool import Pool
        from comfy_para_attn.pool.transfer import publish_tensors
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (a test run under nohup would have it ignored)
        pool = Pool(2)
        handle = publish_tensors({"w": torch.ones(1024)}, "killed-controller")
        print(json.dumps([pool.pids, handle.path]), flush=True)
        time.sleep(300)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    controller = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    worker_pids: list[int] = []
    try:
        ready, _, _ = select.select([controller.stdout], [], [], 60)
        assert ready, "the controller did not start its pool within 60 s"
        worker_pids, published = json.loads(controller.stdout.readline())
        assert len(worker_pids) == 2 and not any(process_gone(pid) for pid in worker_pids)
        assert Path(published).exists()
        if ending == "kill -9 the controller":
            controller.kill()
        else:  # its own session: the group is the controller and its workers
            os.killpg(controller.pid, signal.SIGTERM if "SIGTERM" in ending else signal.SIGHUP)
        controller.wait(10)
        killed = time.monotonic()
        assert wait_until(lambda: all(process_gone(pid) for pid in worker_pids), 5.0), \
            "workers outlived their controller by more than 5 s"
        assert time.monotonic() - killed < 5
        assert wait_until(lambda: not Path(published).parent.exists(), 5.0), "the published files stayed"
    finally:
        controller.kill()
        controller.wait(10)
        controller.stdout.close()
        for pid in worker_pids:  # only if the test failed: do not leak them
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


# -- lifecycle -----------------------------------------------------------------------------


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


# -- shm and transfer helpers without workers --------------------------------------------------


def test_space_check_says_needed_available_and_how_to_fix():
    check_shm_space(1 << 20)  # a megabyte fits
    with pytest.raises(ShmSpaceError) as info:
        check_shm_space(1 << 60, what="'huge model'")
    message = str(info.value)
    assert "'huge model'" in message and "GiB" in message and "free" in message
    assert "--shm-size" in message



def test_a_tmpfs_filling_up_mid_write_is_a_space_error_and_leaves_no_file(tmp_path, monkeypatch):
    """The space check passed, then another process filled the directory: the write's ENOSPC
    (a real full tmpfs cannot be arranged in CI, so pwrite raises it) becomes ShmSpaceError."""
    import errno

    from comfy_para_attn.pool import transfer

    real_pwrite, calls = os.pwrite, []

    def pwrite_until_full(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(transfer.os, "pwrite", pwrite_until_full)
    monkeypatch.setattr(transfer, "WRITE_THREADS", 1)
    weights = {f"w{i}": torch.full((64,), float(i + 1)) for i in range(3)}
    with pytest.raises(ShmSpaceError, match="filled up"):
        transfer.publish_tensors(weights, "full", directory=tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]

def test_float32_files_are_shared_zeros_and_reserving_on_a_full_tmpfs_is_a_space_error(tmp_path, monkeypatch):
    """Parallel VAE Decode's per-rank images: zeros, shared between mappings. The writer
    reserves the pages; when the space has run out (fallocate's ENOSPC, raised here: a full
    tmpfs cannot be arranged in CI) that is ShmSpaceError, not a SIGBUS on the first write.
    A failure while creating the files leaves none behind."""
    import errno

    from comfy_para_attn.pool import shm

    monkeypatch.setenv("COMFY_PARA_ATTN_SHM_DIR", str(tmp_path))
    paths = shm.float32_files((2, 3, 5), 2, what="a test image")
    first = shm.map_float32(paths[0], (2, 3, 5), reserve=True)
    again = shm.map_float32(paths[0], (2, 3, 5))
    assert torch.equal(first, torch.zeros(2, 3, 5)) and torch.equal(shm.map_float32(paths[1], (2, 3, 5)),
                                                                    torch.zeros(2, 3, 5))
    first[1, 2, 4] = 7.0
    assert again[1, 2, 4].item() == 7.0  # one file, two views of it

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shm.os, "posix_fallocate", full)
    with pytest.raises(ShmSpaceError, match="a test image"):
        shm.map_float32(paths[1], (2, 3, 5), reserve=True, what="a test image")
    for path in paths:
        os.unlink(path)

    real, calls = os.ftruncate, []

    def truncate_once(fd, length):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.EIO, "I/O error")
        return real(fd, length)

    monkeypatch.setattr(shm.os, "ftruncate", truncate_once)
    with pytest.raises(OSError, match="I/O error"):
        shm.float32_files((64,), 3, what="a test image")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_published_files_are_removed_when_the_controller_exits():
    script = textwrap.dedent("""
        import torch
        from comfy_para_attn.pool.transfer import publish_tensors
        handle = publish_tensors({"w": torch.ones(8)}, "exit-test")
        print(handle.path, flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    path = Path(done.stdout.strip())
    assert path.name.startswith("exit-test-") and not path.exists() and not path.parent.exists()


def test_a_write_under_way_when_the_controller_exits_leaves_nothing(tmp_path):
    """Ctrl+C while ComfyUI's prompt thread (a daemon thread) writes a model to shared memory:
    the exit handler removes the half-written file and the publish directory with it, and the
    thread can publish nothing more."""
    script = textwrap.dedent("""
        import sys, threading, time
        import torch
        from comfy_para_attn.pool import transfer

        state = {f"w{i}": torch.ones(1 << 16) for i in range(16)}
        started = threading.Event()
        def slow(written, total):  # the write takes ~4 s; the process exits after ~1 s
            started.set()
            time.sleep(0.25)
        def prompt():
            transfer.publish_tensors(state, "model", directory=sys.argv[1], on_progress=slow)
        threading.Thread(target=prompt, daemon=True).start()
        started.wait(30)
        time.sleep(0.5)
        print([str(p) for p in __import__("pathlib").Path(sys.argv[1]).rglob("*.partial")], flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ".partial" in done.stdout  # the exit came mid-write
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_the_exit_stops_a_write_under_way_at_its_next_chunk(tmp_path):
    """Ctrl+C during a weight transfer: concurrent.futures joins its threads at exit after
    running every queued item, which for FLUX.1-dev held the exit for ~20 s. The writes now
    stop at their next chunk: most of the model is never written."""
    script = textwrap.dedent("""
        import atexit, sys, threading, time
        import torch
        from comfy_para_attn.pool import transfer

        transfer.STAGING_BYTES = 1 << 16  # 16 chunks a storage
        chunks = []
        real_pwrite = transfer._pwrite_all
        def slow_pwrite(*args):  # a slow tmpfs: the whole write would take ~3 s
            chunks.append(1)
            time.sleep(0.05)
            return real_pwrite(*args)
        transfer._pwrite_all = slow_pwrite
        atexit.register(lambda: print("chunks written", len(chunks), flush=True))
        state = {f"w{i}": torch.rand(1 << 18) for i in range(16)}
        def prompt():
            transfer.publish_tensors(state, "model", directory=sys.argv[1])
        threading.Thread(target=prompt, daemon=True).start()
        while not chunks:
            time.sleep(0.01)
        time.sleep(0.2)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    written = int(done.stdout.split("chunks written")[1])
    assert 0 < written < 16 * 16 // 2, done.stdout  # all 256 before: the join ran every queued storage
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_a_release_between_making_the_directory_and_writing_leaves_the_write_alone(tmp_path, monkeypatch):
    """Releases also run from garbage collection (a ComfyUI model freed), on any thread and at
    any moment: one running after a write made the publish directory, with the last other file
    there, took the directory from under the write (FileNotFoundError)."""
    from comfy_para_attn.pool import transfer

    first = transfer.publish_tensors({"w": torch.ones(8)}, "first", directory=tmp_path)
    real = transfer.own_publish_dir

    def then_release(root):
        directory = real(root)
        first.release()  # the collector runs here
        return directory

    monkeypatch.setattr(transfer, "own_publish_dir", then_release)
    second = transfer.publish_tensors({"w": torch.ones(8)}, "second", directory=tmp_path)
    try:
        assert not Path(first.path).exists()
        assert torch.equal(transfer.load_tensors(second)["w"], torch.ones(8))
    finally:
        second.release()


def test_nothing_is_published_once_the_process_is_exiting(tmp_path, monkeypatch):
    from comfy_para_attn.pool import shm, transfer

    monkeypatch.setattr(shm, "_claimed_dirs", set())
    handle = transfer.publish_tensors({"w": torch.ones(8)}, "model", directory=tmp_path)
    monkeypatch.setattr(shm, "_exiting", False)
    shm.remove_own_dirs()
    assert shm.exiting() and not Path(handle.path).exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="exiting"):
        transfer.publish_tensors({"w": torch.ones(8)}, "model", directory=tmp_path)
    assert list(tmp_path.iterdir()) == []
    handle.release()


def test_stale_publish_dirs_of_dead_controllers_are_swept(tmp_path):
    """Directories are named by PID namespace and pid: a dead controller's of this namespace
    (or one named by pid alone, by earlier versions) is removed; this process's, and any of
    another namespace (a container sharing /dev/shm, whose pids mean nothing here), stay."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = controller_dir(finished.pid, tmp_path)
    mine = shm.own_publish_dir(tmp_path)  # made (claimed) by this process
    legacy = tmp_path / f"comfy_para_attn-{finished.pid}"
    other_namespace = tmp_path / f"comfy_para_attn-{int(pid_namespace()) + 1}-{finished.pid}"
    assert stale.name == f"comfy_para_attn-{pid_namespace()}-{finished.pid}" and pid_namespace() != "0"
    for directory in (stale, mine, legacy, other_namespace):
        directory.mkdir(exist_ok=True)
        (directory / "weights.pt").write_bytes(b"x")
    assert sorted(sweep_stale_dirs(tmp_path)) == sorted([stale, legacy])
    assert not stale.exists() and not legacy.exists() and mine.exists() and other_namespace.exists()


def test_a_restart_under_the_same_pid_frees_what_the_previous_program_published(tmp_path):
    """ComfyUI-Manager restarts ComfyUI with os.execv: same pid, no atexit handler, so the
    published model stays under our pid's name. The new program (which did not make that
    folder) sweeps it when the pack loads, before a space check would count it."""
    script = textwrap.dedent("""
        import os, sys, torch
        from comfy_para_attn.pool import shm
        from comfy_para_attn.pool.transfer import publish_tensors
        if sys.argv[1] == "before":
            handle = publish_tensors({"w": torch.ones(4096)}, "before-restart")
            print(handle.path, flush=True)
            os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], "after", sys.argv[2]])
        left = shm.controller_dir(os.getpid())
        print("left", left.exists(), flush=True)
        print("swept", [str(p) for p in shm.sweep_stale_dirs()] == [str(left)], left.exists(), flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COMFY_PARA_ATTN_SHM_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script, "before", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    published, left, swept = done.stdout.strip().splitlines()
    assert Path(published).parent.parent == tmp_path
    assert left == "left True" and swept == "swept True False"
    assert not list(tmp_path.iterdir())


def test_a_restart_under_the_same_pid_reaps_the_previous_programs_workers():
    """After os.execv the old workers exit (their lifeline closed) as zombies of the new
    program, which has no Popen to wait for them: it reaps them (and only them) when the pack
    loads. A shut-down pool's workers are no longer listed."""
    script = textwrap.dedent("""
        import json, os, sys, time
        from comfy_para_attn.pool import launch
        if sys.argv[1] == "before":
            from comfy_para_attn.pool import Pool
            Pool(1).shutdown()  # reaped already: forgotten
            pool = Pool(2)
            assert [int(e.split(":")[0]) for e in os.environ[launch.WORKER_PIDS_ENV].split(",")] == pool.pids
            os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], "after", sys.argv[2]])
        recorded = [e.split(":") for e in os.environ[launch.WORKER_PIDS_ENV].split(",")]
        pids = [int(pid) for pid, _ in recorded]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any((launch._stat(p) or "Z")[0] != "Z" for p in pids):
            time.sleep(0.1)  # they exit once they see the lifeline closed
        zombies = [p for p in pids if (launch._stat(p) or "?")[0] == "Z"]
        reaped = launch.reap_previous_workers()
        # still there: the same process (pid and start time; a busy host may reuse a pid). A zombie
        # leader whose threads still exit is not yet waitable: a daemon thread reaps it a moment later.
        left = lambda: [int(p) for p, start in recorded if (launch._stat(int(p)) or (0, 0, None))[2] == start]
        deadline = time.monotonic() + 10
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)
        print(json.dumps({"pids": pids, "zombies": zombies, "reaped": reaped, "left": left(),
                          "env": os.environ[launch.WORKER_PIDS_ENV]}), flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("COMFY_PARA_ATTN_WORKER_PIDS", None)
    done = subprocess.run([sys.executable, "-c", script, "before", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen["pids"]) == 2 and seen["zombies"] == seen["pids"] and seen["reaped"] == seen["pids"]
    assert seen["left"] == [] and seen["env"] == ""


def test_the_watchdog_works_on_a_descriptor_above_1024():
    """Workers keep the controller's descriptor numbers, and a ComfyUI with many files open
    hands down a lifeline >= 1024, which select() refuses: the watchdog must still see the
    controller's end close and exit the worker."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1600:
        pytest.skip(f"the descriptor limit ({hard}) does not allow a descriptor above 1024")
    script = textwrap.dedent("""
        import os, resource, sys, time
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < 1600:
            resource.setrlimit(resource.RLIMIT_NOFILE, (1600, hard))
        from comfy_para_attn.pool import worker
        read_end, write_end = os.pipe()
        lifeline = os.dup2(read_end, 1500)
        os.close(read_end)
        worker.start_watchdog(lifeline, os.getppid())
        time.sleep(0.5)
        os.close(write_end)  # as when the controller dies
        time.sleep(30)
        sys.exit(0)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == ORPHAN_EXIT_CODE, (done.returncode, done.stderr)
    assert "controller closed the lifeline" in done.stderr and time.monotonic() - began < 20


def test_loading_the_pack_sweeps_what_killed_controllers_left(tmp_path):
    """A ComfyUI stopped together with its workers (systemd stops the whole group) leaves its
    published weights; the next ComfyUI removes them when it loads the pack, not at its
    first Context Parallel prompt."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = controller_dir(finished.pid, tmp_path)
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"x" * 4096)
    script = textwrap.dedent(f"""
        import importlib.util, logging, sys
        logging.basicConfig(level=logging.INFO)
        spec = importlib.util.spec_from_file_location(
            "comfy_para_attn_pack", {str(REPO_ROOT / "__init__.py")!r}, submodule_search_locations=[{str(REPO_ROOT)!r}])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["comfy_para_attn_pack"] = pack
        spec.loader.exec_module(pack)
        print(len(pack.NODE_CLASS_MAPPINGS))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COMFY_PARA_ATTN_SHM_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 0 and not stale.exists()
    assert "removed 1 shared-memory folder(s)" in done.stderr


def test_fingerprint_follows_content_names_shapes_dtypes_and_extra():
    generator = torch.Generator().manual_seed(1)
    weights = {"a": torch.randn(256, 128, generator=generator),
               "b": torch.randn(1000, generator=generator).to(torch.bfloat16)}
    reference = fingerprint_tensors(weights)
    assert fingerprint_tensors(dict(reversed(list(weights.items())))) == reference
    assert fingerprint_tensors({k: v.clone() for k, v in weights.items()}) == reference
    different = [
        {"a": weights["a"] + 0.5, "b": weights["b"]},
        {"a": weights["a"].to(torch.float16), "b": weights["b"]},
        {"a": weights["a"].reshape(128, 256), "b": weights["b"]},
        {"renamed": weights["a"], "b": weights["b"]},
    ]
    for changed in different:
        assert fingerprint_tensors(changed) != reference
    assert fingerprint_tensors(weights, extra={"lora": 1}) != fingerprint_tensors(weights, extra={"lora": 2})
    # A non-contiguous view hashes its logical content, like its contiguous copy.
    transposed = {"t": weights["a"].t()}
    assert fingerprint_tensors(transposed) == fingerprint_tensors({"t": weights["a"].t().contiguous()})
    # Sampling may miss a single-element edit; full=True never does.
    edited = {"a": weights["a"].clone(), "b": weights["b"]}
    edited["a"][17, 33] += 1.0
    assert fingerprint_tensors(edited, full=True) != fingerprint_tensors(weights, full=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_weights_publish_through_pinned_staging_in_pieces(monkeypatch):
    """GPU storages come to the host in pieces through per-thread pinned buffers: pieces
    smaller than a storage, views sharing a storage, and odd sizes must all land intact."""
    from comfy_para_attn.pool import transfer

    monkeypatch.setattr(transfer, "STAGING_BYTES", 1 << 16)  # several pieces per storage
    pinned_at_close = []

    class Recorded(transfer._PinnedStaging):
        def close(self):
            pinned_at_close.append(len(self.buffers))
            super().close()
            assert not self.buffers  # the pinned buffers were handed back

    monkeypatch.setattr(transfer, "_PinnedStaging", Recorded)
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(300, 257, generator=g, device="cuda", dtype=torch.bfloat16)
    weights = {"big": big, "view": big[7:9], "odd": torch.randn(13, generator=g, device="cuda")}
    handle = transfer.publish_tensors(weights, "pinned-staging")
    try:
        loaded = transfer.load_tensors(handle)
        for name, tensor in weights.items():
            assert torch.equal(loaded[name], tensor.cpu()), name
    finally:
        transfer.release_tensors(handle)
    assert len(pinned_at_close) == 1 and pinned_at_close[0] >= 1  # pieces went through pinned buffers


def test_a_previous_program_under_the_same_pid_leaves_nothing_behind(tmp_path):
    """ComfyUI-Manager restarts ComfyUI with os.execv: the same pid, and no atexit handler
    runs. The new program's first write removes what the old one left under that pid."""
    script = tmp_path / "restart.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch
        from comfy_para_attn.pool.transfer import publish_tensors
        handle = publish_tensors({"w": torch.ones(1024)}, sys.argv[1])
        print(os.getpid(), handle.path, flush=True)
        if sys.argv[1] == "before":
            os.execv(sys.executable, [sys.executable, __file__, "after", handle.path])
        print(os.path.exists(sys.argv[2]), flush=True)
    """))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, str(script), "before"], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    (pid, path), (pid_after, path_after), (still_there,) = [line.split() for line in done.stdout.splitlines()]
    assert pid_after == pid and path_after != path  # the same process, a new program
    assert still_there == "False" and not Path(path).exists() and not Path(path_after).exists()


def test_an_interrupt_from_the_progress_hook_stops_the_write_at_once(tmp_path, monkeypatch):
    """ComfyUI's Cancel raises from the progress bar's hook: the queued storages are not
    written any more (before, the write ran to its end first), and no file is left."""
    import comfy_para_attn.pool.transfer as transfer

    started = []
    real_write = transfer._write_storage

    def counting_write(*args):
        started.append(1)
        return real_write(*args)

    monkeypatch.setattr(transfer, "_write_storage", counting_write)
    state = {f"w{i}": torch.full((256 * 1024,), float(i)) for i in range(64)}  # 64 storages of 1 MiB

    class Interrupted(Exception):  # as comfy.model_management.InterruptProcessingException
        pass

    def cancel(written, total):
        raise Interrupted()

    with pytest.raises(Interrupted):
        publish_tensors(state, "cancelled", directory=tmp_path, on_progress=cancel)
    assert 1 <= len(started) < 32, len(started)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]



def test_an_event_the_controller_cannot_read_is_a_pool_error_naming_the_rank(tmp_path, clean_registry):
    """A job whose progress carries a class only the workers can import: the controller's
    unpickling error escaped raw (a ModuleNotFoundError naming neither rank nor pool)."""
    (tmp_path / "worker_only_jobs.py").write_text(textwrap.dedent("""
        class OnlyHere:
            pass

        def report_it(ctx, payload):
            ctx.report_progress(1, 2, thing=OnlyHere())
            return "done"
    """))
    pool = get_pool(1, sys_path=[str(tmp_path)])
    with pytest.raises(PoolError) as info:
        pool.run("worker_only_jobs:report_it", timeout_s=30, on_progress=lambda *a: None)
    assert info.value.rank == 0 and "cannot read" in str(info.value) and "worker_only_jobs" in str(info.value)
    assert get_pool(1).run(f"{JOBS}:all_reduce_ranks", timeout_s=30)["sum"] == 1.0  # a fresh pool works


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


def _shut_down_while_running(pool, job: str, payload, shutdown_timeout_s: float) -> list:
    """Run `job` on another thread, shut `pool` down 2 s into it; what the run raised."""
    raised = []

    def run():
        try:
            pool.run(f"{JOBS}:{job}", payload, timeout_s=60)
        except BaseException as exc:  # noqa: BLE001 - the outcome is the tests' subject
            raised.append(exc)

    runner = threading.Thread(target=run)
    runner.start()
    time.sleep(2.0)
    pool.shutdown(timeout_s=shutdown_timeout_s)
    runner.join(30)
    assert not runner.is_alive()
    return raised


def test_a_job_whose_pool_another_thread_shuts_down_says_so_not_oom():
    """shutdown() from another thread (or get_pool replacing the pool) kills workers that are
    busy with a job: the job's error says the pool was shut down, not that the host ran out
    of memory (the SIGKILL is the controller's own)."""
    pool = Pool(2)
    errors = _shut_down_while_running(pool, "sleep_silently", {"seconds": 30}, shutdown_timeout_s=1.0)
    assert len(errors) == 1 and isinstance(errors[0], PoolError)
    assert errors[0].reason == "dead" and "the pool was shut down while it ran" in str(errors[0])
    assert "out of memory" not in str(errors[0]) and "SIGKILL" not in str(errors[0])


def test_shutting_down_during_a_job_stops_it_at_a_step_and_the_workers_exit_cleanly():
    """ComfyUI exiting (atexit) or a layout change while a job runs: the job is interrupted
    at its next step and the workers then read Shutdown and exit by themselves (they were
    killed after the timeout, still busy with the job)."""
    pool = Pool(2)
    outcome = _shut_down_while_running(pool, "steady_steps", {"steps": 100000, "sleep_s": 0.05},
                                       shutdown_timeout_s=30.0)
    assert len(outcome) == 1 and isinstance(outcome[0], PoolInterrupted)
    assert pool.returncodes == [0, 0]  # exited, not killed


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
