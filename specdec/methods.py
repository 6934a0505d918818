"""The decoding methods: ONE table for ``specdec generate``, ``specdec bench`` and ``specdec report``.

A method's name is its decoder function's name minus ``_generate`` (``tree_spec`` runs
``tree_spec_generate``); :mod:`specdec.ref` and :mod:`specdec.fast` both define every function
under that name, with the signature ``fn(target, [draft | glide,] input_ids, prompt_len, **kw)``::

    name         function              drafts with   command-line knobs
    vanilla      vanilla_generate      -             -
    speculative  speculative_generate  draft         gamma, draft_window
    spec         spec_generate         glide         gamma
    tree_spec    tree_spec_generate    glide         tree_shape
    logitspec    logitspec_generate    -             max_ngram_size, num_pred_tokens, draft_tree_capacity
    magicdec     magicdec_generate     -             gamma, sink_tokens, window
    pld          pld_generate          -             max_ngram_size, num_pred_tokens

``needs`` says what the decoder takes after the target: ``"draft"`` a separate small LM with the
target's tokenizer (``load_model``), ``"glide"`` a GLIDE draft trained for the target
(``load_glide``), ``None`` nothing (it drafts from the context or with the target itself).
``options`` are the decoder's keyword arguments the command lines pass through when given
(``--gamma``, ``--tree-shape``, ...); a knob not given keeps the decoder's own default.

This module names functions, it imports neither backend: the app picks ``specdec.ref`` or
``specdec.fast`` and calls ``getattr(backend, METHODS[name].function)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["Method", "METHODS", "DEFAULT_METHOD", "OPTIONS", "canonical_method", "methods_taking"]

_SUFFIX = "_generate"


@dataclass(frozen=True)
class Method:
    name: str  # = function minus "_generate"
    function: str  # decoder function name in specdec.ref / specdec.fast
    needs: str | None  # what it drafts with: "draft" (a separate LM), "glide" (a GLIDE draft), or None
    options: tuple[str, ...]  # decoder keyword arguments the command lines take (when given)
    summary: str  # one line for help texts

    def __post_init__(self):
        if self.function != self.name + _SUFFIX:
            raise ValueError(f"method {self.name!r}: its function must be {self.name + _SUFFIX!r}, not {self.function!r}")
        if self.needs not in (None, "draft", "glide"):
            raise ValueError(f"method {self.name!r}: needs must be 'draft', 'glide' or None, not {self.needs!r}")


def _m(function: str, needs: str | None, options: tuple[str, ...], summary: str) -> Method:
    return Method(function[: -len(_SUFFIX)], function, needs, options, summary)


METHODS: dict[str, Method] = {m.name: m for m in (
    _m("vanilla_generate", None, (), "plain autoregressive decoding (the baseline)"),
    _m("speculative_generate", "draft", ("gamma", "draft_window"), "draft LM chain"),
    _m("spec_generate", "glide", ("gamma",), "GLIDE chain"),
    _m("tree_spec_generate", "glide", ("tree_shape",), "GLIDE beam tree"),
    _m("logitspec_generate", None, ("max_ngram_size", "num_pred_tokens", "draft_tree_capacity"),
       "retrieval drafts plus next-next-token guesses from the last logit"),
    _m("magicdec_generate", None, ("gamma", "sink_tokens", "window"), "self-speculation over a StreamingLLM cache"),
    _m("pld_generate", None, ("max_ngram_size", "num_pred_tokens"), "prompt lookup decoding"),
)}

DEFAULT_METHOD = "tree_spec"

# every knob of every method, in first-seen order
OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(o for m in METHODS.values() for o in m.options))

_BY_FUNCTION = {m.function: m.name for m in METHODS.values()}


def canonical_method(name: str, extra: Iterable[str] = ()) -> str:
    """The method name for a method or decoder function name (``"tree_spec_generate"`` -> ``"tree_spec"``).

    ``extra``: more names accepted as they are (e.g. the ``transformers`` peers of ``specdec bench``).
    Raises ValueError naming the choices for anything else.
    """
    extra = tuple(extra)
    n = str(name).strip()
    n = _BY_FUNCTION.get(n, n)
    if n not in METHODS and n not in extra:
        raise ValueError(f"unknown method {name!r}: choose from {list(METHODS) + list(extra)}")
    return n


def methods_taking(option: str) -> list[str]:
    """Names of the methods that take the knob ``option`` (e.g. ``"gamma"``), in table order."""
    return [m.name for m in METHODS.values() if option in m.options]
