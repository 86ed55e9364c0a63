"""Models in the Context Parallel pool's workers under ComfyUI's memory management (comfyui
tier, 2 CPU ranks): reuse, replacement, freeing, making room, published files."""

import logging
import pickle

import pytest
import torch

from comfy_para_attn.testing.comfy_pool_checks import POOL_TOL, context_parallel


def test_second_prompt_reuses_workers_model_and_logs_phases(comfyui_path, pack_nodes, pool_cleanup):
    """Every rank logs where its time went; the second prompt finds the weights cached (the
    first may too: earlier tests in this module sent the same weights to a pool of this layout)."""
    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    model = context_parallel(pack_nodes, patcher, ulysses_degree=2)
    phases = []
    for seed in (1, 2):
        out = comfy_models.sample(model, pos, neg, latent, steps=3, cfg=1.0, seed=seed)
        assert torch.isfinite(out).all()
        phases.append([[line for line in lines if line.startswith(f"Context Parallel rank {rank}: model")]
                       for rank, lines in enumerate(pool_sampling.last_run_logs)])
    for prompt, states in zip(phases, (("loaded", "cached"), ("cached",))):
        assert len(prompt) == 2 and all(len(lines) == 1 for lines in prompt), prompt
        for lines in prompt:
            assert any(f"model {state} in" in lines[0] for state in states), lines
            assert "first step" in lines[0] and "2 more in" in lines[0], lines
            setup = float(lines[0].split("sampler set up in ")[1].split(" s")[0])  # nan if no model call was seen
            assert 0.0 <= setup < 60.0, lines


def test_unloading_all_models_lets_go_of_the_last_prompts_tensors_on_both_sides(comfyui_path, pack_nodes,
                                                                                pool_cleanup, monkeypatch):
    """ComfyUI's "Unload Models" / "Free model and node cache" release what the last prompt
    sent (a LoRA can be hundreds of MiB) in ComfyUI and in every worker; the next prompt sends
    its tensors again and samples as in-process."""
    import comfy.model_management

    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.adapters.comfy.worker_jobs import SENT_ONCE_KEY
    from comfy_para_attn.pool import current_pool, sent_once
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import record_sampling_jobs, sampling_inputs

    monkeypatch.setattr(sent_once, "MIN_BYTES", 0)
    patcher, pos, neg, latent = sampling_inputs("flux")
    with_lora = comfy_models.apply_lora(patcher, comfy_models.random_lora(patcher, scale=1.0))
    model = context_parallel(pack_nodes, with_lora)
    jobs = record_sampling_jobs(monkeypatch)

    def held_by_workers():
        cached = current_pool().run("comfy_para_attn.testing.pool_jobs:gather_from_ranks", ("cache", SENT_ONCE_KEY),
                                    timeout_s=60)
        return [None if c is None else len(c) for c in cached]

    comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0, seed=1)
    sent = len(pickle.loads(jobs[0][0])["new"])
    assert sent > 0 and held_by_workers() == [sent, sent]
    comfy.model_management.unload_all_models()
    assert held_by_workers() == [None, None] and len(pool_sampling._sent_once._held) == 0
    plain = comfy_models.sample(with_lora, pos, neg, latent, steps=2, cfg=1.0, seed=2)
    parallel = comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0, seed=2)
    assert len(pickle.loads(jobs[-1][0])["new"]) == sent
    assert torch.isfinite(parallel).all() and (parallel - plain).abs().max().item() < POOL_TOL


