"""The one shared pool of a process: reused while its layout stays the same."""
from __future__ import annotations

import logging
import threading
from typing import Any

from .controller import Pool, PoolLayout

logger = logging.getLogger("comfy_para_attn.pool")

_lock = threading.Lock()
_current: Pool | None = None
_replaced: PoolLayout | None = None  # the layout the current pool replaced (alternation check)
_warned_alternating: set = set()


def _describe(layout: PoolLayout) -> str:
    return f"{layout.world_size} {layout.device.upper()} rank(s)" + (f" (GPUs {list(layout.gpus)})" if layout.gpus else "")


def _warn_if_alternating(old: PoolLayout, new: PoolLayout) -> None:
    """A pool replaced by the layout it had replaced: two nodes (Context Parallel and Parallel
    VAE Decode, or two Context Parallel nodes) ask for different GPUs, so every prompt pays
    for restarts; say so once per pair."""
    pair = frozenset((old, new))
    if _replaced != new or pair in _warned_alternating:
        return
    _warned_alternating.add(pair)
    if (old.world_size, old.gpus) != (new.world_size, new.gpus):
        advice = ("Give the Context Parallel and Parallel VAE Decode nodes of this workflow the same gpus setting "
                  "to keep one pool.")
    else:
        advice = "The two differ in the workers' environment or start settings."
    logger.warning("the worker pool keeps switching between %s and %s: each switch restarts the workers and "
                   "reloads the model (seconds per prompt). %s", _describe(old), _describe(new), advice)


def get_pool(
    world_size: int,
    *,
    device: str = "cpu",
    gpus=None,
    env: dict | None = None,
    init: tuple[str, Any] | None = None,
    sys_path=None,
    start_timeout_s: float = 120.0,
    should_interrupt=None,
) -> Pool:
    """The live pool if its layout (world size, device, GPUs, env, sys_path, init) matches,
    else a fresh one; the old pool is shut down first so two never hold the GPUs at once.
    A pool that failed (any `PoolError`) is dead, so the next call after a failure starts
    a new one. Arguments are those of `Pool` (`should_interrupt` only matters when a pool
    starts)."""
    global _current, _replaced
    layout = PoolLayout.create(world_size, device, gpus, env, sys_path, init)
    with _lock:
        if _current is not None and _current.alive and _current.layout == layout:
            return _current
        if _current is not None:
            died = _current.idle_death()
            if died:  # else the next prompt is slower (a new pool, the model again) and nobody says why
                logger.warning("worker pool: %s; starting a new pool", died)
            if _current.alive:
                logger.info("worker pool layout changed from %s to %s; restarting it (the workers load their "
                            "models again)", _describe(_current.layout), _describe(layout))
                _warn_if_alternating(_current.layout, layout)
                _replaced = _current.layout
            _current.shutdown()
            _current = None
        _current = Pool(world_size, device=device, gpus=gpus, env=env, init=init,
                        sys_path=sys_path, start_timeout_s=start_timeout_s, should_interrupt=should_interrupt)
        return _current


def current_pool() -> Pool | None:
    """The live shared pool, or None (no pool started, or the last one failed)."""
    with _lock:
        return _current if _current is not None and _current.alive else None


def shutdown_pool(timeout_s: float = 10.0) -> None:
    """Shut the shared pool down (if any); the next `get_pool` starts a new one."""
    global _current, _replaced
    with _lock:
        _replaced = None  # a deliberate shutdown starts the alternation check afresh
        if _current is not None:
            _current.shutdown(timeout_s)
            _current = None
