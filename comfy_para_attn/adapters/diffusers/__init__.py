"""diffusers adapters: context parallelism (`context_parallel`) and First Block Cache (`cache`)."""
from .context_parallel import parallelize_transformer, unparallelize_transformer

__all__ = ["parallelize_transformer", "unparallelize_transformer"]
