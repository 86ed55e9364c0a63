"""Where the Triton kernels cannot run they fall back to SDPA and say why once; the backend
choice reaches local attention. None of this needs triton itself."""
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfy_para_attn import kernels
from comfy_para_attn.attention import local
from comfy_para_attn.kernels import _runtime

ROOT = Path(__file__).resolve().parents[1]


def tiny(head_dim=64, dtype=torch.bfloat16, seq=12):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, seq, head_dim, generator=g).to(dtype) for _ in range(3))


@pytest.fixture
def fresh_log_state(monkeypatch):
    monkeypatch.setattr(_runtime, "_logged", set())
    monkeypatch.setattr(_runtime, "_broken", {})


@pytest.mark.parametrize("kernel", [kernels.flash_attention, kernels.quantized_attention])
def test_cpu_without_interpreter_falls_back_and_logs_once(kernel, monkeypatch, caplog, fresh_log_state):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = tiny()
    with caplog.at_level(logging.WARNING, logger="comfy_para_attn.kernels"):
        out, lse = kernel(q, k, v)
        kernel(q, k, v)
    reasons = [r.getMessage() for r in caplog.records]
    assert len(reasons) == 1 and "falls back to SDPA" in reasons[0], reasons
    assert "cpu tensors" in reasons[0] or "triton is not importable" in reasons[0]
    ref_out, ref_lse = kernels.sdpa_attention(q, k, v)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(head_dim=80), "head dim 80"),
        (dict(dtype=torch.float32), "dtypes"),
    ],
)
def test_unsupported_inputs_name_the_reason(change, reason, monkeypatch):
    monkeypatch.setattr(_runtime, "triton_import_error", lambda: None)  # as if triton were there
    monkeypatch.setattr(_runtime, "interpreter_unusable_reason", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = tiny(**change)
    assert reason in kernels.fallback_reason("triton", q, k, v)
    q, k, v = tiny()
    assert kernels.fallback_reason("triton", q, k, v) is None
    assert "bias" in kernels.fallback_reason("triton", q, k, v, torch.zeros(1, 2, 12, 12))


def test_fallback_can_be_supplied(monkeypatch, fresh_log_state):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = tiny()
    sentinel = (torch.zeros(1), torch.zeros(1))
    assert kernels.flash_attention(q, k, v, fallback=lambda *a: sentinel) is sentinel


def test_backend_choices_and_auto_stays_on_sdpa_without_calibration(monkeypatch):
    monkeypatch.setattr(local, "_selected", local._selected)
    monkeypatch.setattr(local, "_auto_preferences", {})
    monkeypatch.setattr(local, "calibrate_auto", lambda **calibration: {})  # (a GPU would calibrate)
    assert set(local.BACKEND_CHOICES) == {"auto", "sdpa", "triton", "triton-fp8"}
    assert {"triton", "triton-fp8"} <= set(local._BACKENDS)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        local.select_backend("flash")
    q, k, v = tiny(dtype=torch.float32)
    for name in ("auto", "sdpa"):
        local.select_backend(name)
        assert local.get_backend() == name
        out, lse = local.local_attention(q, k, v)
        torch.testing.assert_close(out, kernels.attention_reference(q, k, v)[0], rtol=0, atol=1e-5)
    assert local._auto(q, None) == "sdpa-cpu-flash" and not local._auto_preferences


def test_everything_imports_and_falls_back_without_triton():
    """A machine with no triton at all: the pack imports, `triton` is selectable, and
    attention runs on SDPA with the reason logged."""
    script = """
import logging, sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import torch
from comfy_para_attn.attention import local, parallel_attention
local.select_backend("triton")
q = k = v = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
out = parallel_attention(q, k, v, cp=None)
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
assert (out.float() - ref.float()).abs().max() < 1e-2
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert "triton is not importable" in result.stderr


def _interpreter_tests_skipped_in_this_process() -> bool:
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available() or "triton" not in sys.modules:
        return False
    return _runtime.interpreter_unusable_reason() is not None


@pytest.mark.skipif(not _interpreter_tests_skipped_in_this_process(),
                    reason="tests/test_kernels.py runs the kernels in this process")
def test_kernels_on_the_interpreter_in_a_fresh_process():
    """Triton fixes interpreter mode when first imported; in a full run something imports it
    earlier, so the kernel tests run here in a process that sets TRITON_INTERPRET=1 first."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    tail = result.stdout[-3000:]
    assert result.returncode == 0, tail + result.stderr[-2000:]
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_launch_failure_falls_back_inside_compiled_graphs_too(monkeypatch, fresh_log_state, caplog):
    """A compiled graph calls the custom op directly (the checks around it ran at trace time):
    a kernel that fails to launch answers with SDPA from inside the op, is marked broken and
    said once, in compiled and eager calls alike."""
    from comfy_para_attn.kernels import triton_flash

    def failing_launch(*args):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(triton_flash, "launch_flash_attention", failing_launch)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    reference, reference_lse = _runtime.math_attention(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: kernels.flash_attention(q, k, v), fullgraph=True)
    with caplog.at_level(logging.WARNING, logger="comfy_para_attn.kernels"):
        for call in (compiled, kernels.flash_attention):
            out, lse = call(q, k, v)
            assert torch.isfinite(out).all() and reference.abs().mean() > 0.01
            assert (out.float() - reference.float()).abs().max().item() < 2e-2
            assert (lse - reference_lse).abs().max().item() < 1e-2
    assert "out of shared memory" in kernels.broken_reason("triton")
    assert caplog.text.count("out of shared memory") == 1
    torch._dynamo.reset()
