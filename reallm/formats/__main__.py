"""`python -m reallm.formats`: the registered stored formats, one per line."""

from reallm.formats import get_codec, names

for _name in names():
    _c = get_codec(_name)
    _stages = "whole matrix"
    if _c.blockwise:
        _stages = "rotation/permutation/blocks" + (" + absmax scales" if _c.absmax_scales else "")
    print(f"{_name:12s} {_c.summary}  [{_stages}; stores {', '.join(sorted(set(_c.bit_items.values())))}]")
