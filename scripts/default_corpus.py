"""The corpus of the embedded default model: Python source from two sources, ``stdlib`` and ``packages``.

Source ``stdlib`` (``list_corpus``, ``split_corpus``)
    Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` of the running interpreter (or a
    given root, e.g. a copy of another interpreter's library made by ``export_stdlib``), except
    ``site-packages/``, ``dist-packages/``, ``pydoc_data/`` (one huge string literal), files larger
    than 400 kB (generated tables), and files that are not valid UTF-8. ``test/``, ``idlelib/`` and
    ``lib2to3/`` ARE used for training (they are code too), never for evaluation.

    Held out (``is_heldout``): a file NOT under ``test/``, ``tests/``, ``idlelib/``, ``lib2to3/`` (or
    any directory named ``test``/``tests``) whose ``sha256(relative posix path)`` read as an integer
    is ``0 mod 16`` (about 6% of the library files). The rule looks only at the path relative to the
    stdlib root, so ``json/decoder.py`` is held out on every Python version that has it; files added
    or removed between versions never move other files across the split.

Source ``packages`` (``installed_distributions``, ``select_packages``)
    The ``.py`` files that the installed distributions of the running interpreter record (their
    ``RECORD``/file lists, via ``importlib.metadata``), each distribution listed once (the first on
    ``sys.path``) by its normalized name and version; this project (``specdec``) is left out.
    ``select_packages`` takes any iterable of ``Distribution(name, version, root, files)``, so the
    rules below can be applied to synthetic distributions too. A file is used when it

    * lies inside its distribution's root (no ``..``), is at most 400 kB and valid UTF-8, and does
      not look generated (``looks_generated``: a "generated"/"do not edit" marker in its first
      lines, or a line longer than 1000 characters -- tables, minified data);
    * is not a copy of a held-out stdlib file: neither the same content, nor a path that ends with a
      held-out stdlib path once leading underscores are stripped from the directory names
      (``setuptools/_distutils/command/register.py`` ends with ``distutils/command/register.py``);
    * is not an exact duplicate (sha256 of the bytes) of a file met earlier: every stdlib corpus
      file comes first, then the packages in sorted (normalized name, path) order, except that a
      held-out copy wins over training copies so held-out files never vanish because of what else
      is installed (vendored copies such as ``pip/_vendor/...`` and the same file shipped by two
      distributions are so kept once).

    Held out (``is_package_heldout``): ``sha256("<normalized name>/<path relative to the
    distribution's root>") % 16 == 0``, except files under a ``test``/``tests`` directory or a
    vendoring directory (``_vendor``, ``vendored``, ``extern``, ``third_party``, ...), which always
    train. The key holds no version, so a file is held out on every version that ships it, whatever
    else is installed. Two guards keep the held-out slice honest: a held-out file whose path ends
    with a stdlib corpus path of two or more parts (a backport) trains instead, and a training file
    whose path ends with a held-out file's path (an older vendored copy of it) is dropped. Near
    copies under other names (e.g. ``transformers``' "Copied from" model files) are not detected,
    so the packages held-out loss is a little optimistic; the stdlib held-out set is the clean one.

    ``packages_manifest`` records the interpreter version and, per distribution, its name, version,
    the files and bytes used, the held-out count and why the other files were skipped.

Token streams (``scripts/train_default.py pack``)
    Each file becomes ``<s>`` + tokens + ``</s>``; files are concatenated in order (stdlib sorted by
    path, then packages sorted by distribution and path) into a training stream, a held-out stream
    and one held-out stream per source (int16 tensors, saved with ``torch.save``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import sysconfig
from typing import Iterable, NamedTuple

__all__ = ["stdlib_root", "list_corpus", "is_heldout", "split_corpus", "read_text", "HELDOUT_MODULUS",
           "SOURCES", "parse_sources", "Distribution", "PackageFile", "PackageCorpus", "normalize_name",
           "installed_distributions", "is_package_heldout", "looks_generated", "select_packages",
           "packages_manifest", "export_stdlib"]

HELDOUT_MODULUS = 16
MAX_FILE_BYTES = 400_000
_SKIP_TOP = {"site-packages", "dist-packages", "pydoc_data", "__pycache__"}
_NEVER_HELDOUT = {"test", "tests", "idlelib", "lib2to3"}


def stdlib_root() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def read_text(path: str) -> str | None:
    """The file's text, or None when it is not valid UTF-8."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def is_heldout(rel: str) -> bool:
    """The held-out rule on a path relative to the stdlib root ('/' or os.sep separated)."""
    parts = rel.replace(os.sep, "/").split("/")
    if any(p in _NEVER_HELDOUT for p in parts[:-1]):
        return False
    h = int(hashlib.sha256("/".join(parts).encode("utf-8")).hexdigest(), 16)
    return h % HELDOUT_MODULUS == 0


