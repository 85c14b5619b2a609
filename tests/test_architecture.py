"""Nothing imports upward: every import of every module of the package (top-level and function-level, read
with `ast`) goes to its own layer or a lower one (docs/architecture.md, "Import direction"), and no private
name (a leading underscore) is imported from another module.

Imports under `if TYPE_CHECKING:` are annotations only (never executed) and are not counted; the one there
is codecs/base.py's CompressionConfig, which the config module itself builds from the codec registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reallm"

# Lowest first. A module may import from its own layer and from the layers below; a module belongs to the
# layer of the longest name below that is the module or a package holding it ("reallm" is the package's
# own __init__ only: the public API, at the top).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("reallm.errors", "reallm.files", "reallm.hf")),
    ("tensor functions", ("reallm.quant", "reallm.storage")),
    ("networks", ("reallm.nn",)),
    ("stored formats", ("reallm.codecs",)),
    ("config", ("reallm.config",)),
    ("container", ("reallm.container",)),
    ("fused kernels", ("reallm.kernels",)),
    ("compressed linear", ("reallm.nn.dora",)),
    ("model", ("reallm.surgery", "reallm.checkpoint", "reallm.bits", "reallm.store", "reallm.hf_format",
               "reallm.hf_quantizer", "reallm.hf_registration", "reallm.hub")),
    ("training", ("reallm.training", "reallm.adaptive", "reallm.candidates")),
    ("evaluation", ("reallm.evaluation",)),
    ("datamodules", ("reallm.datamodules",)),
    ("modules", ("reallm.modules", "reallm.strategies")),
    ("run tooling", ("reallm.plots", "reallm.tracking")),
    ("callbacks", ("reallm.callbacks",)),
    ("entry points", ("reallm", "reallm.cli", "reallm.report", "reallm.sweep", "reallm.zeroshot")),
]
LEVEL = {prefix: i for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The layer index of a module of the package (KeyError: it belongs to no layer)."""
    owners = [p for p in LEVEL if module == p or (p != "reallm" and module.startswith(p + "."))]
    if not owners:
        raise KeyError(f"{module} belongs to no layer of LAYERS (add it there and to docs/architecture.md)")
    return LEVEL[max(owners, key=len)]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip |= {id(n) for n in ast.walk(stmt)}
    return skip


def imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import of the project in a file, at any depth.
    `from a import b` where a.b is a module of the package counts as an import of a.b."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "reallm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "reallm":
                continue
            plain = []
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    out.append((node.lineno, f"{base}.{a.name}", []))
                else:
                    plain.append(a.name)
            if plain:
                out.append((node.lineno, base, plain))
    return sorted(out)


def test_every_module_has_a_layer():
    assert len(MODULES) > 50
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_higher_layer(module):
    mine = layer_of(module)
    upward = []
    for line, target, _ in imports(MODULES[module], module):
        if target in MODULES and layer_of(target) > mine:
            upward.append(f"{_rel(MODULES[module])}:{line} imports {target} "
                          f"({LAYERS[layer_of(target)][0]}, above {LAYERS[mine][0]})")
    assert not upward, "\n".join(upward)


def _private_uses(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    aliases: dict[str, str] = {}  # local name → project module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "reallm":
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "reallm":
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif a.name.startswith("_") and node.module != module:
                    found.append(f"{_rel(path)}:{node.lineno} imports {a.name} from {node.module}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{_rel(path)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(found)


SOURCES = {**MODULES, "train": ROOT / "train.py",
           **{f"benchmarks.{p.stem}": p for p in sorted((ROOT / "benchmarks").glob("*.py"))}}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_no_private_name_crosses_a_module(source):
    found = _private_uses(SOURCES[source], source)
    assert not found, "\n".join(found)


def test_the_check_sees_upward_function_level_and_private_imports(tmp_path):
    """The checks themselves, on a file written for it: a function-level import of a higher layer is
    found, a TYPE_CHECKING one is not, and a private name is found both imported and through a module alias."""
    src = tmp_path / "probe.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "if TYPE_CHECKING:\n    from reallm.cli import ReALLMCLI\n"
                   "def f():\n    from reallm.modules import CompressPhase\n    from reallm import storage\n"
                   "from reallm.quant.packing import code_group, _CHUNK_CODES\n"
                   "from reallm.training import autoencoder as ae\nx = ae._k('a.b')\n")
    found = imports(src, "reallm.probe")
    assert [(line, target) for line, target, _ in found] == [
        (5, "reallm.modules"), (6, "reallm.storage"), (7, "reallm.quant.packing"), (8, "reallm.training.autoencoder")]
    assert _private_uses(src, "reallm.probe") == [f"{src}:7 imports _CHUNK_CODES from reallm.quant.packing",
                                                  f"{src}:9 uses reallm.training.autoencoder._k"]
    assert layer_of("reallm.nn.dora") > layer_of("reallm.container") > layer_of("reallm.nn.patches")
