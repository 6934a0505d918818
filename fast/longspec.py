"""LongSpec-compatible ``LlamaGlide`` / ``Qwen2Glide`` on the fast path.

The classes of :mod:`specdec.ref.longspec` (seed 000's argument names, defaults and tuples) with the
fast decoders plugged in: ``from specdec.fast import LlamaGlide`` is the only change from the
reference, and greedy outputs are token-identical.
"""

from __future__ import annotations

from types import SimpleNamespace

from specdec.fast import glide as _glide
from specdec.fast import magicdec as _magicdec
from specdec.fast import model as _model
from specdec.fast import vanilla as _vanilla
from specdec.ref import longspec as _ref

__all__ = ["LlamaGlide", "Qwen2Glide"]

_FAST = SimpleNamespace(
    load_model=_model.load_model, load_glide=_glide.load_glide,
    tree_spec_generate=_glide.tree_spec_generate, spec_generate=_glide.spec_generate,
    magicdec_generate=_magicdec.magicdec_generate, vanilla_generate=_vanilla.vanilla_generate,
)


class LlamaGlide(_ref.LlamaGlide):
    """``LlamaGlide(config, target_model_path, glide_path)`` running the fast path."""

    backend = _FAST


class Qwen2Glide(_ref.Qwen2Glide):
    """``Qwen2Glide(config, target_model_path, glide_path)`` running the fast path."""

    backend = _FAST
