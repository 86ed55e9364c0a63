"""The benchmarks' CPU smoke modes still run end to end (comfyui tier).

GPU time is scarce: a benchmark that breaks on a renamed helper wastes it. These run each
script's `--tiny` mode as a subprocess (2 CPU gloo ranks where it is parallel) and check
that it finishes, prints its table, and that the parallel results equal the 1-rank ones.
No timing is asserted: speed belongs to the GPU runs.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(comfyui_path, *args, timeout=600):
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_profile_context_parallel_tiny(comfyui_path):
    out = _run(comfyui_path, "bench/profile_context_parallel.py", "--tiny", "--steps", "1",
               "--layouts", "ulysses,ulysses:2,ring,ring:2,ring:0")
    diffs = [float(d) for d in re.findall(r"max diff ([0-9.eE+-]+|nan)", out)]
    assert len(diffs) == 6, out  # 1 rank + five 2-rank layouts
    assert all(d < 1e-4 for d in diffs), out  # fp32: the parallel latent equals the 1-rank one
    assert "| ring x2 |" in out and "top CPU ops" in out


@pytest.mark.parametrize("extra", [[], ["--controlnet"]], ids=["plain", "controlnet"])
def test_bench_context_parallel_tiny(comfyui_path, extra):
    out = _run(comfyui_path, "bench/bench_context_parallel.py", "--tiny", "--steps", "2", "--layouts", "ring", *extra)
    row = re.search(r"\| 2 GPUs ring x2 \(eager\) \| [0-9.]+ \| [0-9.]+x \| ([0-9.eE+-]+) \|", out)
    assert row and float(row.group(1)) < 1e-4, out
    assert re.search(r"Context Parallel rank 1: model loaded in", out), out


def test_bench_first_block_cache_tiny(comfyui_path):
    out = _run(comfyui_path, "bench/bench_first_block_cache.py", "--size", "tiny")
    assert "| threshold 0 (off) | 0 / 6 |" in out and "overhead at threshold 0:" in out, out
    assert "NON-FINITE" not in out


def test_bench_transfer_tiny():
    """Needs no ComfyUI: publishes a small FLUX-shaped state dict both ways and loads it back
    (the script itself checks the file holds the weights)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "bench/bench_transfer.py", "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pinned staging" in done.stdout and "load to cpu" in done.stdout


def test_quantized_lse_error_small():
    """Needs no ComfyUI: the lse-error table of the score recipes on a small realistic input."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "bench/quantized_lse_error.py", "--seq", "512", "--heads", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line[:66].strip(): line[66:].split() for line in done.stdout.splitlines()[2:]}
    assert len(rows) == 5, done.stdout
    # the control row computes the reference's own scores: exact; every 8-bit recipe moves the lse
    control = rows.pop("bf16 Q.K^T, fp32 accumulation (the bf16 kernel)")
    assert float(control[2]) == 0.0, done.stdout
    assert all(float(cols[2]) > 1e-3 for cols in rows.values()), done.stdout
