"""FP8 quantization of a model's linear layers with torchao: settings, layer selection and
the choice between dynamic activation + weight fp8 (tensor-core `_scaled_mm`) and weight-only
fp8 (fp8 storage, matmul in the original precision).

Nothing here knows about ComfyUI; the adapter decides *when* to quantize (after LoRA patches
are merged) and keeps the originals so the model can be restored. torchao is imported only
when a layer is quantized, so this module imports without it.

What runs where (torchao 0.18):
- CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell): dynamic fp8, row-wise or
  tensor-wise scales; the activation quantization fuses into the matmul under torch.compile.
- older GPUs and CPU: weight-only fp8 (torchao's `Float8WeightOnlyConfig`: weights stored in
  float8_e4m3fn with per-row scales, upcast for the matmul). Halves weight memory, no speedup.
"""
from __future__ import annotations

import fnmatch
import functools
import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

log = logging.getLogger(__name__)

GRANULARITIES = ("row-wise", "tensor-wise")
MODES = ("dynamic", "weight-only", "off")
MODULATIONS = ("original", "int8")  # what the excluded modulation layers get (quant.modulation)

# Layers that stay in the original precision by default: input embedders, timestep / guidance
# / pooled-text MLPs, modulation (adaLN) projections and the final layer. They are small, run
# on few tokens (so fp8 gains nothing) and are the most sensitive to rounding. Names are
# those of ComfyUI's Flux, HunyuanVideo and Wan diffusion models.
DEFAULT_EXCLUDE = ("img_in, txt_in, time_in, vector_in, guidance_in, final_layer, *_mod, *modulation*, "
                   "patch_embedding, text_embedding, time_embedding, time_projection, head")

_FP8_MM_MULTIPLE = 16  # torch._scaled_mm needs both matrix dims divisible by 16


class FP8UnavailableError(RuntimeError):
    """The model or environment cannot be quantized (clear message for the user)."""


@dataclass(frozen=True)
class FP8Settings:
    """The user's settings: small and picklable (pool workers re-apply features from it)."""

    granularity: str = "row-wise"
    mode: str = "dynamic"
    exclude: str = DEFAULT_EXCLUDE
    modulation: str = "original"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        parse_patterns(self.exclude)  # fail at the node, not at sampling time

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def int8_modulation(self) -> bool:
        return self.enabled and self.modulation == "int8"

    @property
    def patterns(self) -> tuple[str, ...]:
        return parse_patterns(self.exclude)


def parse_patterns(text: str) -> tuple[str, ...]:
    """'a, b.*,  c' -> ('a', 'b.*', 'c'); empty entries are dropped."""
    patterns = tuple(p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip())
    for p in patterns:
        if any(c.isspace() for c in p):
            raise ValueError(f"exclude pattern {p!r} contains a space; separate patterns with commas")
    return patterns


def is_excluded(name: str, patterns: Iterable[str]) -> bool:
    """True when a glob pattern matches the dotted module name or one of its ancestors
    ('final_layer' excludes 'final_layer.linear'; '*_mod' excludes 'double_blocks.0.img_mod.lin')."""
    return _excluded(name, tuple(patterns))


@functools.lru_cache(maxsize=1 << 16)
def _excluded(name: str, patterns: tuple) -> bool:
    # Asked for every module of the model at every run (FLUX.1-dev: ~1,000 names, ~16k glob matches).
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, p) for p in patterns for prefix in prefixes)


def quantizable_linears(root: torch.nn.Module, patterns: Iterable[str]) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every nn.Linear under `root` that is not excluded and whose weight
    is a floating-point matrix with dims divisible by 16 (what fp8 tensor-core matmuls need)."""
    patterns = tuple(patterns)
    out = []
    for name, module in root.named_modules():
        if not isinstance(module, torch.nn.Linear) or is_excluded(name, patterns):
            continue
        w = module.weight
        if w is None or w.ndim != 2 or not w.dtype.is_floating_point:
            continue  # not a plain matrix
        if w.element_size() < 2 and not is_stored_fp8(module):
            continue  # fp8 that is not e4m3fn with one scale (e5m2 weights)
        if w.shape[0] % _FP8_MM_MULTIPLE or w.shape[1] % _FP8_MM_MULTIPLE:
            continue
        out.append((name, module))
    return out


def is_stored_fp8(module: torch.nn.Module) -> bool:
    """A linear layer whose weight is stored in fp8 e4m3fn, as ComfyUI loads fp8 checkpoints:
    the value is `weight * scale_weight` (fp8_scaled files: a 0-d fp32 parameter) or the weight
    itself (fp8 weight dtypes)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float8_e4m3fn:
        return False
    scale = getattr(module, "scale_weight", None)
    return scale is None or (isinstance(scale, torch.Tensor) and scale.numel() == 1)


