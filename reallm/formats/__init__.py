"""The stored formats of the frozen part, one folder each (`python -m reallm.formats` lists them).

A format folder holds its codec (`codec.py`: a `reallm.formats.base.Codec` subclass decorated with
`@register`), the algorithm behind it and its own options. Importing this package imports every format
folder, so a new folder is all a new format needs (docs/dev/adding-a-format.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from reallm.formats.base import PIPELINE_BIT_ITEMS, PIPELINE_TRAINABLE, Codec, Encoded
from reallm.formats.registry import get_codec, names, register

__all__ = ["Codec", "Encoded", "PIPELINE_BIT_ITEMS", "PIPELINE_TRAINABLE", "get_codec", "names", "register"]

# built-in formats first, in a fixed order (it is the order --help lists them in), then any other format
# folder of the package
BUILT_IN = ("none", "nf", "rtn", "vq", "autoencoder")
for _folder in (*BUILT_IN, *sorted(i.name for i in pkgutil.iter_modules(__path__) if i.ispkg)):
    importlib.import_module(f"{__name__}.{_folder}.codec")
