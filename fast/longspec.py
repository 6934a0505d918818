"""LongSpec-compatible ``LlamaGlide`` / ``Qwen2Glide`` on the fast path.

LongSpec's classes (:class:`specdec.shared.longspec.GlideModel`: LongSpec's argument names, defaults and
tuples) with the fast decoders plugged in: ``from specdec.fast import LlamaGlide`` is the only change from the
reference, and greedy outputs are token-identical.
"""

from __future__ import annotations

from types import SimpleNamespace

from specdec.fast import glide as _glide
from specdec.fast import magicdec as _magicdec
from specdec.fast import model as _model
from specdec.fast import vanilla as _vanilla
from specdec.shared.longspec import GlideModel

__all__ = ["LlamaGlide", "Qwen2Glide"]

_FAST = SimpleNamespace(
    load_model=_model.load_model, load_glide=_glide.load_glide,
    tree_spec_generate=_glide.tree_spec_generate, spec_generate=_glide.spec_generate,
    magicdec_generate=_magicdec.magicdec_generate, vanilla_generate=_vanilla.vanilla_generate,
    tensor_parallel=True,   # load_model(tp=): the draft follows the target's split (load_glide)
)


class LlamaGlide(GlideModel):
    """``LlamaGlide(config, target_model_path, glide_path)``: a Llama-family target + its GLIDE draft, fast path."""

    model_type = "llama"
    backend = _FAST


class Qwen2Glide(GlideModel):
    """``Qwen2Glide(config, target_model_path, glide_path)``: a Qwen2-family target + its GLIDE draft, fast path."""

    model_type = "qwen2"
    backend = _FAST
