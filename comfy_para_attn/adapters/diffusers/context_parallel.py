"""Context parallelism for diffusers' FluxTransformer2DModel and HunyuanVideoTransformer3DModel.

    parallelize_transformer(model, ContextParallelConfig(ulysses=2))   # on every rank
    out = model(**inputs)              # same call, same full output on every rank
    unparallelize_transformer(model)   # back to the plain model

How (no diffusers forward is copied):
- Forward hooks shard the outputs of the input embedders (image and text streams, each
  split contiguously across the sequence group) and of the rotary embedding (each token
  keeps its own rows), and gather `proj_out`'s image tokens once at the end (uneven
  lengths: padded for the all-gather, trimmed after).
- Every joint-attention processor is wrapped: the original processor runs unchanged, pinned
  to diffusers' NATIVE backend, and a TorchFunctionMode routes its
  `F.scaled_dot_product_attention` call to `parallel_attention`. Other SDPA calls (the
  HunyuanVideo text refiner, IP-adapter tokens) stay local.

Rank r holds its text slice and its image slice, in the model's own order (Flux: text
first; HunyuanVideo: image first). Attention does not care about key order, so the global
sequence is simply the ranks' local sequences one after another; HunyuanVideo's text
padding becomes a key mask in exactly that order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ...attention import ContextParallelConfig, ParallelContext, build_parallel_context, parallel_attention
from ...attention.parallel import shard_lengths

_ATTR = "_para_attn_context_parallel"
TEXT, IMAGE = "text", "image"


class TokenLayout:
    """This rank's slice of the joint sequence for the current model call."""

    def __init__(self, cp: ParallelContext, local_order: Sequence[str]):
        self.cp = cp
        self.parts = cp.config.sequence_size
        self.local_order = tuple(local_order)
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, int] = {}
        self.key_mask: Optional[Tensor] = None
        self.pending_text_keep: Optional[Tensor] = None

    def lengths(self, stream: str) -> tuple[int, ...]:
        return shard_lengths(self.totals[stream], self.parts)

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """Local joint length of every rank of the sequence group."""
        per_stream = [self.lengths(s) for s in self.local_order]
        return tuple(sum(lens[r] for lens in per_stream) for r in range(self.parts))

    def _record(self, stream: str, total: int) -> None:
        if total < self.parts:
            raise ValueError(
                f"the {stream} stream has {total} tokens, fewer than the {self.parts} ranks of the sequence "
                "group; every rank needs at least one token of each stream"
            )
        if self.totals.setdefault(stream, total) != total:
            raise RuntimeError(f"{stream} stream length changed within one call: {self.totals[stream]} vs {total}")

    def shard(self, x: Tensor, stream: str, dim: int) -> Tensor:
        self._record(stream, x.shape[dim])
        return torch.tensor_split(x, self.parts, dim=dim)[self.cp.sequence_rank]

    def shard_streams(self, x: Tensor, streams: Sequence[str], dim: int) -> Tensor:
        """Shard a tensor covering `streams` back to back (e.g. rope of cat(txt_ids, img_ids));
        the result follows the local order."""
        if len(streams) == 1:
            return self.shard(x, streams[0], dim)
        pieces = x.split([self.totals[s] for s in streams], dim=dim)
        local = {s: self.shard(p, s, dim) for s, p in zip(streams, pieces)}
        return torch.cat([local[s] for s in self.local_order if s in local], dim=dim)

    def set_text_keep(self, keep: Tensor) -> None:
        """keep: bool [B, S_text] over the full text; builds the global key mask in shard order."""
        text_slices = torch.tensor_split(keep, self.parts, dim=1)
        blocks = []
        for r in range(self.parts):
            for stream in self.local_order:
                if stream == TEXT:
                    blocks.append(text_slices[r])
                else:
                    blocks.append(keep.new_ones(keep.shape[0], self.lengths(stream)[r]))
        self.key_mask = torch.cat(blocks, dim=1)

    def gather(self, x: Tensor, stream: str, dim: int) -> Tensor:
        """Inverse of `shard`: all-gather this stream's shards (uneven lengths padded, then trimmed)."""
        import torch.distributed._functional_collectives as fc

        lens = self.lengths(stream)
        longest = max(lens)
        x = x.movedim(dim, 0)
        if x.shape[0] < longest:
            x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
        all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor  # older torch: all_gather_tensor
        gathered = all_gather(x.contiguous(), 0, self.cp.sequence_group)
        pieces = gathered.split(longest)
        return torch.cat([p[:n] for p, n in zip(pieces, lens)]).movedim(0, dim)

    def attend(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        """Stands in for F.scaled_dot_product_attention (q, k, v: [B, H, S, D])."""
        local_len = self.seq_lens[self.cp.sequence_rank]
        if query.shape[2] != local_len or key.shape[2] != local_len:
            # Not the joint attention (e.g. IP-adapter tokens): keys are not sharded, run it locally.
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if dropout_p or is_causal or enable_gqa:
            raise NotImplementedError("context-parallel attention supports no dropout, causal masking or GQA")
        if attn_mask is not None and self.key_mask is None:
            raise NotImplementedError(
                "this call passes an attention mask the context-parallel adapter cannot shard; only "
                "HunyuanVideo's text padding mask is supported"
            )
        # HunyuanVideo's own mask was built from local lengths and is replaced by the global one.
        return parallel_attention(query, key, value, mask=self.key_mask, cp=self.cp, seq_lens=self.seq_lens,
                                  scale=scale)


class _RouteAttention(TorchFunctionMode):
    """Sends F.scaled_dot_product_attention to `layout.attend`; every other op runs as is."""

    def __init__(self, layout: TokenLayout):
        super().__init__()
        self.layout = layout

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.layout.attend(*args, **kwargs)
        name = getattr(func, "__name__", None)
        if args and isinstance(args[0], Tensor) and name and getattr(Tensor, name, None) is func:
            # Call Tensor methods as methods: torch.compile cannot inline some of them
            # (Tensor.unflatten calls super()) when given as plain functions.
            return getattr(args[0], name)(*args[1:], **kwargs)
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _routing_processor_class(inner_cls: type) -> type:
    """A wrapper class per processor class. `functools.wraps` keeps the inner `__call__`
    signature visible to diffusers, which passes a processor only the kwargs it names."""

    class ContextParallelProcessor:
        def __init__(self, inner, mode: _RouteAttention):
            self.inner = inner
            self.mode = mode

        @functools.wraps(inner_cls.__call__)
        def __call__(self, attn, *args, **kwargs):
            with self.mode:
                return self.inner(attn, *args, **kwargs)

    ContextParallelProcessor.__name__ = ContextParallelProcessor.__qualname__ = f"ContextParallel{inner_cls.__name__}"
    return ContextParallelProcessor


def _check_native_backend_calls_sdpa() -> None:
    """Routing relies on diffusers' NATIVE backend calling F.scaled_dot_product_attention;
    fail loudly on a diffusers version where it no longer does, instead of attending locally."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    seen = []

    class Probe(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func is F.scaled_dot_product_attention)
            return func(*args, **(kwargs or {}))

    x = torch.zeros(1, 2, 1, 4)  # [B, S, H, D]
    with Probe():
        dispatch_attention_fn(x, x, x, backend=AttentionBackendName.NATIVE)
    if not any(seen):
        raise RuntimeError("diffusers' NATIVE attention backend no longer calls F.scaled_dot_product_attention; "
                           "the context-parallel adapter does not support this diffusers version")


# ---- model families --------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFamily:
    local_order: tuple  # order of the streams inside each joint attention call
    install: Callable  # (model, layout) -> list of hook handles for the embedders and proj_out
    check_call: Callable = lambda model, kwargs: None  # reject call options that break sharding


def _shard_output(layout: TokenLayout, stream: str, dim: int = 1):
    return lambda module, args, output: layout.shard(output, stream, dim)


def _shard_rope(layout: TokenLayout, streams: Sequence[str]):
    return lambda module, args, output: tuple(layout.shard_streams(t, streams, dim=0) for t in output)


def _gather_image(layout: TokenLayout):
    return lambda module, args, output: layout.gather(output, IMAGE, dim=1)


def _install_flux(model, layout: TokenLayout) -> list:
    # forward order: x_embedder, context_embedder, pos_embed(cat(txt_ids, img_ids)), blocks, proj_out
    return [
        model.x_embedder.register_forward_hook(_shard_output(layout, IMAGE)),
        model.context_embedder.register_forward_hook(_shard_output(layout, TEXT)),
        model.pos_embed.register_forward_hook(_shard_rope(layout, (TEXT, IMAGE))),
        model.proj_out.register_forward_hook(_gather_image(layout)),
    ]


def _check_flux_call(model, kwargs) -> None:
    for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{name} (ControlNet residuals) are not sharded under context parallelism")


def _install_hunyuan_video(model, layout: TokenLayout) -> list:
    # forward order: rope (image rows), x_embedder, context_embedder(text, timestep, mask), blocks, proj_out

    def read_text_mask(module, args, kwargs):
        mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[2]
        # The model keeps the first sum(mask) text tokens (right padding), so do the same.
        text_len = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
        positions = torch.arange(text_len, device=mask.device)
        layout.pending_text_keep = positions[None, :] < mask.sum(dim=1, dtype=torch.int)[:, None]

    def shard_text(module, args, output):
        output = layout.shard(output, TEXT, dim=1)
        layout.set_text_keep(layout.pending_text_keep)
        return output

    return [
        model.rope.register_forward_hook(_shard_rope(layout, (IMAGE,))),
        model.x_embedder.register_forward_hook(_shard_output(layout, IMAGE)),
        model.context_embedder.register_forward_pre_hook(read_text_mask, with_kwargs=True),
        model.context_embedder.register_forward_hook(shard_text),
        model.proj_out.register_forward_hook(_gather_image(layout)),
    ]


def _check_hunyuan_video_model(model) -> None:
    if getattr(model.config, "image_condition_type", None) == "token_replace":
        raise NotImplementedError("HunyuanVideo image_condition_type='token_replace' replaces first-frame tokens "
                                  "by index and is not supported under context parallelism")


def _family(model) -> ModelFamily:
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel

    if isinstance(model, FluxTransformer2DModel):
        return ModelFamily((TEXT, IMAGE), _install_flux, _check_flux_call)
    if isinstance(model, HunyuanVideoTransformer3DModel):
        _check_hunyuan_video_model(model)
        return ModelFamily((IMAGE, TEXT), _install_hunyuan_video)
    raise TypeError(
        f"parallelize_transformer supports diffusers' FluxTransformer2DModel and HunyuanVideoTransformer3DModel; "
        f"got {type(model).__module__}.{type(model).__name__}"
    )


# ---- public API ------------------------------------------------------------------------

class ContextParallelHandle:
    """What `parallelize_transformer` installed on one model; `undo()` removes it all."""

    def __init__(self, model, layout: TokenLayout):
        self.model = model
        self.layout = layout
        self.hooks: list = []
        self.processors: list = []  # (attention module, original processor, its own backend or None)

    def _wrap_processors(self) -> None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        mode = _RouteAttention(self.layout)
        for blocks in (self.model.transformer_blocks, self.model.single_transformer_blocks):
            for block in blocks:
                attn = block.attn
                inner = attn.processor
                if getattr(inner, "_parallel_config", None) is not None:
                    raise RuntimeError("this model already uses diffusers' enable_parallelism; use one or the other")
                self.processors.append((attn, inner, inner.__dict__.get("_attention_backend")))
                # Pinned to NATIVE so that the attention reaches F.scaled_dot_product_attention.
                inner._attention_backend = AttentionBackendName.NATIVE
                attn.set_processor(_routing_processor_class(type(inner))(inner, mode))

    def check_processors(self) -> None:
        """Each call: a processor set after parallelizing (set_attn_processor, an IP-Adapter)
        would attend over this rank's shard only, silently wrong."""
        for attn, inner, _backend in self.processors:
            if getattr(attn.processor, "inner", None) is not inner:
                raise RuntimeError(
                    f"the attention processor of {type(attn).__name__} was replaced after "
                    "parallelize_transformer (e.g. by set_attn_processor or load_ip_adapter); call "
                    "unparallelize_transformer(model), change the processors, then parallelize again")

    def undo(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for attn, inner, backend in self.processors:
            attn.set_processor(inner)
            if backend is None:
                inner.__dict__.pop("_attention_backend", None)
            else:
                inner._attention_backend = backend
        self.hooks, self.processors = [], []
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)


def parallelize_transformer(model, config_or_context: Union[ContextParallelConfig, ParallelContext]):
    """Make `model` run context-parallel over the sequence group; returns the same model.

    Call on every rank with the same arguments (a `ContextParallelConfig` builds the process
    groups, so all ranks must call it together; a `ParallelContext` reuses existing ones).
    Every rank passes the full inputs and gets the full output. cfg parallel is not
    supported here: diffusers pipelines run cond and uncond as separate calls.
    """
    family = _family(model)
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("this model is already parallelized; call unparallelize_transformer(model) first")
    num_heads = model.config.num_attention_heads
    if isinstance(config_or_context, ParallelContext):
        cp = config_or_context
        cp.config.validate(num_heads=num_heads)
    else:
        cp = build_parallel_context(config_or_context, num_heads=num_heads)
    if cp.config.cfg > 1:
        raise NotImplementedError("cfg parallel is not supported by the diffusers adapter (pipelines call the "
                                  "transformer once per guidance half); put every rank into ulysses x ring")
    if cp.config.sequence_size == 1:
        return model
    _check_native_backend_calls_sdpa()

    layout = TokenLayout(cp, family.local_order)
    handle = ContextParallelHandle(model, layout)

    def start_call(module, args, kwargs):
        family.check_call(module, kwargs)
        handle.check_processors()
        layout.reset()

    handle.hooks.append(model.register_forward_pre_hook(start_call, with_kwargs=True))
    handle.hooks.extend(family.install(model, layout))
    handle._wrap_processors()
    setattr(model, _ATTR, handle)
    return model


def unparallelize_transformer(model) -> None:
    """Remove what `parallelize_transformer` installed (no-op on a plain model)."""
    handle = getattr(model, _ATTR, None)
    if handle is not None:
        handle.undo()


def context_parallel_handle(model) -> Optional[ContextParallelHandle]:
    return getattr(model, _ATTR, None)
