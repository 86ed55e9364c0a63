"""What a controller that exits, dies or restarts under the same pid leaves behind (unit tier,
CPU): its workers exit, its published files go, and stale ones are swept.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from comfy_para_attn.pool import Pool
from comfy_para_attn.pool import shm
from comfy_para_attn.pool.shm import controller_dir, pid_namespace, sweep_stale_dirs
from comfy_para_attn.pool.worker import ORPHAN_EXIT_CODE
from comfy_para_attn.testing.processes import process_gone, wait_until

JOBS = "comfy_para_attn.testing.pool_jobs"
REPO_ROOT = Path(__file__).resolve().parents[1]


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
