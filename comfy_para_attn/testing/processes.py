"""Process helpers the pool tests share: waiting on conditions and on processes to go."""
from __future__ import annotations

import time

import psutil


def process_gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaps (orphans' new parent may not reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(predicate, timeout_s: float, period_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


def child_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children()}
