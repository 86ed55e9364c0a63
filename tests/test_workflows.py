"""comfyui tier: the shipped workflows (workflows/*.json and their *.api.json twins) against a
real ComfyUI server started with the pack.

- every API twin validates against the server's /object_info (node types, input names, links,
  widget values in range and among the listed choices);
- every UI workflow converts to its twin, node by node (independent converter in
  comfy_para_attn.testing.workflow_tools; tests/test_browser.py repeats this with the
  frontend's own graphToPrompt);
- every workflow runs headless end to end (POST /prompt, poll /history) on tiny random-weight
  model files loaded by ComfyUI's real UNETLoader / VAELoader. The text encoders
  (DualCLIPLoader + CLIPTextEncode: CLIP-L with T5-XXL for FLUX, CLIP-L with LLaVA-Llama-3
  for HunyuanVideo, UMT5-XXL for Wan) are replaced by the test-only ParaAttnTestConditioning node
  (tests/comfy_test_nodes), because those encoders cannot be made tiny. Multi-GPU workflows
  run their Context Parallel and Parallel VAE Decode on 2 CPU worker ranks here.
"""
import copy
import re

import pytest

from comfy_para_attn.testing import tiny_files, workflow_tools

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

NAMES = workflow_tools.workflow_names()
PACK_NODES = {"ParaAttnFirstBlockCache", "ParaAttnFP8Quantize", "ParaAttnCompile", "ParaAttnContextParallel",
              "ParaAttnParallelVAEDecode"}
# What each shipped workflow must contain (the issue's list) and its recommended settings.
EXPECTED = {
    "flux1_dev_single_gpu": ({"ParaAttnFP8Quantize", "ParaAttnCompile", "ParaAttnFirstBlockCache"}, 0.12),
    "flux1_dev_multi_gpu": (PACK_NODES, 0.12),
    "flux1_dev_controlnet_multi_gpu": (PACK_NODES | {"ControlNetLoader", "ControlNetApplyAdvanced"}, 0.12),
    "hunyuan_video_single_gpu": ({"ParaAttnFirstBlockCache", "ParaAttnParallelVAEDecode"}, 0.10),
    "hunyuan_video_multi_gpu": ({"ParaAttnFirstBlockCache", "ParaAttnContextParallel",
                                 "ParaAttnParallelVAEDecode"}, 0.10),
    "wan2.1_t2v_single_gpu": ({"ParaAttnFP8Quantize", "ParaAttnCompile", "ParaAttnFirstBlockCache",
                               "ParaAttnParallelVAEDecode"}, 0.08),
    "wan2.1_t2v_multi_gpu": (PACK_NODES, 0.08),
    "wan2.2_ti2v_5B_single_gpu": ({"ParaAttnFP8Quantize", "ParaAttnCompile", "ParaAttnFirstBlockCache",
                                   "ParaAttnParallelVAEDecode"}, 0.08),
    "wan2.2_ti2v_5B_multi_gpu": (PACK_NODES, 0.08),
    "wan2.2_t2v_14B_single_gpu": ({"ParaAttnFP8Quantize", "ParaAttnCompile", "ParaAttnFirstBlockCache",
                                   "ParaAttnParallelVAEDecode", "KSamplerAdvanced"}, 0.08),
    "wan2.2_t2v_14B_multi_gpu": (PACK_NODES | {"KSamplerAdvanced"}, 0.08),
}
REAL_FILES = {  # as in ComfyUI's own FLUX / HunyuanVideo / Wan examples
    "flux": {"flux1-dev.safetensors", "ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"},
    "hunyuan_video": {"hunyuan_video_t2v_720p_bf16.safetensors", "hunyuan_video_vae_bf16.safetensors",
                      "clip_l.safetensors", "llava_llama3_fp8_scaled.safetensors"},
    "wan2.1": {"wan2.1_t2v_1.3B_bf16.safetensors", "wan_2.1_vae.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"},
    "wan2.2_ti2v": {"wan2.2_ti2v_5B_fp16.safetensors", "wan2.2_vae.safetensors",
                    "umt5_xxl_fp8_e4m3fn_scaled.safetensors"},
    "wan2.2_t2v": {"wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors",
                   "wan_2.1_vae.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"},
}


def family(name: str) -> str:
    return next(f for f in REAL_FILES if name.startswith(f))


