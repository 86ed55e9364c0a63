"""Locate a ComfyUI checkout and make it importable, without importing it.

Used by the tests (comfyui tier), the main job and the pool workers, which run as their
own module and must find the same ComfyUI as the server that launched them.
"""
from __future__ import annotations

import enum
import json
import os
import sys
from pathlib import Path


def _is_comfyui(path: Path) -> bool:
    return (path / "comfy" / "model_management.py").is_file() and (path / "nodes.py").is_file()


def _comfy_cli_workspaces() -> list[Path]:
    """Workspaces comfy-cli knows about (its config file), best first."""
    candidates = []
    for config in (Path.home() / ".config" / "comfy-cli" / "config.ini",):
        if config.is_file():
            for line in config.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() in ("default_workspace", "recent_workspace") and value.strip():
                    candidates.append(Path(value.strip()))
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    return candidates


def find_comfyui() -> Path | None:
    """`COMFYUI_PATH` if set (it must be a ComfyUI checkout), else the comfy-cli workspace.

    Returns None when no ComfyUI is found; a set but wrong COMFYUI_PATH is an error, not a
    silent fallback.
    """
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not _is_comfyui(path):
            raise FileNotFoundError(
                f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_management.py)."
            )
        return path
    for path in _comfy_cli_workspaces():
        if _is_comfyui(path):
            return path.resolve()
    return None


def make_importable(path: Path | str, *, cpu: bool | None = None, cli_args: dict | None = None) -> None:
    """Put ComfyUI on sys.path and set its command-line settings before comfy imports them.

    `comfy.cli_args` parses no argv unless ComfyUI's main.py enabled it, so a library user
    (a test, a pool worker) sets the fields it needs here, before `comfy.model_management`
    is imported (that module reads them at import time).
    """
    path = str(Path(path).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args  # noqa: F401  (cheap: argparse only)

    args = comfy.cli_args.args
    for key, value in (cli_args or {}).items():
        setattr(args, key, _decode_enums(comfy.cli_args, value))
    if cpu is not None:
        args.cpu = cpu


_ENUM, _ENUM_SET = "__cli_enum__", "__cli_enum_set__"


def _encode_enums(value):
    """ComfyUI's enum settings (`--fast` is a set of PerformanceFeature, `--preview-method` a
    LatentPreviewMethod) as JSON: {marker: class name, "values": [member values]}. They are
    decoded where `comfy.cli_args` is importable (the worker imports it after this payload)."""
    members = list(value) if isinstance(value, (set, frozenset, list, tuple)) else [value]
    if not members or not all(isinstance(m, enum.Enum) for m in members):
        return value
    if len({type(m) for m in members}) != 1:
        return value
    return {_ENUM_SET if isinstance(value, (set, frozenset)) else _ENUM: type(members[0]).__name__,
            "values": [m.value for m in members]}


def _decode_enums(module, value):
    if not isinstance(value, dict) or not ({_ENUM, _ENUM_SET} & set(value)):
        return value
    cls = getattr(module, value.get(_ENUM) or value.get(_ENUM_SET))
    members = [cls(v) for v in value["values"]]
    return set(members) if _ENUM_SET in value else members[0]


# Settings ComfyUI changes while it runs that the workers never read: newer ComfyUI sets the
# preview method from each prompt (the UI's "Live preview"). In the snapshot they would change
# the pool's start settings, and so restart the workers, whenever two prompts differ in them.
_PER_PROMPT_SETTINGS = frozenset({"preview_method", "preview_size"})


def snapshot_cli_args() -> dict:
    """The ComfyUI settings of this process that a worker must share (JSON-safe values;
    enum settings encoded, see `_encode_enums`)."""
    import comfy.cli_args

    out = {}
    for key, value in vars(comfy.cli_args.args).items():
        if key in _PER_PROMPT_SETTINGS:
            continue
        value = _encode_enums(value)
        try:
            json.dumps(value)
        except TypeError:
            continue
        out[key] = value
    return out
