"""Publishing tensors to shared memory for the workers (unit tier, CPU): round trips, layouts,
progress, space errors, writes stopped part way, fingerprints.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from comfy_para_attn.pool import ShmSpaceError
from comfy_para_attn.pool.shm import check_shm_space
from comfy_para_attn.pool.transfer import fingerprint_tensors, load_tensors, publish_tensors

JOBS = "comfy_para_attn.testing.pool_jobs"


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
