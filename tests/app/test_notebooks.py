"""The reading notebooks (``notebooks/*.ipynb``): they run top to bottom, use only the public API,
are committed executed, and match their source in ``scripts/make_notebooks.py``.

Every notebook is executed with ``nbclient`` on a ``python3`` kernel that runs THIS interpreter
(a kernel spec written to a temporary ``JUPYTER_PATH``, so a ``python`` on PATH that is some other
interpreter cannot be picked up). Any cell error fails the test. matplotlib is required: when it is
missing the tests fail (install the ``plot`` extra), they do not skip.

"Public API" = the names ``specdec.ref`` and ``specdec.fast`` export (their ``__init__`` imports),
and the ``__all__`` names of the ``specdec.shared.*`` modules and of the app modules
(``specdec.cli``, ``specdec.bench``, ``specdec.report``, ``specdec.methods``); nothing starting with ``_``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<layer>/ -> the repository
NB_DIR = os.path.join(ROOT, "notebooks")
APP_MODULES = ("cli", "bench", "report", "methods")  # specdec.<name>: the app layer over ref / fast
NAMES = ["01_tree_attention", "02_lossless_sampling", "03_glide_tree_round", "04_logitspec", "05_results"]
CELL_TIMEOUT_S = 600


def _read(name: str):
    import nbformat

    return nbformat.read(os.path.join(NB_DIR, name + ".ipynb"), as_version=4)


def _code(cell_source: str) -> str:
    """Cell source without IPython magics / shell lines (so it parses as Python)."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell_source.splitlines())


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _init_exports(pkg: str) -> set[str]:
    """Names a package's ``__init__`` imports explicitly (``from x import a, b``), public ones only."""
    mod = importlib.import_module(pkg)
    with open(mod.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return {n for n in names if not n.startswith("_")}


def _public_names(module: str) -> set[str] | None:
    """The public names of a specdec module, or None if the module itself is not public API."""
    if module in ("specdec.ref", "specdec.fast"):
        return _init_exports(module)
    if module == "specdec":
        return {"ref", "fast", "shared", "__version__"}
    if module == "specdec.shared":
        return set()
    parts = module.split(".")
    if (len(parts) == 3 and parts[:2] == ["specdec", "shared"] and not parts[2].startswith("_")) or (
            len(parts) == 2 and parts[0] == "specdec" and parts[1] in APP_MODULES):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return None
        return set(getattr(mod, "__all__", ()))
    return None  # e.g. specdec.ref.glide, specdec.fast.kernels: internals, reach them through the package


def public_api_violations(source: str) -> list[str]:
    """Uses of specdec that are not public API in one code cell."""
    tree = ast.parse(_code(source))
    bad: list[str] = []
    aliases: dict[str, str] = {}  # local name -> specdec module it refers to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "specdec" or a.name.startswith("specdec."):
                    if _public_names(a.name) is None:
                        bad.append(f"import {a.name}")
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "specdec"
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "specdec" or node.module.startswith("specdec.")):
            public = _public_names(node.module)
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if public is None:
                    bad.append(f"from {node.module} import {a.name} (module is not public API)")
                elif a.name not in public and _public_names(sub) is None:
                    bad.append(f"from {node.module} import {a.name} (not exported)")
                elif _public_names(sub) is not None:
                    aliases[a.asname or a.name] = sub
    # attribute access on specdec modules: ref.X, fast.X, specdec.X must be exported names
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            public = _public_names(module) or set()
            if node.attr not in public and _public_names(f"{module}.{node.attr}") is None:
                bad.append(f"{node.value.id}.{node.attr} ({module} does not export {node.attr!r})")
    # anything private, however reached
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                bad.append(f"private attribute {node.attr}")
    return bad


def test_public_api_checker_catches_private_use():
    assert public_api_violations("from specdec.ref import tree_attention\nfrom specdec.shared.tree import Tree") == []
    assert public_api_violations("from specdec import ref\nref.load_model('default')") == []
    assert public_api_violations("%matplotlib inline\nimport specdec\nprint(specdec.__version__)") == []
    assert public_api_violations("from specdec.shared.acceptance import _residual")
    assert public_api_violations("from specdec.ref.glide import GlideDrafter")  # a submodule, not the package's exports
    assert public_api_violations("from specdec.ref.model import new_cache")
    assert public_api_violations("from specdec import ref\nref.glide.GlideDrafter")
    assert public_api_violations("from specdec import ref\nref._sync(None)")
    assert public_api_violations("import specdec.fast.kernels")
    assert public_api_violations("from specdec.shared import tree\ntree._private")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_uses_only_public_api(name):
    nb = _read(name)
    bad = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            bad += [f"cell {i}: {b}" for b in public_api_violations(cell.source)]
    assert not bad, f"{name} uses non-public specdec API:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# Committed with outputs, in sync with the builder script
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_notebook_committed_executed(name):
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    not_run = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not not_run, f"{name}: code cells {not_run} were never executed; run scripts/make_notebooks.py"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name} was committed with an error output: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert images >= 1, f"{name} has no plot in its outputs"


def test_notebooks_match_builder_script():
    spec = importlib.util.spec_from_file_location("make_notebooks", os.path.join(ROOT, "scripts", "make_notebooks.py"))
    mk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mk)
    assert list(mk.NOTEBOOKS) == NAMES
    stale = []
    for name in NAMES:
        want = [(c.cell_type, c.source) for c in mk.build(name).cells]
        have = [(c.cell_type, c.source) for c in _read(name).cells]
        if want != have:
            stale.append(name)
    assert not stale, f"notebooks differ from scripts/make_notebooks.py: {stale}; rebuild with `python scripts/make_notebooks.py`"


# ---------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------


def test_plot_dependency_installed():
    """The notebooks draw with matplotlib: a missing package is an installation error, not a skip."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.fail("matplotlib is not installed: the notebooks need it (pip install -e '.[dev,plot]')")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A ``python3`` kernel spec that runs this interpreter, first on JUPYTER_PATH while the tests run."""
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError as e:
        pytest.fail(f"executing the notebooks needs nbclient, nbformat and ipykernel (the dev extra): {e}")
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (specdec tests)",
        "language": "python",
    }))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, kernel_env):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = _read(name)
    for cell in nb.cells:  # run from a clean slate
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": NB_DIR}},
                            record_timing=False)
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{name}.ipynb failed:\n{e}")
    print(f"{name}: executed in {time.perf_counter() - t0:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
