"""Context-parallel attention: layout, process groups, Ulysses, Ring and the unified call."""
from .config import ContextParallelConfig, ParallelContext, build_parallel_context
from .local import key_padding_bias, local_attention, register_backend, set_backend
from .parallel import parallel_attention, shard_lengths, shard_sequence

__all__ = [
    "ContextParallelConfig",
    "ParallelContext",
    "build_parallel_context",
    "key_padding_bias",
    "local_attention",
    "parallel_attention",
    "register_backend",
    "set_backend",
    "shard_lengths",
    "shard_sequence",
]
