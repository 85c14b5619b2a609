"""The table of stored formats: `CompressionConfig.quantizer` name → codec instance.

In the manner of torchao's config-to-handler table. Each format folder's `codec.py` decorates its `Codec`
subclass with `@register`; `reallm.formats` (the package) imports every format folder, so that code which
looks a format up imports `reallm.formats`, never this module directly.
"""

from __future__ import annotations

from reallm.formats.base import PIPELINE_BIT_ITEMS, Codec

__all__ = ["get_codec", "names", "register"]

_REGISTRY: dict[str, Codec] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make a format available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"two formats are named {cls.name!r}: {type(_REGISTRY[cls.name]).__name__} and {cls.__name__}")
    clash = set(cls.bit_items) & set(PIPELINE_BIT_ITEMS)
    if clash:
        raise ValueError(f"format {cls.name!r} stores tensors named like the pipeline's: {sorted(clash)}")
    _REGISTRY[cls.name] = cls()
    return cls


def get_codec(name: str) -> Codec:
    """The codec of a `quantizer` name (ValueError naming the known ones otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"quantizer must be one of {names()}, got {name!r}") from None


def names() -> tuple[str, ...]:
    """Every registered format, in registration order (built-in ones first)."""
    return tuple(_REGISTRY)
