"""The environment `make setup` installs from constraints.txt is consistent: no installed package asks
for an extra its dependency does not provide (pip prints "WARNING: mbstrdecoder 1.1.5 does not provide
the extra 'all'" at every set-up otherwise)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()  # no comment, no environment marker
        if line:
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version
    return pins


def test_installed_packages_ask_only_for_extras_that_exist():
    installed = {_canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    differ = sorted(n for n, v in _pins().items()
                    if n in installed and installed[n].version.split("+")[0] != v.split("+")[0])
    if differ:
        pytest.skip(f"this environment was not installed from constraints.txt ({', '.join(differ[:4])} differ): "
                    f"`make setup` installs it")
    problems = []
    for name, dist in sorted(installed.items()):
        for line in dist.requires or []:
            req = Requirement(line)
            if not req.extras or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
                continue  # no extra asked for, or only under an extra of the asking package
            target = installed.get(_canonical(req.name))
            if target is None:
                continue
            provided = {_canonical(e) for e in target.metadata.get_all("Provides-Extra") or []}
            missing = sorted(_canonical(e) for e in req.extras if _canonical(e) not in provided)
            if missing:
                problems.append(f"{name} {dist.version} asks for {req.name}[{','.join(missing)}], which "
                                f"{target.metadata['Name']} {target.version} does not provide")
    assert not problems, problems
