"""`python -m reallm.formats`: the registered stored formats, one per line, each followed by its own options
(`CompressionConfig.options`: names and defaults, and the class whose docstring describes them)."""

from dataclasses import MISSING, fields

from reallm.formats import get_codec, names

for _name in names():
    _c = get_codec(_name)
    _stages = "whole matrix"
    if _c.blockwise:
        _stages = "rotation/permutation/blocks" + (" + absmax scales" if _c.absmax_scales else "")
    print(f"{_name:12s} {_c.summary}  [{_stages}; stores {', '.join(sorted(set(_c.bit_items.values())))}]")
    _opts = _c.options
    _shown = ", ".join(
        f"{f.name}={(f.default_factory() if f.default_factory is not MISSING else f.default)!r}" for f in fields(_opts))
    if _shown:
        print(f"{'':12s} options ({_opts.__module__}.{_opts.__name__}, version {_opts.version}): {_shown}")
    else:
        print(f"{'':12s} options: none")
