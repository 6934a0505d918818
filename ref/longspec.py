"""LongSpec-compatible entry points: ``LlamaGlide`` / ``Qwen2Glide`` (LongSpec, sail-sg/LongSpec).

LongSpec's usage example runs with only its import line changed (and local paths)::

    from transformers import AutoConfig, AutoTokenizer
    from specdec.ref import LlamaGlide                     # was: from longspec.test.llama_glide import LlamaGlide

    config = AutoConfig.from_pretrained(target_dir)
    model = LlamaGlide(config, target_dir, glide_dir)
    output_ids, count, num, elapsed, mask = model.tree_spec_generate(
        input_ids=input_ids, prompt_length=input_ids.shape[1], tree_shape=[4, 16, 16, 16, 16],
        max_gen_len=1024, temperature=0.0)
    output_ids, count, num, elapsed, mask = model.spec_generate(input_ids=input_ids, prompt_length=..., gamma=4)
    output_ids, num_tokens, elapsed = model.vanilla_generate(input_ids, prompt_length=...)

The methods keep LongSpec's argument names and defaults (including ``eos_id=151645``, Qwen2's
``<|im_end|>``, for both classes) and return its tuples; underneath they are the reference
decoders :func:`specdec.ref.glide.tree_spec_generate`, :func:`specdec.ref.glide.spec_generate` and
:func:`specdec.ref.vanilla.vanilla_generate` -- so unlike the original, sampling (temperature > 0)
is lossless. ``prompt_length`` may be an int or a one-element tensor (LongSpec's scripts pass
``attention_mask.sum(-1)``); batch size 1.
"""

from __future__ import annotations

from types import SimpleNamespace

import specdec.ref.glide as _glide
import specdec.ref.magicdec as _magicdec
import specdec.ref.model as _model
import specdec.ref.vanilla as _vanilla
from specdec.shared.longspec import GlideModel

__all__ = ["LlamaGlide", "Qwen2Glide"]

# The reference decoders behind LongSpec's methods (the classes' shared surface: specdec.shared.longspec).
_REF = SimpleNamespace(
    load_model=_model.load_model, load_glide=_glide.load_glide,
    tree_spec_generate=_glide.tree_spec_generate, spec_generate=_glide.spec_generate,
    magicdec_generate=_magicdec.magicdec_generate, vanilla_generate=_vanilla.vanilla_generate,
)


class LlamaGlide(GlideModel):
    """``LlamaGlide(config, target_model_path, glide_path)``: a Llama-family target + its GLIDE draft."""

    model_type = "llama"
    backend = _REF


class Qwen2Glide(GlideModel):
    """``Qwen2Glide(config, target_model_path, glide_path)``: a Qwen2-family target + its GLIDE draft."""

    model_type = "qwen2"
    backend = _REF
