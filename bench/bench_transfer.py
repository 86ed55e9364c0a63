"""Model transfer to the worker pool: a FLUX.1-dev-sized state dict written from the GPU to
shared memory (what Context Parallel does once per model), then loaded back to a GPU (what
each worker does).

    python bench/bench_transfer.py                # 12B bf16 weights (22 GiB) on cuda:0
    python bench/bench_transfer.py --tiny         # CPU smoke run, 64 MiB

Compares, in one run, `publish_tensors` with pinned staging buffers (the default) and with
pageable copies (the previous way), each on a fresh file; prints seconds and GiB/s, the
device, torch version and the shared-memory directory. Random weights: content does not
matter to the speed, but the file is checked to hold what the GPU held.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from comfy_para_attn.pool import shm, transfer  # noqa: E402

GIB = 1 << 30
# (rows, cols) of the linear weights of one FLUX.1-dev double and single block (hidden 3072).
DOUBLE = [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (18432, 3072)] * 2
SINGLE = [(21504, 3072), (3072, 15360), (9216, 3072)]


def flux_like_state_dict(target_gib: float, device, shrink: int = 1) -> dict[str, torch.Tensor]:
    """Blocks of FLUX.1-dev's shapes (19 double + 38 single = 22 GiB) until `target_gib`;
    `shrink` divides both dims of every weight (smoke runs)."""
    state, total, i = {}, 0, 0
    g = torch.Generator(device=device).manual_seed(0)
    while total < target_gib * GIB:
        for j, (rows, cols) in enumerate(DOUBLE if i % 3 == 0 else SINGLE):
            w = torch.randn(rows // shrink, cols // shrink, generator=g, device=device, dtype=torch.bfloat16)
            state[f"blocks.{i}.w{j}"] = w
            total += w.numel() * w.element_size()
        i += 1
    return state



def publish(state, pinned: bool):
    transfer.PINNED_STAGING = pinned
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    handle = transfer.publish_tensors(state, f"bench-{'pinned' if pinned else 'pageable'}")
    return handle, time.perf_counter() - began


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=22.0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--threads", type=int, default=transfer.WRITE_THREADS, help="writer threads")
    args = parser.parse_args()
    transfer.WRITE_THREADS = args.threads
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"# device: {name}; torch {torch.__version__}; shm dir {shm.shm_root()}; "
          f"{transfer.WRITE_THREADS} writer threads, {transfer.STAGING_BYTES >> 20} MiB pieces")
    state = flux_like_state_dict(0.0625 if args.tiny else args.gib, device, shrink=8 if args.tiny else 1)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    rows = []
    for pinned in (False, True):  # baseline first
        handle, seconds = publish(state, pinned)
        rows.append((f"publish from {device}, {'pinned staging' if pinned else 'pageable copies'}", seconds))
        if pinned:
            began = time.perf_counter()
            loaded = transfer.load_tensors(handle, device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            rows.append((f"load to {device} (worker side)", time.perf_counter() - began))
            probe = next(iter(state))
            assert torch.equal(loaded[probe], state[probe]), "the published file differs from the weights"
            del loaded
        transfer.release_tensors(handle)
    print(f"{'step':<48} {'GiB':>7} {'seconds':>8} {'GiB/s':>7} {'vs pageable':>11}")
    base = rows[0][1]
    for label, seconds in rows:
        ratio = f"{base / seconds:>10.2f}x" if label.startswith("publish") else f"{'-':>11}"
        print(f"{label:<48} {nbytes / GIB:>7.2f} {seconds:>8.2f} {nbytes / GIB / seconds:>7.2f} {ratio}")


if __name__ == "__main__":
    main()
