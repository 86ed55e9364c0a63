"""A real ComfyUI server in a temporary base directory, for the comfyui tests and the main job.

The ComfyUI checkout is never modified: `--base-directory` points the server at a temp folder
whose custom_nodes/ holds symlinks to this pack (and to test-only node packs) and whose
models/ holds symlinks to the tiny model files. Only the standard library is used (urllib).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """`python main.py --cpu` on a free port; use as a context manager."""

    def __init__(self, comfy_path: Path | str, base_dir: Path | str, *, custom_nodes: dict | None = None,
                 models: dict | None = None, placeholders: dict | None = None, cpu: bool = True,
                 python: str = sys.executable, start_timeout_s: float = 240.0):
        """custom_nodes: {dir name: path}; models: {folder: [files to link]};
        placeholders: {folder: [names]} of empty files, so the shipped workflows' real file
        names appear in the loaders' lists (never loaded)."""
        self.comfy_path = Path(comfy_path)
        self.base_dir = Path(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.client_id = uuid.uuid4().hex
        self._python, self._cpu, self._start_timeout_s = python, cpu, start_timeout_s
        self._proc = None
        nodes_dir = self.base_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "user").mkdir(exist_ok=True)  # ComfyUI's database lives there
        for name, path in (custom_nodes or {"comfy-para-attn": PACK_ROOT}).items():
            link = nodes_dir / name
            if not link.exists():
                link.symlink_to(Path(path).resolve(), target_is_directory=True)
        for folder, files in (models or {}).items():
            for file in files:
                link = self.base_dir / "models" / folder / Path(file).name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(Path(file).resolve())
        for folder, names in (placeholders or {}).items():
            for name in names:
                path = self.base_dir / "models" / folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.exists():
                    path.touch()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "ComfyServer":
        command = [self._python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--base-directory", str(self.base_dir)]
        if self._cpu:
            command.append("--cpu")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "wb")
        # Own process group: stop() ends the server and the pool workers it started.
        self._proc = subprocess.Popen(command, cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self._proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {self._start_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server as a service manager stops one process: SIGTERM to ComfyUI alone.
        Its pool workers then exit on their own and remove its /dev/shm folder (SIGTERM to
        the whole group killed them with it and left the folder); what is left after 10 s
        is killed."""
        if self._proc is not None and self._proc.poll() is None:
            import signal

            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(self._proc.pid, 0)  # anything of its group (its workers) still running?
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                os.killpg(self._proc.pid, signal.SIGKILL)
        if self._proc is not None:
            self._log.close()
        self._proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs."""
        return None if self._proc is None else self._proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- HTTP API ----------------------------------------------------------------------

    def get(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, route: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                return json.loads(body) if body.strip() else None  # /free answers with no body
        except urllib.error.HTTPError as exc:  # ComfyUI explains a rejected prompt in the body
            raise RuntimeError(f"POST {route} -> {exc.code}: {exc.read().decode(errors='replace')}") from None

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def run_prompt(self, prompt: dict, timeout_s: float = 600) -> dict:
        """Queue an API-format prompt and wait for its history entry; raise on failure."""
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"prompt failed: {json.dumps(messages, indent=1)[:4000]}\n"
                                       f"server log:\n{self.log_tail()}")
                return entry
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout_s:.0f} s:\n{self.log_tail()}")


TEST_NODES_DIR = PACK_ROOT / "tests" / "comfy_test_nodes"


def pack_server(comfy_path, base_dir, tiny_models_dir=None, **kwargs) -> ComfyServer:
    """A server with this pack, the test-only nodes (ParaAttnTestConditioning), the tiny
    model files, empty placeholders named like the real files of the shipped workflows
    (so the loaders list them; they are never loaded) and test pictures under the names their
    LoadImage nodes read. Not started yet."""
    from comfy_para_attn.testing import tiny_files, workflow_tools

    models = {}
    for name, (kind, _real) in (tiny_files.TINY_FILES.items() if tiny_models_dir else ()):
        folder = tiny_files.FOLDERS[kind]
        models.setdefault(folder, []).append(Path(tiny_models_dir) / folder / name)
    workflow_tools.write_input_images(Path(base_dir) / "input")  # LoadImage's pictures (a ControlNet's)
    return ComfyServer(comfy_path, base_dir, custom_nodes={"comfy-para-attn": PACK_ROOT,
                                                           "para_attn_test_nodes": TEST_NODES_DIR},
                       models=models, placeholders=workflow_tools.shipped_model_files(), **kwargs)
