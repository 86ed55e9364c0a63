"""Background torch.distributed worker pool.

Generic: it knows nothing about ComfyUI. Jobs are plain functions `fn(ctx, payload)`
named by "module:function" strings and run on every rank; rank 0's return value is the
result. See `Pool`, `get_pool`, `WorkerContext`, `transfer` for large tensors and `shm` for
their directory in /dev/shm.
"""
from .context import WorkerContext
from .controller import Pool, PoolLayout
from .errors import JobInterrupted, JobRefused, PoolError, PoolInterrupted, PoolJobError, PoolStartError, ShmSpaceError
from .registry import current_pool, get_pool, shutdown_pool

__all__ = [
    "JobInterrupted",
    "JobRefused",
    "Pool",
    "PoolError",
    "PoolInterrupted",
    "PoolJobError",
    "PoolLayout",
    "PoolStartError",
    "ShmSpaceError",
    "WorkerContext",
    "current_pool",
    "get_pool",
    "shutdown_pool",
]
