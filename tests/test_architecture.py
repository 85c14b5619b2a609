"""Packages by role, imports in one direction, no import cycle (docs/architecture.md).

Every import of every module of the package (top-level and function-level, read with `ast`) goes to its own
package or a lower one; the module graph (all those imports, `if TYPE_CHECKING:` ones included) has no cycle;
no private name (a leading underscore) is imported from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reallm"

# Lowest first, one line per package. A module may import from its own package and from the packages below.
# "reallm" is the package's own __init__ only: the public API, at the top.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors, atomic I/O and digests, Hugging Face model helpers", ("reallm.core",)),
    ("pure tensor functions", ("reallm.ops",)),
    ("stored formats, one folder each", ("reallm.formats",)),
    ("compression config, encoding pipeline, container", ("reallm.weight",)),
    ("the compressed linear, DoRA, kernels, bit accounting", ("reallm.layer",)),
    ("checkpoints: format 2, format-1 reader, transformers quantizer, Hub", ("reallm.checkpoint",)),
    ("surgery (compress_), the bit budget: candidates and their exact choice", ("reallm.model",)),
    ("text sources, windows, datamodules", ("reallm.data",)),
    ("perplexity, zero-shot", ("reallm.eval",)),
    ("LightningModules beside their recipes", ("reallm.phases",)),
    ("CLI, tracking, callbacks, report, sweeps, plots", ("reallm.run",)),
    ("public API", ("reallm",)),
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


def imports(path: Path, module: str, type_checking: bool = True) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import of the project in a file, at any depth
    (`if TYPE_CHECKING:` ones too unless `type_checking` is False). `from a import b` where a.b is a module of
    the package counts as an import of a.b."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = set() if type_checking else _type_checking_nodes(tree)
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


def import_graph() -> dict[str, set[str]]:
    """module → the modules of the package it imports (every import, function-level and TYPE_CHECKING ones too)."""
    return {m: {t for _, t, _ in imports(path, m) if t in MODULES and t != m} for m, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# file names that several modules share because they do the same job in different places
SAME_JOB = {"__init__.py", "__main__.py", "base.py", "codec.py", "options.py"}  # base.py: a package's base class
# (codec, datamodule, phase); codec.py / options.py: one per format folder


def test_no_two_modules_share_a_file_name():
    by_name: dict[str, list[str]] = {}
    for path in MODULES.values():
        by_name.setdefault(path.name, []).append(str(_rel(path)))
    shared = {n: paths for n, paths in by_name.items() if len(paths) > 1 and n not in SAME_JOB}
    assert not shared, f"modules sharing a file name (name one by its job): {shared}"
    formats = PACKAGE / "formats"
    assert {p.parent.name for p in formats.rglob("codec.py")} == {p.name for p in formats.iterdir()
                                                                  if (p / "__init__.py").is_file()}


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" ↔ ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


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
                   "if TYPE_CHECKING:\n    from reallm.run.cli import ReALLMCLI\n"
                   "def f():\n    from reallm.phases import CompressPhase\n    from reallm.ops import precision\n"
                   "from reallm.ops.packing import code_group, _CHUNK_CODES\n"
                   "from reallm.formats.autoencoder import recipe as ae\nx = ae._k('a.b')\n")
    found = imports(src, "reallm.probe", type_checking=False)
    assert [(line, target) for line, target, _ in found] == [
        (5, "reallm.phases"), (6, "reallm.ops.precision"), (7, "reallm.ops.packing"),
        (8, "reallm.formats.autoencoder.recipe")]
    assert [t for _, t, _ in imports(src, "reallm.probe")][0] == "reallm.run.cli"  # seen by the cycle check
    assert _private_uses(src, "reallm.probe") == [f"{src}:7 imports _CHUNK_CODES from reallm.ops.packing",
                                                  f"{src}:9 uses reallm.formats.autoencoder.recipe._k"]
    assert layer_of("reallm.layer.linear") > layer_of("reallm.weight.pipeline") > layer_of("reallm.ops.patches")