@pytest.fixture(scope="module")
def server(comfyui_path, tmp_path_factory):
    from comfy_para_attn.testing.comfy_server import pack_server

    tiny_files.write_tiny_model_files()  # cached between runs (~40 s the first time)
    srv = pack_server(comfyui_path, tmp_path_factory.mktemp("comfy-base"), tiny_files.default_cache_dir())
    with srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def test_every_issue_workflow_is_shipped():
    assert set(EXPECTED) <= set(NAMES), f"shipped: {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_has_our_nodes_files_and_recommended_settings(name):
    ui, api = workflow_tools.load(name)
    types = {n["class_type"] for n in api.values()}
    nodes, threshold = EXPECTED[name]
    assert nodes <= types, f"missing {nodes - types}"
    if "multi" not in name:  # one GPU: no workers (Parallel VAE Decode, if there, decodes in-process)
        assert "ParaAttnContextParallel" not in types
        assert all(n["inputs"]["gpus"] == 1 for n in api.values() if n["class_type"] == "ParaAttnParallelVAEDecode")
    caches = [n for n in api.values() if n["class_type"] == "ParaAttnFirstBlockCache"]
    assert len(caches) == (2 if "14B" in name else 1)  # Wan 2.2 14B: one per expert
    assert all(cache["inputs"]["residual_diff_threshold"] == threshold for cache in caches)
    files = {v for n in api.values() for v in n["inputs"].values() if isinstance(v, str) and v.endswith(".safetensors")}
    controlnet_files = {"flux-canny-controlnet-v3.safetensors"} if "controlnet" in name else set()
    assert files == REAL_FILES[family(name)] | controlnet_files
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert notes and "residual_diff_threshold" in notes[0]["widgets_values"][0]


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_validates_against_object_info(name, object_info):
    _ui, api = workflow_tools.load(name)
    assert workflow_tools.validate_api(api, object_info) == []


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_its_api_twin(name, object_info):
    ui, api = workflow_tools.load(name)
    assert workflow_tools.compare_prompts(api, workflow_tools.ui_to_api(ui, object_info)) == []


def test_checks_catch_broken_workflows(object_info):
    """The validator and the comparison must be able to fail."""
    ui, api = workflow_tools.load("flux1_dev_multi_gpu")
    broken = copy.deepcopy(api)
    (cache_id,) = workflow_tools.node_ids(broken, "ParaAttnFirstBlockCache")
    broken[cache_id]["inputs"]["residual_diff_threshold"] = 1.5  # above max 1.0
    (cp_id,) = workflow_tools.node_ids(broken, "ParaAttnContextParallel")
    broken[cp_id]["inputs"]["layout"] = "diagonal"
    broken[cp_id]["inputs"]["model"] = ["6", 0]  # a VAE into a MODEL input
    broken["99"] = {"class_type": "NoSuchNode", "inputs": {}}
    problems = "\n".join(workflow_tools.validate_api(broken, object_info))
    for expected in ("residual_diff_threshold=1.5", "layout='diagonal'", "linked to output 0 of VAELoader",
                     "NoSuchNode"):
        assert expected in problems
    shifted = copy.deepcopy(ui)
    ksampler = next(n for n in shifted["nodes"] if n["type"] == "KSampler")
    ksampler["widgets_values"].remove("fixed")  # values shift by one slot
    assert workflow_tools.compare_prompts(api, workflow_tools.ui_to_api(shifted, object_info))


# ComfyUI only detects full-width FLUX files (2.6 GiB in fp32 here): two CPU workers that
# each quantize and compile it exceed this 23 GiB machine (OOM-killed), so the multi-GPU FLUX
# run turns FP8 and Compile off on CPU. The single-GPU FLUX and Wan runs keep both; the
# multi-GPU Wan runs keep FP8 (weight-only on CPU) and skip two CPU compiles, for time.
CPU_OVERRIDES = {name: {"ParaAttnFP8Quantize": {"mode": "off"}, "ParaAttnCompile": {"scope": "off"}}
                 for name in ("flux1_dev_multi_gpu", "flux1_dev_controlnet_multi_gpu")}
for _name in ("wan2.1_t2v_multi_gpu", "wan2.2_ti2v_5B_multi_gpu", "wan2.2_t2v_14B_multi_gpu"):
    CPU_OVERRIDES[_name] = {"ParaAttnCompile": {"scope": "off"}}
