"""FP8 quantization settings and layer selection (torchao is imported only when used)."""
from .fp8 import (DEFAULT_EXCLUDE, GRANULARITIES, MODES, MODULATIONS, FP8Plan, FP8Settings, FP8UnavailableError,
                  is_excluded, is_quantized, parse_patterns, plan_for, quantizable_linears, quantize_linear,
                  quantize_stored_fp8, is_stored_fp8, stored_fp8_scale, supports_dynamic_fp8, torchao_config)

__all__ = ["DEFAULT_EXCLUDE", "GRANULARITIES", "MODES", "MODULATIONS", "FP8Plan", "FP8Settings",
           "FP8UnavailableError", "is_excluded", "is_quantized", "parse_patterns", "plan_for", "quantizable_linears", "quantize_linear",
           "quantize_stored_fp8", "is_stored_fp8", "stored_fp8_scale", "supports_dynamic_fp8", "torchao_config"]
