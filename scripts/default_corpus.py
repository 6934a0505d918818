"""The corpus of the embedded default model: the Python standard library's own ``.py`` source.

Which files (``list_corpus``)
    Every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` of the running interpreter, except
    ``site-packages/``, ``dist-packages/``, ``pydoc_data/`` (one huge string literal), files larger
    than 400 kB (generated tables), and files that are not valid UTF-8. ``test/``, ``idlelib/`` and
    ``lib2to3/`` ARE used for training (they are code too, and the corpus is small), never for
    evaluation.

The held-out split (``is_heldout``) -- robust across Python versions
    A file is held out iff it is NOT under ``test/``, ``tests/``, ``idlelib/``, ``lib2to3/`` (or any
    directory named ``test``/``tests``) and ``sha256(relative posix path)`` read as an integer is
    ``0 mod 16`` (about 6% of the library files). The rule only looks at the path relative to the
    stdlib root, so a file such as ``json/decoder.py`` is held out on every Python version that
    has it; files added or removed between versions never move other files across the split.

Token streams (``pack``)
    Each file becomes ``<s>`` + tokens + ``</s>``; files are concatenated in sorted path order into
    one training stream and one held-out stream (int16 tensors, saved with ``torch.save``).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig

__all__ = ["stdlib_root", "list_corpus", "is_heldout", "split_corpus", "read_text", "HELDOUT_MODULUS"]

HELDOUT_MODULUS = 16
MAX_FILE_BYTES = 400_000
_SKIP_TOP = {"site-packages", "dist-packages", "pydoc_data", "__pycache__"}
_NEVER_HELDOUT = {"test", "tests", "idlelib", "lib2to3"}


def stdlib_root() -> str:
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


if __name__ == "__main__":
    tr, he = split_corpus()
    print(f"stdlib: {stdlib_root()}  train files: {len(tr)}  held-out files: {len(he)}")
    for r in he:
        print("  held-out:", r)
