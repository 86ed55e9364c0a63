import pytest

from comfy_para_attn.adapters.comfy.env import find_comfyui, make_importable


@pytest.fixture(scope="session")
def comfyui_path():
    """A ComfyUI checkout made importable on CPU, or a skip saying why there is none."""
    try:
        path = find_comfyui()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    if path is None:
        pytest.skip("ComfyUI not found: set COMFYUI_PATH or install it with comfy-cli (make comfyui)")
    try:
        import torchvision  # noqa: F401  ComfyUI imports it at start
    except ImportError:
        pytest.skip("ComfyUI needs torchvision in this environment (make comfy-env)")
    make_importable(path, cpu=True)
    return path
