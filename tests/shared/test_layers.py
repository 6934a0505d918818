"""The layering (docs/design.md §2): shared <- (ref || fast) <- app, checked on the source's imports.

A ref-vs-fast difference must always mean something, so neither path may import the other; the ground
floor imports neither path nor the app; and the fast engine dispatches on its declared drafter protocol
(``FastDrafter``), never by probing a drafter's attributes.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
while not os.path.isfile(os.path.join(ROOT, "pyproject.toml")):  # tests may sit one folder deeper
    ROOT = os.path.dirname(ROOT)

APP = ("specdec.cli", "specdec.bench", "specdec.report", "specdec.methods", "specdec.benchutil")
FORBIDDEN = {
    "shared": ("specdec.ref", "specdec.fast") + APP,
    "ref": ("specdec.fast",) + APP,
    "fast": ("specdec.ref",) + APP,
}


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a file, relative imports resolved to the package."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0:
                found.append((node.lineno, mod))
                if mod == "specdec":  # `from specdec import ref`
                    found += [(node.lineno, f"specdec.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            found.append((node.lineno, "importlib.import_module(...)"))
    return found


def _py_files(folder: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    return sorted(out)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_against_the_layers(layer):
    files = _py_files(layer)
    assert files, f"no sources found under {layer}/"
    bad = []
    for path in files:
        for line, mod in _imports(path):
            if mod.startswith("importlib.import_module") or any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_fast_engine_does_not_probe_drafters():
    path = os.path.join(ROOT, "fast", "engine.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    probes = [node.lineno for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")]
    assert not probes, f"fast/engine.py probes attributes at lines {probes}"


def test_the_checks_can_fail(tmp_path):
    """The import scan sees all import forms the rules forbid."""
    src = tmp_path / "x.py"
    src.write_text("import specdec.ref.model\nfrom specdec import fast\nfrom specdec.cli import main\n"
                   "import importlib\nimportlib.import_module('specdec.ref')\n")
    mods = [m for _, m in _imports(str(src))]
    assert "specdec.ref.model" in mods and "specdec.fast" in mods and "specdec.cli" in mods
    assert "importlib.import_module(...)" in mods