def test_a_replaced_model_is_dropped_by_the_workers_and_another_config_is_another_model(
        comfyui_path, pack_nodes, pool_cleanup, caplog, monkeypatch):
    """Switching models, one kept (PARA_ATTN_KEEP_MODELS=1): the workers drop the old one
    before the new one is written (their mapping kept the replaced file's pages in /dev/shm, so
    a /dev/shm sized for one model failed on the switch, and on every prompt after). The same
    weights under another model config (UNETLoader's fp8_e4m3fn_fast changes only the config)
    are another model there."""
    import logging
    from pathlib import Path

    import psutil

    from comfy_para_attn.adapters.comfy import pool_sampling, published

    monkeypatch.setitem(published.KEEP, "model", 1)
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    first, pos, neg, latent = sampling_inputs("flux", seed=0)
    second, *_ = sampling_inputs("flux", seed=5)

    def run(patcher):
        out = comfy_models.sample(context_parallel(pack_nodes, patcher, ulysses_degree=2), pos, neg, latent, steps=2, cfg=1.0)
        states = [line for lines in pool_sampling.last_run_logs for line in lines if ": model " in line]
        return out, states

    run(first)
    from comfy_para_attn.adapters.comfy import published

    old_file = published._published[published._recent["model"][-1]].path
    workers = [p for p in psutil.Process().children(recursive=True) if "comfy_para_attn.pool.worker" in " ".join(p.cmdline())]

    def mapped() -> list[bool]:
        return [old_file in Path(f"/proc/{worker.pid}/maps").read_text() for worker in workers]

    assert len(workers) == 2 and mapped() == [True, True]  # every rank maps the weights' file
    assert published.unmap_in_workers("model", why="test") == 1 and mapped() == [False, False]
    run(first)  # loads it again
    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        caplog.clear()
        out, states = run(second)
        assert "workers dropped their cached model (1) before the new one is written" in caplog.text
        assert mapped() == [False, False]
        plain = comfy_models.sample(second, pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all() and (out - plain).abs().max().item() < POOL_TOL
        assert len(states) == 2 and all("model loaded in" in line for line in states), states
        _, states = run(second)
        assert all("model cached in" in line for line in states), states
        second.model.model_config.manual_cast_dtype = torch.float32  # same weights and ops, another config
        caplog.clear()
        out, states = run(second)
        assert all("model loaded in" in line for line in states), states
        assert "dropped" not in caplog.text  # the weights did not change: no new file
        assert (out - plain).abs().max().item() < POOL_TOL


def test_two_models_alternating_stay_written_and_loaded(comfyui_path, pack_nodes, pool_cleanup, caplog):
    """Wan 2.2 samples with two experts in every prompt: both stay in shared memory and in the
    workers (two are kept by default), so alternating them writes and loads each once; a third
    model evicts the least recently used one, in /dev/shm and in the workers."""
    import logging

    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    models = {}
    models["a"], pos, neg, latent = sampling_inputs("flux", seed=11)
    models["b"], *_ = sampling_inputs("flux", seed=12)
    models["c"], *_ = sampling_inputs("flux", seed=13)

    def run(name) -> tuple[int, list[str]]:
        caplog.clear()
        out = comfy_models.sample(context_parallel(pack_nodes, models[name], ulysses_degree=2), pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all()
        states = [line.split(": model ")[1].split(" in ")[0] for lines in pool_sampling.last_run_logs
                  for line in lines if ": model " in line]
        assert len(set(states)) == 1, states  # every rank the same
        return caplog.text.count("written to shared memory"), states[0], caplog.text

    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        assert run("a")[:2] == (1, "loaded") and run("b")[:2] == (1, "loaded")
        assert run("a")[:2] == (0, "cached") and run("b")[:2] == (0, "cached")
        written, state, log = run("c")  # "a" is the least recently used
        assert (written, state) == (1, "loaded")
        assert "workers dropped their cached model (1) before the new one is written (to keep 2)" in log, log
        assert run("b")[:2] == (0, "cached")
        assert run("a")[:2] == (1, "loaded")  # written and loaded again, "c" now goes


def test_a_freed_model_leaves_the_workers_at_the_next_run(comfyui_path, pack_nodes, pool_cleanup, caplog):
    """Two models kept; ComfyUI frees one (another checkpoint, "Free model and node cache"):
    its shared-memory file goes at once, and the workers drop it at the next run with the other
    model, instead of holding its weights (VRAM, and the unlinked file's pages) until a third
    model evicts it."""
    import gc
    import logging

    from comfy_para_attn.adapters.comfy import published
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    models = {}
    models["a"], pos, neg, latent = sampling_inputs("flux", seed=21)
    models["b"], *_ = sampling_inputs("flux", seed=22)

    def run(name):
        out = comfy_models.sample(context_parallel(pack_nodes, models[name], ulysses_degree=2), pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all()

    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        run("a")
        run("b")
        freed = published._fingerprints[models["a"].model.diffusion_model]
        assert freed in published._recent["model"] and freed in published._published
        caplog.clear()
        del models["a"]
        gc.collect()
        assert "weights released from shared memory (the model was freed)" in caplog.text, caplog.text
        assert freed not in published._published and freed in published._recent["model"]  # workers still hold it
        caplog.clear()
        run("b")
        assert "workers dropped their cached model (1) (its model was freed)" in caplog.text, caplog.text
        assert "written to shared memory" not in caplog.text
        assert freed not in published._recent["model"]


def test_a_freed_model_leaves_the_workers_when_comfyui_makes_room(comfyui_path, pack_nodes, pool_cleanup, caplog):
    """No further Context Parallel run (the user went back to a one-GPU workflow): ComfyUI's own
    `free_memory`, called before it loads any model, makes the workers drop a model ComfyUI
    freed, so they no longer map its unlinked file (nor hold it in VRAM)."""
    import gc
    import logging
    from pathlib import Path

    import comfy.model_management
    import psutil

    from comfy_para_attn.adapters.comfy import published
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux", seed=23)
    out = comfy_models.sample(context_parallel(pack_nodes, patcher, ulysses_degree=2), pos, neg, latent, steps=2, cfg=1.0)
    assert torch.isfinite(out).all()
    path = published._published[published._fingerprints[patcher.model.diffusion_model]].path
    workers = [p for p in psutil.Process().children(recursive=True) if "comfy_para_attn.pool.worker" in " ".join(p.cmdline())]

    def mapped() -> list[bool]:
        return [path in Path(f"/proc/{worker.pid}/maps").read_text() for worker in workers]

    del patcher
    gc.collect()
    assert len(workers) == 2 and mapped() == [True, True]  # the file is unlinked, its pages still held
    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        caplog.clear()
        comfy.model_management.free_memory(1 << 20, torch.device("cpu"))
        assert "workers dropped their cached model (1) (its model was freed)" in caplog.text, caplog.text
    assert mapped() == [False, False]
    caplog.clear()
    comfy.model_management.free_memory(1 << 20, torch.device("cpu"))  # nothing more to drop: no pool job
    assert "dropped" not in caplog.text


def test_the_workers_make_room_for_comfyui_only_in_prompts_without_a_pool_node(comfyui_path):
    """The graph ComfyUI executes decides whether its loads may make the workers drop their
    models (the release itself needs a GPU: tests/test_memory_gpu.py)."""
    from comfy_execution.graph import DynamicPrompt
    from comfy_execution.progress import reset_progress_state

    from comfy_para_attn.adapters.comfy.memory import prompt_uses_pool

    def graph(*nodes):
        return DynamicPrompt({str(i): {"class_type": c, "inputs": {"gpus": g}} for i, (c, g) in enumerate(nodes)})

    cp, vae = "ParaAttnContextParallel", "ParaAttnParallelVAEDecode"
    for nodes, uses in ((), False), ((("KSampler", 0), ("VAEDecode", 0)), False), (((cp, 0), ("KSampler", 0)), True), \
            ((("KSampler", 0), (vae, 2)), True), ((("KSampler", 0), (vae, ["12", 0])), True), \
            ((("KSampler", 0), (vae, 1)), False):  # the shipped one-GPU workflows: Parallel VAE Decode in-process
        reset_progress_state("test", graph(*nodes))
        assert prompt_uses_pool() is uses, nodes


def test_worker_model_key_follows_the_model_config(comfyui_path):
    from comfy_para_attn import refs
    from comfy_para_attn.adapters.comfy.worker_jobs import config_key
    from comfy_para_attn.testing import comfy_models

    def copy_of(config):  # as it reaches the workers (newer ComfyUI's configs do not deep-copy)
        return pickle.loads(refs.dumps(config))

    config = comfy_models.build("flux", seed=0).model.model_config
    same = copy_of(config)
    fast = copy_of(config)
    fast.optimizations = {**config.optimizations, "fp8": True}
    assert config_key(config, "FLUX") == config_key(same, "FLUX")
    assert config_key(fast, "FLUX") != config_key(config, "FLUX") != config_key(config, "FLOW")
    mixed = copy_of(config)  # newer ComfyUI's per-layer quantization of a checkpoint
    mixed.quant_config = {"layers": {"double_blocks.0.img_attn.qkv": {"format": "float8_e4m3fn"}}}
    assert config_key(mixed, "FLUX") != config_key(config, "FLUX")


def test_a_published_model_file_removed_by_another_process_is_written_again(comfyui_path, pack_nodes, pool_cleanup,
                                                                          caplog):
    """Another ComfyUI sharing /dev/shm from another PID namespace can take our publish
    directory for a dead controller's and remove it. The cached handle then failed every
    new pool until the model was freed; now the weights are written again."""
    import shutil
    from pathlib import Path

    from comfy_para_attn.adapters.comfy import published
    from comfy_para_attn.pool import shutdown_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    model = context_parallel(pack_nodes, patcher)
    first = comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0)
    fingerprint = published._fingerprints[patcher.model.diffusion_model]
    path = Path(published._published[fingerprint].path)
    shutdown_pool()  # a new pool maps the file again (a live one may hold the model already)
    shutil.rmtree(path.parent)
    with caplog.at_level(logging.WARNING):
        again = comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0)
    assert "shared-memory file" in caplog.text and "writing it again" in caplog.text
    assert torch.equal(again, first) and Path(published._published[fingerprint].path).exists()


def test_a_pool_start_past_its_time_limit_says_how_to_give_it_more(comfyui_path, pool_cleanup, monkeypatch,
                                                                   tmp_path):
    """The start limit of ComfyUI's pool comes from COMFY_PARA_ATTN_POOL_START_TIMEOUT_S; a
    start that passes it says so (it named no setting a user could change)."""
    import os

    from comfy_para_attn.adapters.comfy import comfy_pool
    from comfy_para_attn.pool import PoolStartError, shutdown_pool

    shutdown_pool()
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(3)\n")  # every worker starts 3 s late
    python_path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), python_path])))
    monkeypatch.setenv(comfy_pool.START_TIMEOUT_ENV, "1")
    monkeypatch.setattr("comfy_para_attn.pool.controller.INIT_MIN_TIMEOUT_S", 0.001)  # the init's floor too
    with pytest.raises(PoolStartError) as info:
        comfy_pool.comfy_pool(2, "cpu")
    assert f"set {comfy_pool.START_TIMEOUT_ENV} (seconds, now 1)" in str(info.value)
    monkeypatch.delenv(comfy_pool.START_TIMEOUT_ENV)
    monkeypatch.setenv("PYTHONPATH", python_path) if python_path else monkeypatch.delenv("PYTHONPATH")
    assert comfy_pool.comfy_pool(2, "cpu").alive
