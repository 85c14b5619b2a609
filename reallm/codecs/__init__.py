"""Registry of the stored formats of the frozen part (`CompressionConfig.quantizer` → codec).

In the manner of torchao's config-to-handler table: each format is one module of this package that
defines a `reallm.codecs.base.Codec` subclass decorated with `@register`; importing the package
imports every module in it, so a new file is all a new format needs (see `base.py`).
"""

from __future__ import annotations

import importlib
import pkgutil

from reallm.codecs.base import PIPELINE_BIT_ITEMS, PIPELINE_TRAINABLE, Codec, Encoded

__all__ = ["Codec", "Encoded", "PIPELINE_BIT_ITEMS", "PIPELINE_TRAINABLE", "get_codec", "names", "register"]

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


# built-in formats first, in a fixed order (it is the order --help lists them in), then any other
# module of the package
for _mod in ("none", "nf", "rtn", "vq", "autoencoder"):
    importlib.import_module(f"{__name__}.{_mod}")
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
