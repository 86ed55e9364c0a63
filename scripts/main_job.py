"""The main job (`make demo`): the pack in a real ComfyUI, headless, end to end, on tiny
random-weight models made locally. Nothing is downloaded except ComfyUI itself when no
ComfyUI is found.

1. Find ComfyUI: COMFYUI_PATH, else the comfy-cli workspace, else install it with comfy-cli
   (`comfy --skip-prompt --workspace <dir> install`, CPU build when there is no GPU).
2. Write tiny random-weight model files (FLUX.1-dev layout, FLUX VAE) that ComfyUI's own
   UNETLoader / VAELoader detect (cached under ~/.cache/comfy-para-attn).
3. Start a ComfyUI server with the pack and the test-only conditioning node (in place of the
   CLIP-L / T5-XXL text encoders), run the shipped workflows/flux1_dev_multi_gpu.api.json
   twice through POST /prompt: in-process (Context Parallel bypassed, VAE Decode Tiled in the
   ComfyUI process) and parallel (as shipped: all GPUs, or 2 CPU ranks without a GPU).
4. Print a table: steps, First Block Cache reuse, time.

    python scripts/main_job.py [--steps 8] [--keep] [--skip-requirements]
"""
from __future__ import annotations

import argparse
import hashlib
import copy
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comfy_para_attn.adapters.comfy.env import find_comfyui, make_importable  # noqa: E402

WORKFLOW = "flux1_dev_multi_gpu"
CPU_OVERRIDES = {"ParaAttnFP8Quantize": {"mode": "off"}, "ParaAttnCompile": {"scope": "off"}}
DEFAULT_WORKSPACE = Path.home() / "comfy"


def install_comfyui(workspace: Path) -> Path:
    """comfy-cli install into `workspace` (needs network access to GitHub and PyPI)."""
    comfy = shutil.which("comfy") or str(Path(sys.executable).with_name("comfy"))
    if not Path(comfy).exists() and not shutil.which("comfy"):
        sys.exit("No ComfyUI found and comfy-cli is missing: pip install comfy-cli (make comfy-env installs it), "
                 "or set COMFYUI_PATH to a ComfyUI checkout.")
    import torch

    gpu = ["--nvidia"] if torch.cuda.is_available() else ["--cpu"]
    command = [comfy, "--skip-prompt", "--workspace", str(workspace), "install", "--skip-manager", "--skip-torch-or-directml", *gpu]
    print("No ComfyUI found; installing it:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    path = workspace / "ComfyUI" if (workspace / "ComfyUI" / "main.py").is_file() else workspace
    if not (path / "main.py").is_file():
        sys.exit(f"comfy-cli finished but no ComfyUI main.py under {workspace}")
    return path


def locate_comfyui() -> Path:
    path = find_comfyui()  # COMFYUI_PATH (an error if wrong), else comfy-cli's workspace
    return path if path is not None else install_comfyui(DEFAULT_WORKSPACE)


def install_comfy_requirements(comfy_path: Path) -> None:
    """ComfyUI's own requirements.txt (its frontend and templates pins must match its code),
    without torch/torchvision/torchaudio: the Makefile installed a matching torch pair.
    Skipped when this environment already has them (a marker keyed by the file's content)."""
    requirements = (comfy_path / "requirements.txt").read_text()
    kept = [line for line in requirements.splitlines()
            if re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower() not in ("torch", "torchvision", "torchaudio")]
    digest = hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]
    marker = Path(sys.prefix) / f".comfy-requirements-{digest}"
    if marker.exists():
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(kept) + "\n")
    print(f"installing ComfyUI's requirements from {comfy_path / 'requirements.txt'}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", handle.name], check=True)
    marker.touch()


def in_process_variant(prompt: dict) -> dict:
    """The same graph on one device: Context Parallel bypassed (as the editor's bypass does:
    its input passes through), Parallel VAE Decode replaced by VAE Decode (Tiled) with the
    same tiles."""
    out = copy.deepcopy(prompt)
    for node_id, node in list(out.items()):
        if node["class_type"] == "ParaAttnContextParallel":
            source = node["inputs"]["model"]
            for other in out.values():
                for name, value in other["inputs"].items():
                    if value == [node_id, 0]:
                        other["inputs"][name] = source
            del out[node_id]
        elif node["class_type"] == "ParaAttnParallelVAEDecode":
            inputs = {k: v for k, v in node["inputs"].items() if k != "gpus"}
            out[node_id] = {"class_type": "VAEDecodeTiled", "inputs": inputs}
    return out