def stored_fp8_scale(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """The 0-d scale of a layer `is_stored_fp8` takes (1 without `scale_weight`), else None."""
    if not is_stored_fp8(module):
        return None
    scale = getattr(module, "scale_weight", None)
    if scale is None:
        return torch.ones((), dtype=torch.float32, device=module.weight.device)
    return scale.detach().reshape(())


def supports_dynamic_fp8(device: torch.device) -> bool:
    """fp8 tensor-core matmuls (torch._scaled_mm): CUDA compute capability >= 8.9."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass(frozen=True)
class FP8Plan:
    """What will actually run on a device: the mode after fallbacks, and why it fell back."""

    mode: str  # "dynamic" or "weight-only"
    granularity: str
    note: Optional[str] = None  # set when the plan differs from the settings

    def torchao_config(self):
        return torchao_config(self.mode, self.granularity)


def plan_for(settings: FP8Settings, device, weight_dtype: torch.dtype) -> FP8Plan:
    """The mode and granularity `settings` get on `device` for weights of `weight_dtype`."""
    device = torch.device(device)
    mode, granularity, notes = settings.mode, settings.granularity, []
    if mode == "dynamic" and not supports_dynamic_fp8(device):
        where = "CPU" if device.type != "cuda" else (
            f"{torch.cuda.get_device_name(device)} (compute capability "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})")
        notes.append(f"fp8 matmuls need a CUDA GPU with compute capability >= 8.9; on {where} the model "
                     f"uses weight-only fp8 (half the weight memory, no speedup)")
        mode = "weight-only"
    if mode == "dynamic" and granularity == "row-wise" and weight_dtype != torch.bfloat16:
        notes.append(f"row-wise fp8 needs bf16 weights, this model is {weight_dtype}: using tensor-wise scales")
        granularity = "tensor-wise"
    return FP8Plan(mode, granularity, "; ".join(notes) or None)


def _torchao():
    try:
        import torchao.quantization as quantization
        from torchao.utils import TorchAOBaseTensor
    except ImportError as exc:
        raise FP8UnavailableError(
            f"FP8 Quantize needs torchao (pip install 'torchao>=0.10,<0.19'); importing it failed: {exc}") from exc
    return quantization, TorchAOBaseTensor


def torchao_config(mode: str, granularity: str):
    """The torchao config object for `mode` ("dynamic" or "weight-only") and `granularity`."""
    q, _ = _torchao()
    scales = q.PerRow() if granularity == "row-wise" else q.PerTensor()
    # set_inductor_config=False: torchao would otherwise switch on coordinate-descent tuning
    # globally, which lengthens every later compile in the ComfyUI process.
    if mode == "dynamic":
        return q.Float8DynamicActivationFloat8WeightConfig(granularity=scales, set_inductor_config=False)
    fields = getattr(q.Float8WeightOnlyConfig, "__dataclass_fields__", {})
    kwargs = {"set_inductor_config": False} if "set_inductor_config" in fields else {}
    if "granularity" in fields:  # torchao >= 0.15
        kwargs["granularity"] = scales
    return q.Float8WeightOnlyConfig(**kwargs)


def is_quantized(tensor) -> bool:
    """True for a torchao quantized tensor (what `quantize_linear` leaves as the weight)."""
    try:
        _, base = _torchao()
    except FP8UnavailableError:
        return False
    return isinstance(tensor, base)


def quantize_linear(module: torch.nn.Linear, config) -> None:
    """Replace `module.weight` in place by torchao's fp8 tensor for `config`."""
    q, _ = _torchao()
    q.quantize_(module, config, filter_fn=lambda m, fqn: m is module)


def quantize_stored_fp8(module: torch.nn.Linear, config, compute_dtype: torch.dtype) -> bool:
    """`quantize_linear` for a layer whose weight is stored in fp8 (`stored_fp8_scale`),
    without rounding it a second time: torchao quantizes the dequantized weight, then its fp8
    values and scales are replaced by the stored ones (the same numbers: fp8 x scale, one
    scale for every row). False when torchao's tensor has another layout: its own rounding of
    the dequantized weight then stays."""
    stored = module.weight.detach()
    scale = stored_fp8_scale(module).to(device=stored.device, dtype=torch.float32)
    # torchao's tensor for its layout only (its values are replaced): no fp32 copy of the weight
    module.weight = torch.nn.Parameter(stored.to(compute_dtype) * scale.to(compute_dtype), requires_grad=False)
    quantize_linear(module, config)
    qdata, row_scales = getattr(module.weight, "qdata", None), getattr(module.weight, "scale", None)
    if not (isinstance(qdata, torch.Tensor) and qdata.dtype == stored.dtype and qdata.shape == stored.shape
            and isinstance(row_scales, torch.Tensor) and row_scales.dtype == torch.float32
            and row_scales.numel() in (1, stored.shape[0])):
        return False
    qdata.copy_(stored)
    row_scales.copy_(scale.expand_as(row_scales))
    return True
