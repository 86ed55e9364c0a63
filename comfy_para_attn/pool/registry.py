"""The one shared pool of a process: reused while its layout stays the same."""
from __future__ import annotations

import logging
import threading
from typing import Any

from .controller import Pool, PoolLayout

logger = logging.getLogger("comfy_para_attn.pool")

_lock = threading.Lock()
_current: Pool | None = None


def get_pool(
    world_size: int,
    *,
    device: str = "cpu",
    gpus=None,
    env: dict | None = None,
    init: tuple[str, Any] | None = None,
    sys_path=None,
    start_timeout_s: float = 120.0,
) -> Pool:
    """The live pool if its layout (world size, device, GPUs, env, sys_path, init) matches,
    else a fresh one; the old pool is shut down first so two never hold the GPUs at once.
    A pool that failed (any `PoolError`) is dead, so the next call after a failure starts
    a new one. Arguments are those of `Pool`."""
    global _current
    layout = PoolLayout.create(world_size, device, gpus, env, sys_path, init)
    with _lock:
        if _current is not None and _current.alive and _current.layout == layout:
            return _current
        if _current is not None:
            if _current.alive:
                logger.info("worker pool layout changed; restarting it")
            _current.shutdown()
            _current = None
        _current = Pool(world_size, device=device, gpus=gpus, env=env, init=init,
                        sys_path=sys_path, start_timeout_s=start_timeout_s)
        return _current


def current_pool() -> Pool | None:
    """The live shared pool, or None (no pool started, or the last one failed)."""
    with _lock:
        return _current if _current is not None and _current.alive else None


def shutdown_pool(timeout_s: float = 10.0) -> None:
    """Shut the shared pool down (if any); the next `get_pool` starts a new one."""
    global _current
    with _lock:
        if _current is not None:
            _current.shutdown(timeout_s)
            _current = None