def cache_reuse(log: str) -> str:
    found = re.findall(r"First Block Cache: reused (\d+) of (\d+) model calls", log)
    return f"{found[-1][0]}/{found[-1][1]} calls" if found else "n/a"


def parallel_ranks(log: str) -> str:
    found = re.findall(r"Context Parallel: \d+ steps on (\d+) (\w+) rank", log)
    if found:
        return f"{found[-1][0]} {found[-1][1]} ranks"
    # one visible GPU: the node leaves sampling in ComfyUI's process
    return "1 GPU, no pool" if "sampling stays in this process" in log else "?"


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the pack headless in ComfyUI on tiny random models.")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the temporary ComfyUI base dir")
    parser.add_argument("--setup-only", action="store_true",
                        help="find or install ComfyUI and its requirements, then stop (make comfy-env)")
    parser.add_argument("--skip-requirements", action="store_true",
                        help="use this Python environment as it is (ComfyUI's requirements installed by other means, "
                             "e.g. offline); without it, ComfyUI's requirements.txt is installed when missing")
    args = parser.parse_args()

    comfy_path = locate_comfyui()
    if not args.skip_requirements:
        install_comfy_requirements(comfy_path)
    if args.setup_only:
        print(f"ComfyUI ready: {comfy_path}  (export COMFYUI_PATH={comfy_path} to run its test tier)")
        return 0
    import torch

    on_gpu = torch.cuda.is_available()
    make_importable(comfy_path, cpu=not on_gpu)
    from comfy_para_attn.testing import tiny_files, workflow_tools
    from comfy_para_attn.testing.comfy_server import pack_server

    print(f"ComfyUI: {comfy_path}")
    began = time.monotonic()
    tiny_files.write_tiny_model_files()
    print(f"tiny models: {tiny_files.default_cache_dir()} ({time.monotonic() - began:.0f} s)", flush=True)

    _ui, api = workflow_tools.load(WORKFLOW)
    # ComfyUI only detects full-width FLUX files (2.6 GiB in fp32): two CPU workers that each
    # quantize and compile it run out of memory on small hosts, so CPU runs turn both off.
    overrides = None if on_gpu else CPU_OVERRIDES
    parallel = workflow_tools.tiny_prompt(api, tiny_files.SUBSTITUTES, steps=args.steps, prefix="main_job_parallel",
                                          overrides=overrides)
    in_process = in_process_variant(workflow_tools.tiny_prompt(api, tiny_files.SUBSTITUTES, steps=args.steps,
                                                               prefix="main_job_in_process", overrides=overrides))
    base_dir = Path(tempfile.mkdtemp(prefix="comfy-para-attn-main-job-"))
    rows = []
    try:
        with pack_server(comfy_path, base_dir, tiny_files.default_cache_dir(), cpu=not on_gpu) as server:
            print(f"ComfyUI server: {server.url} (log: {server.log_path})", flush=True)
            for label, prompt in (("in-process", in_process), ("parallel", parallel)):
                problems = workflow_tools.validate_api(prompt, server.object_info())
                if problems:
                    raise SystemExit("workflow does not validate:\n" + "\n".join(problems))
                log_start = len(server.log_text())
                started = time.monotonic()
                server.run_prompt(prompt, timeout_s=1800)
                seconds = time.monotonic() - started
                log = server.log_text()[log_start:]
                where = parallel_ranks(log) if label == "parallel" else ("1 GPU" if on_gpu else "1 CPU process")
                rows.append((label, where, args.steps, cache_reuse(log), seconds))
                print(f"  {label}: done in {seconds:.1f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base_dir, ignore_errors=True)

    print(f"\n{WORKFLOW} on tiny random-weight models ({'as shipped' if on_gpu else 'CPU: FP8 and Compile off'}; "
          "each time includes model loading)")
    header = ("run", "where", "steps", "cache reuse", "time")
    table = [header] + [(r[0], r[1], str(r[2]), r[3], f"{r[4]:.1f} s") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if rows[1][1].endswith("ranks"):
        print(f"parallel / in-process time: {rows[1][4] / rows[0][4]:.2f}")
    else:
        print("one GPU: both runs sampled in ComfyUI's process (the second reused the loaded, compiled model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
