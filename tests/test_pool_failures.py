"""Worker pool failures with real processes (unit tier, CPU): start errors, job exceptions,
CUDA errors and OOM, signals, hangs, unreadable events and a shutdown during a job. Each error
names the rank and what happened; the pool is kept or replaced as the next run needs.
"""
from __future__ import annotations

import os
import pickle
import signal
import textwrap
import threading
import time

import pytest
import torch

from comfy_para_attn.pool import (
    Pool,
    PoolError,
    PoolInterrupted,
    PoolJobError,
    PoolStartError,
    get_pool,
)
from comfy_para_attn.testing.processes import child_pids, process_gone, wait_until

JOBS = "comfy_para_attn.testing.pool_jobs"


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
    assert "Rank(s) 0 did not end the job within 2 s" in str(error)  # why the pool could not be kept
    assert not first.alive and all(process_gone(pid) for pid in old_pids)

    second = get_pool(2)
    assert second is not first and set(second.pids).isdisjoint(old_pids)
    assert second.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)["sum"] == 3.0


@pytest.mark.parametrize("slow_progress", [False, True])
def test_a_job_every_rank_fails_alike_keeps_the_pool(clean_registry, slow_progress):
    """A model error outside an agreed step (a resolution the model cannot take) fails every
    rank the same way: the ranks are idle and in step, so the pool stays (no restart and no
    model reload for the next prompt) once the group check completes. With a slow progress
    callback (ComfyUI decoding a preview) the ranks' failures reach the controller together."""
    pool = get_pool(2)
    pids = pool.pids
    on_progress = (lambda *_: time.sleep(0.5)) if slow_progress else None
    with pytest.raises(PoolJobError) as info:
        pool.run(f"{JOBS}:fail_everywhere", {"message": "shape '[2, 3]' is invalid"}, timeout_s=30,
                 on_progress=on_progress)
    first_lines = str(info.value).splitlines()[:2]
    assert "shape '[2, 3]' is invalid" in first_lines[0] and "ValueError" in first_lines[0]
    assert "every rank failed this job, so the worker pool is still running" in first_lines[1], first_lines
    assert "fail_everywhere" in info.value.worker_traceback
    assert pool.alive and get_pool(2) is pool and pool.pids == pids
    assert pool.run(f"{JOBS}:all_reduce_ranks", timeout_s=20)["sum"] == 3.0


@pytest.mark.parametrize("left_on", ["world", "subgroup"])
def test_a_job_every_rank_fails_with_a_collective_left_half_done_ends_the_pool(clean_registry, monkeypatch,
                                                                               left_on):
    """Every rank failed, but rank 0 left a collective that nobody joined, on the default group
    or on a Context Parallel layout's ring group: the group check after the failure cannot
    complete, so the pool is torn down as before, with the job's own error."""
    from comfy_para_attn.pool import controller

    monkeypatch.setattr(controller, "GROUP_CHECK_TIMEOUT_S", 3.0)
    pool = get_pool(2)
    pids = pool.pids
    with pytest.raises(PoolError) as info:
        pool.run(f"{JOBS}:fail_everywhere", {"message": "boom everywhere", "leave_collective": left_on},
                 timeout_s=30)
    assert not isinstance(info.value, PoolJobError) and "boom everywhere" in str(info.value)
    assert "the pool was shut down" in str(info.value)
    assert not pool.alive and wait_until(lambda: all(process_gone(pid) for pid in pids), 10)


def test_a_group_check_that_fails_ends_the_pool_without_checking_itself(clean_registry, monkeypatch):
    """The check is no job to settle: its own failure on every rank ends the pool at once (it
    recursed into further checks)."""
    from comfy_para_attn.pool import controller

    monkeypatch.setattr(controller, "GROUP_CHECK_JOB", f"{JOBS}:raise_out_of_memory")
    pool = get_pool(2)
    began = time.monotonic()
    with pytest.raises(PoolError) as info:
        pool.run(f"{JOBS}:fail_everywhere", {"message": "boom before the check"}, timeout_s=30)
    assert "boom before the check" in str(info.value) and time.monotonic() - began < 10
    assert not pool.alive


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
        with pytest.raises(PoolJobError) as info:  # its only rank failed: nothing is out of step
            single.run(f"{JOBS}:raise_out_of_memory", timeout_s=20)
        assert info.value.reason == "out_of_memory"
        assert "ran out of memory" in str(info.value) and "OutOfMemoryError" in str(info.value)
        assert single.alive
    finally:
        single.shutdown()


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
