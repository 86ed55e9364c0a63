"""The classes our object patches give layers: a mixin's forward in front of the layer's own
class. A class, not a per-layer callable, so that compiled blocks, which guard on the type of
what they call, share one graph; one class per (mixin, own class, settings), made once."""
from __future__ import annotations

_classes: dict = {}


def mixed_class(mixin: type, cls: type, prefix: str, **attrs) -> type:
    """`mixin` over the layer's own class (`cls`, or the one under a class made here), named
    `prefix` + that class's name, with `_para_attn_base` and `attrs` as class attributes."""
    base = getattr(cls, "_para_attn_base", cls)
    key = (mixin, base, tuple(sorted(attrs.items())))
    if key not in _classes:
        _classes[key] = type(f"{prefix}{base.__name__}", (mixin, base),
                             {"_para_attn_base": base, "__module__": mixin.__module__, **attrs})
    return _classes[key]
