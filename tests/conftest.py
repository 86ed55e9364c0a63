import os

import pytest
import torch

# Triton reads this once, at its first import: without a GPU the kernel tests run on its
# interpreter, whichever module imports triton first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from comfy_para_attn.adapters.comfy.env import find_comfyui, make_importable


@pytest.fixture(scope="session")
def comfyui_path():
    """A ComfyUI checkout made importable on CPU, or a skip saying why there is none."""
    try:
        path = find_comfyui()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if path is None:
        pytest.skip("ComfyUI not found: set COMFYUI_PATH or install it with comfy-cli (make comfy-env, then COMFYUI_PATH=...)")
    try:
        import torchvision  # noqa: F401  ComfyUI imports it at start
    except ImportError:
        pytest.skip("ComfyUI needs torchvision in this environment (make comfy-env)")
    make_importable(path, cpu=True)
    return path


@pytest.fixture(scope="session")
def pack_nodes(comfyui_path):
    """The pack's NODE_CLASS_MAPPINGS, imported the way ComfyUI imports a custom node."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name = "comfy_para_attn_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def cm(comfyui_path):
    """comfy_para_attn.testing.comfy_models (tiny ComfyUI models), once ComfyUI is importable."""
    from comfy_para_attn.testing import comfy_models

    return comfy_models


@pytest.fixture(scope="module")
def pool():
    """One 2-rank worker pool shared by a module's tests that leave it usable."""
    from comfy_para_attn.pool import Pool

    shared = Pool(2)
    yield shared
    shared.shutdown()


@pytest.fixture
def clean_registry():
    """No registered pool before or after the test (get_pool starts a fresh one)."""
    from comfy_para_attn.pool import shutdown_pool

    shutdown_pool()
    yield
    shutdown_pool()


@pytest.fixture(scope="module")
def pool_cleanup():
    """Shut the registered pool down after a module's Context Parallel tests."""
    yield
    from comfy_para_attn.pool import shutdown_pool

    shutdown_pool()