# Wan 2.2 14B's experts split the steps: 8 give each expert the 4 steps the others run.
TINY_STEPS = {"wan2.2_t2v_14B_single_gpu": 8, "wan2.2_t2v_14B_multi_gpu": 8}


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_headless_on_tiny_models(name, server, object_info):
    import numpy
    from PIL import Image

    _ui, api = workflow_tools.load(name)
    prompt = workflow_tools.tiny_prompt(api, tiny_files.SUBSTITUTES, steps=TINY_STEPS.get(name, 4),
                                        prefix=f"test_{name}", overrides=CPU_OVERRIDES.get(name))
    assert workflow_tools.validate_api(prompt, object_info) == []
    log_before = len(server.log_text())
    entry = server.run_prompt(prompt, timeout_s=900)
    log = server.log_text()[log_before:]

    (saved,) = [o for o in entry["outputs"].values() if o.get("images")]
    image = Image.open(server.base_dir / "output" / saved["images"][0]["subfolder"] / saved["images"][0]["filename"])
    assert image.size == (128, 64)  # TINY_SIZES: the whole latent was sampled and decoded
    pixels = numpy.asarray(image.convert("RGB"), dtype="float32")
    # an image, not a constant (a NaN latent saves as one black or clipped frame)
    assert pixels.std() > 2.0 and len(numpy.unique(pixels)) > 32, (pixels.std(), len(numpy.unique(pixels)))
    assert "First Block Cache: reused" in log, log[-3000:]
    if "14B" in name:  # the experts' fp8_scaled files: FP8 Quantize took their fp8 weights as they are,
        # or newer ComfyUI runs them quantized itself (its mixed-precision ops) and FP8 Quantize, when
        # applied (its output may come from ComfyUI's cache of an earlier prompt), leaves them
        assert ("20 of them keep their stored fp8 weights and scales" in log
                or "layers of this WanModel checkpoint quantized (its mixed-precision ops)" in server.log_text()), \
            log[-3000:]
    if "multi" in name:  # sampling and decode really went to the worker pool
        assert "Context Parallel: 4 steps on 2 cpu rank(s)" in log, log[-3000:]
        if "14B" in name:  # each of Wan 2.2's experts sampled its steps through the pool
            assert log.count("Context Parallel: 4 steps on 2 cpu rank(s)") == 2, log[-3000:]
        assert re.search(r"Parallel VAE Decode: \d+ tiles on 2 cpu rank\(s\)", log), log[-3000:]
    else:
        assert "Context Parallel:" not in log and "Parallel VAE Decode:" not in log
    if "controlnet" in name:  # the ControlNet went to the workers with the prompt
        assert "Context Parallel: 1 ControlNet(s) go with this prompt" in log, log[-3000:]


def _free_until(server, flags: dict, condition, timeout_s: float = 90.0) -> bool:
    """POST /free until `condition()` holds. Posted again every few seconds: ComfyUI's prompt
    loop can miss the wake-up of a flag set while it collects garbage after a prompt, and then
    sleeps up to 1000 s before it reads the flags."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.post("/free", flags)
        for _ in range(12):
            if condition():
                return True
            time.sleep(0.25)
    return condition()


def test_unload_and_free_memory_reach_the_worker_pool(server):
    """ComfyUI's "Unload Models" (POST /free unload_models) makes the workers drop their models
    (the shared-memory copy stays, so the next prompt reloads without a new transfer); "Free
    model and node cache" (free_memory) also releases the shared-memory copy."""
    from pathlib import Path

    import psutil

    name = "hunyuan_video_multi_gpu"  # the smaller tiny model of the two multi-GPU workflows
    _ui, api = workflow_tools.load(name)

    def run(seed: int) -> str:
        prompt = workflow_tools.tiny_prompt(api, tiny_files.SUBSTITUTES, steps=2, prefix="test_unload",
                                            overrides={"RandomNoise": {"noise_seed": seed}})
        before = len(server.log_text())
        server.run_prompt(prompt, timeout_s=600)
        return server.log_text()[before:]

    def workers() -> list:
        return [p for p in psutil.Process(server.pid).children(recursive=True)
                if "comfy_para_attn.pool.worker" in " ".join(p.cmdline())]

    def mapped_model_files() -> list[set]:
        """Per worker: the model files it maps (a released one, kept for a possible reuse, ends
        in " (deleted)")."""
        return [{line[line.index("/dev/shm"):] for line in Path(f"/proc/{w.pid}/maps").read_text().splitlines()
                 if "/model-" in line} for w in workers()]

    log = run(seed=101)
    assert "Context Parallel: 2 steps on 2 cpu rank(s)" in log, log[-3000:]
    pids = sorted(w.pid for w in workers())
    files = mapped_model_files()
    live = [{f for f in mapped if Path(f).exists()} for mapped in files]  # this workflow's model
    assert len(pids) == 2 and all(len(f) == 1 for f in live) and live[0] == live[1], files
    (shm_file,) = live[0]

    before = len(server.log_text())
    assert _free_until(server, {"unload_models": True},
                       lambda: re.search(r"workers dropped their cached model \(\d\)", server.log_text()[before:])), \
        server.log_tail()
    assert mapped_model_files() == [set(), set()] and sorted(w.pid for w in workers()) == pids
    assert Path(shm_file).exists()  # kept, as ComfyUI keeps an unloaded model in RAM
    log = run(seed=102)
    assert "Context Parallel rank 0: model loaded in" in log and "written to shared memory" not in log, log[-3000:]

    before = len(server.log_text())
    assert _free_until(server, {"unload_models": True, "free_memory": True},
                       lambda: not Path(shm_file).exists()), server.log_tail()
    assert "model weights released from shared memory" in server.log_text()[before:]
    assert mapped_model_files() == [set(), set()]
    log = run(seed=103)  # the loader runs again, and the weights travel again
    assert "model weights" in log and "written to shared memory" in log, log[-3000:]