def list_corpus(root: str | None = None) -> list[str]:
    """Sorted relative posix paths of every corpus file under ``root`` (default: this interpreter's stdlib)."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        if parts and parts[0] in _SKIP_TOP or "__pycache__" in parts:
            dirnames[:] = []
            continue
        for fn in filenames:
            if not fn.endswith(".py"):
                continue
            full = os.path.join(dirpath, fn)
            try:
                if os.path.getsize(full) > MAX_FILE_BYTES or os.path.islink(full) and not os.path.exists(full):
                    continue
            except OSError:
                continue
            out.append("/".join(parts + [fn]))
    return sorted(out)


def split_corpus(root: str | None = None) -> tuple[list[str], list[str]]:
    """(train, heldout) relative paths, each sorted; files that are not UTF-8 are dropped."""
    root = root or stdlib_root()
    train, held = [], []
    for rel in list_corpus(root):
        if read_text(os.path.join(root, rel)) is None:
            continue
        (held if is_heldout(rel) else train).append(rel)
    return train, held


# ---------------------------------------------------------------------------------------------
# Source "packages": the installed distributions' own .py files
# ---------------------------------------------------------------------------------------------

SOURCES = ("stdlib", "packages")
MAX_LINE_CHARS = 1000
_PKG_NEVER_HELDOUT = {"test", "tests"}
_VENDOR_DIRS = {"_vendor", "vendor", "_vendored", "vendored", "extern", "_extern", "third_party", "_third_party"}
_GENERATED_MARKERS = ("do not edit", "generated by", "autogenerated", "auto-generated", "@generated", "automatically generated")
EXCLUDED_DISTRIBUTIONS = frozenset({"specdec"})


def parse_sources(spec: str | Iterable[str]) -> list[str]:
    """``"stdlib,packages"`` (or a list) -> the sources in canonical order; ValueError names the flag."""
    items = [x.strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if x.strip()]
    bad = [x for x in items if x not in SOURCES]
    if bad or not items:
        raise ValueError(f"--sources: got {spec!r}; expected a comma-separated subset of {', '.join(SOURCES)}")
    return [x for x in SOURCES if x in items]


class Distribution(NamedTuple):
    """One installed distribution: its name and version as its metadata gives them, the directory its
    recorded paths are relative to (``root``), and those paths (posix, any file type). Any
    ``(name, version, root, files)`` tuple will do."""

    name: str
    version: str
    root: str
    files: tuple[str, ...]


class PackageFile(NamedTuple):
    """A selected file of the packages corpus."""

    dist: str  # normalized distribution name
    rel: str  # posix path relative to the distribution's root
    path: str  # where to read it
    nbytes: int
    sha256: str
    heldout: bool

    @property
    def key(self) -> str:
        return f"{self.dist}/{self.rel}"


class PackageCorpus(NamedTuple):
    """``select_packages``' answer: the files used (train and held-out, each in corpus order), the
    distributions considered (normalized name, version), and per distribution the count of skipped
    files by reason."""

    train: list[PackageFile]
    heldout: list[PackageFile]
    distributions: list[tuple[str, str]]
    skipped: dict[str, dict[str, int]]


def normalize_name(name: str) -> str:
    """A distribution name as PEP 503 normalizes it (``PyYAML`` -> ``pyyaml``, ``a_b.c`` -> ``a-b-c``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions(path: list[str] | None = None) -> list[Distribution]:
    """The distributions on ``path`` (default ``sys.path``), each normalized name once (the first
    found, as import would), sorted by normalized name. A distribution without a file list has
    ``files == ()``."""
    import importlib.metadata as md

    seen: dict[str, Distribution] = {}
    for d in md.distributions(path=path if path is not None else sys.path):
        name = d.metadata["Name"] if d.metadata is not None else None
        if not name or normalize_name(name) in seen:
            continue
        try:
            files = tuple(str(f).replace(os.sep, "/") for f in (d.files or ()))
        except Exception:  # a broken RECORD: treat as no file list
            files = ()
        root = os.path.abspath(str(d.locate_file("")))
        seen[normalize_name(name)] = Distribution(name, d.version or "", root, files)
    return [seen[k] for k in sorted(seen)]


def _parts(rel: str) -> list[str]:
    return rel.replace(os.sep, "/").split("/")


def is_package_heldout(dist_name: str, rel: str) -> bool:
    """The packages held-out rule: ``sha256("<normalized name>/<rel>") % 16 == 0``, never under a
    ``test``/``tests`` or vendoring directory. Depends on nothing but the name and the path."""
    parts = _parts(rel)
    if any(p in _PKG_NEVER_HELDOUT or p in _VENDOR_DIRS for p in parts[:-1]):
        return False
    h = int(hashlib.sha256(f"{normalize_name(dist_name)}/{'/'.join(parts)}".encode("utf-8")).hexdigest(), 16)
    return h % HELDOUT_MODULUS == 0


def looks_generated(text: str) -> bool:
    """A generated or data-like file: a generation marker in its first 10 lines, or a line longer
    than ``MAX_LINE_CHARS`` characters."""
    head = "\n".join(text.splitlines()[:10]).lower()
    if any(m in head for m in _GENERATED_MARKERS):
        return True
    return any(len(line) > MAX_LINE_CHARS for line in text.splitlines())


def _norm_tuple(rel: str) -> tuple[str, ...]:
    """Path parts with leading underscores stripped from directory names (``_distutils`` -> ``distutils``)."""
    parts = _parts(rel)
    return tuple(p.lstrip("_") or p for p in parts[:-1]) + (parts[-1],)


def _ends_with_any(parts: tuple[str, ...], tails: set[tuple[str, ...]], min_len: int = 1) -> bool:
    return any(parts[-n:] in tails for n in range(min_len, len(parts) + 1))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def select_packages(dists: Iterable[Distribution] | None = None, stdlib: str | None = None,
                    exclude: Iterable[str] = EXCLUDED_DISTRIBUTIONS) -> PackageCorpus:
    """The packages corpus (module docstring: every rule) of ``dists`` (default: this interpreter's
    ``installed_distributions()``), checked against the stdlib corpus under ``stdlib`` (default: this
    interpreter's). Deterministic: the answer depends only on the distributions' names, paths and
    contents and on the stdlib files, not on the order ``dists`` come in."""
    stdlib = stdlib or stdlib_root()
    excluded = {normalize_name(e) for e in exclude}
    # 1. The stdlib corpus: every file's hash (first in the dedup order), its held-out paths and contents.
    seen: set[str] = set()
    std_held_hashes: set[str] = set()
    std_held_tails: set[tuple[str, ...]] = set()
    std_tails: set[tuple[str, ...]] = set()
    for rel in list_corpus(stdlib):
        try:
            with open(os.path.join(stdlib, rel), "rb") as f:
                data = f.read()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        seen.add(_sha(data))
        if len(_parts(rel)) >= 2:
            std_tails.add(_norm_tuple(rel))
        if is_heldout(rel):
            std_held_hashes.add(_sha(data))
            std_held_tails.add(_norm_tuple(rel))
    # 2. Candidates in (normalized name, path) order, with the per-file rules.
    uniq: dict[str, Distribution] = {}
    for d in dists if dists is not None else installed_distributions():
        d = Distribution(*d)
        uniq.setdefault(normalize_name(d.name), d)
    cands: list[PackageFile] = []
    skipped: dict[str, dict[str, int]] = {}
    names: list[tuple[str, str]] = []
    for norm in sorted(uniq):
        d = uniq[norm]
        if norm in excluded:
            continue
        names.append((norm, d.version))
        skip = skipped.setdefault(norm, {})

        def drop(reason: str) -> None:
            skip[reason] = skip.get(reason, 0) + 1

        if not d.files:
            drop("no_file_list")
        for rel in sorted(set(f.replace(os.sep, "/") for f in d.files)):
            if not rel.endswith(".py"):
                continue
            parts = _parts(rel)
            if rel.startswith("/") or ".." in parts or "__pycache__" in parts or parts[-1].startswith("__editable__"):
                drop("outside_root")
                continue
            full = os.path.join(d.root, *parts)
            try:
                if not os.path.isfile(full):
                    drop("missing")
                    continue
                if os.path.getsize(full) > MAX_FILE_BYTES:
                    drop("too_large")
                    continue
                with open(full, "rb") as f:
                    data = f.read()
            except OSError:
                drop("missing")
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                drop("not_utf8")
                continue
            if looks_generated(text):
                drop("generated")
                continue
            h = _sha(data)
            if h in std_held_hashes or _ends_with_any(_norm_tuple(rel), std_held_tails):
                drop("stdlib_heldout_copy")
                continue
            held = is_package_heldout(norm, rel)
            if held and _ends_with_any(_norm_tuple(rel), std_tails, min_len=2):
                held = False  # a backport of a stdlib training file: near-duplicate, so it trains
            cands.append(PackageFile(norm, rel, full, len(data), h, held))
    # 3. Exact duplicates: stdlib first, then held-out copies, then training copies, each in corpus order.
    keep: set[int] = set()
    for i in [i for i, c in enumerate(cands) if c.heldout] + [i for i, c in enumerate(cands) if not c.heldout]:
        if cands[i].sha256 in seen:
            skipped[cands[i].dist]["duplicate"] = skipped[cands[i].dist].get("duplicate", 0) + 1
            continue
        seen.add(cands[i].sha256)
        keep.add(i)
    kept = [c for i, c in enumerate(cands) if i in keep]
    # 4. A training file whose path ends with a held-out file's path is an (older) copy of it: dropped.
    held_tails = {_norm_tuple(c.rel) for c in kept if c.heldout}
    train: list[PackageFile] = []
    for c in kept:
        if not c.heldout and _ends_with_any(_norm_tuple(c.rel), held_tails):
            skipped[c.dist]["heldout_copy"] = skipped[c.dist].get("heldout_copy", 0) + 1
            continue
        if not c.heldout:
            train.append(c)
    heldout = [c for c in kept if c.heldout]
    return PackageCorpus(train, heldout, names, {k: v for k, v in skipped.items() if v})


def packages_manifest(corpus: PackageCorpus, stdlib: str | None = None) -> dict:
    """The record of a packages corpus (JSON-ready): interpreter, rules, and per distribution its name,
    version, files and bytes used, held-out files and bytes, and skipped files by reason."""
    per: dict[str, dict] = {n: {"name": n, "version": v, "files": 0, "bytes": 0, "heldout_files": 0, "heldout_bytes": 0}
                            for n, v in corpus.distributions}
    for c in corpus.train + corpus.heldout:
        rec = per[c.dist]
        rec["files"] += 1
        rec["bytes"] += c.nbytes
        if c.heldout:
            rec["heldout_files"] += 1
            rec["heldout_bytes"] += c.nbytes
    for n, sk in corpus.skipped.items():
        if n in per:
            per[n]["skipped"] = dict(sorted(sk.items()))
    dists = list(per.values())
    return {
        "python": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "stdlib_root": stdlib or stdlib_root(),
        "rules": {"heldout_modulus": HELDOUT_MODULUS, "max_file_bytes": MAX_FILE_BYTES, "max_line_chars": MAX_LINE_CHARS,
                  "heldout_key": "sha256('<normalized name>/<path>')", "excluded": sorted(EXCLUDED_DISTRIBUTIONS)},
        "totals": {"distributions": len(dists), "distributions_used": sum(1 for d in dists if d["files"]),
                   "files": sum(d["files"] for d in dists), "bytes": sum(d["bytes"] for d in dists),
                   "heldout_files": sum(d["heldout_files"] for d in dists), "heldout_bytes": sum(d["heldout_bytes"] for d in dists)},
        "distributions": dists,
        "heldout": [c.key for c in corpus.heldout],
    }


def export_stdlib(dest: str, root: str | None = None) -> int:
    """Copy this interpreter's stdlib corpus files (``list_corpus``) to ``dest`` with their relative
    paths, so another machine can pack the same stdlib source (``pack --stdlib-root dest``).
    Returns the number of files copied."""
    root = root or stdlib_root()
    n = 0
    for rel in list_corpus(root):
        out = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(os.path.join(root, rel), out)
        n += 1
    with open(os.path.join(dest, "PYTHON_VERSION"), "w") as f:
        f.write(sys.version.split()[0] + "\n")
    return n


def main(argv: list[str] | None = None) -> None:
    """``python scripts/default_corpus.py [stdlib|packages|export DEST]``: print a source's split
    (``packages`` prints the per-distribution manifest summary), or copy the stdlib corpus to DEST."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="The default model's corpus: list a source, or export the stdlib corpus.")
    p.add_argument("what", nargs="?", default="stdlib", choices=["stdlib", "packages", "export"])
    p.add_argument("dest", nargs="?", default=None, help="export: destination directory")
    p.add_argument("--stdlib-root", default=None)
    p.add_argument("--json", default=None, help="packages: also write the manifest here")
    a = p.parse_args(argv)
    if a.what == "stdlib":
        tr, he = split_corpus(a.stdlib_root)
        print(f"stdlib: {a.stdlib_root or stdlib_root()}  train files: {len(tr)}  held-out files: {len(he)}")
        for r in he:
            print("  held-out:", r)
    elif a.what == "export":
        if not a.dest:
            raise ValueError("export: give a destination directory")
        print(f"exported {export_stdlib(a.dest, a.stdlib_root)} files of {a.stdlib_root or stdlib_root()} to {a.dest}")
    else:
        man = packages_manifest(select_packages(stdlib=a.stdlib_root), a.stdlib_root)
        for d in man["distributions"]:
            if d["files"]:
                print(f"  {d['name']}=={d['version']}: {d['files']} files, {d['bytes'] / 1e6:.2f} MB, {d['heldout_files']} held out")
        t = man["totals"]
        print(f"packages (python {man['python']}): {t['distributions_used']}/{t['distributions']} distributions, {t['files']} files, "
              f"{t['bytes'] / 1e6:.2f} MB; held out {t['heldout_files']} files, {t['heldout_bytes'] / 1e6:.2f} MB")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(man, f, indent=1)


if __name__ == "__main__":
    main()
