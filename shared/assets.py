"""Models shipped inside the package (``load_model("default")``)."""

from __future__ import annotations

import os

__all__ = ["ASSETS_DIR", "EMBEDDED_MODELS", "resolve_model_path"]

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# name -> sub-directory of ASSETS_DIR
EMBEDDED_MODELS = {
    "default": "default/target",
    "default-glide": "default/glide",
    "default-draft": "default/draft",
}


def resolve_model_path(path: str | os.PathLike) -> str:
    """Map an embedded model name to its directory; pass any other path through."""
    p = os.fspath(path)
    if p in EMBEDDED_MODELS:
        full = os.path.join(ASSETS_DIR, EMBEDDED_MODELS[p])
        if not os.path.isdir(full):
            raise ValueError(f"the embedded model {p!r} is not present in this installation (looked in {full})")
        return full
    return p
