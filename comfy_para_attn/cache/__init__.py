"""First Block Cache: model-agnostic state machine (no ComfyUI, no torch.distributed)."""
from .state import FirstBlockCache, FirstBlockCacheSettings, relative_diff_sums

__all__ = ["FirstBlockCache", "FirstBlockCacheSettings", "relative_diff_sums"]
