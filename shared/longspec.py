"""LongSpec-compatible model classes, independent of the path that runs them (docs/design.md §3).

LongSpec's ``LlamaGlide(config, target_model_path, glide_path)`` / ``Qwen2Glide`` keep its
argument names, defaults (``eos_id=151645``, Qwen2's ``<|im_end|>``, for both classes) and return
tuples. On a model whose vocabulary is smaller the *default* falls back to the model's own EOS ids
(with a warning); an explicit ``eos_id`` outside the vocabulary is a ValueError. Every method also
takes the decoders' ``generator``, ``sampling`` and ``seed`` as keywords after LongSpec's own arguments
(``sampling="keyed"`` with a ``seed``: exactly the tokens of ``vanilla_generate`` with the same seed and
temperature, docs/design.md §8); they are passed through unchanged, so bad values raise the decoders'
errors. :class:`GlideModel` holds that surface once; :mod:`specdec.ref.longspec` and :mod:`specdec.fast.longspec` subclass it
with their own decoders (``backend``), so the shared ground never imports either path.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import torch

from specdec.shared.weights import resolve_dtype

__all__ = ["GlideModel", "LONGSPEC_EOS"]


class _DefaultEos(int):
    """LongSpec's default ``eos_id`` (151645, Qwen2's ``<|im_end|>``) marked as "not passed by the caller":
    compared by identity, so an explicit ``eos_id=151645`` is still the caller's own choice."""

    __slots__ = ()


LONGSPEC_EOS = _DefaultEos(151645)


def _config_dict(config: Any) -> dict[str, Any] | None:
    """A transformers config object, a dict, a config.json path or a model dir -> dict (None: not given)."""
    if config is None:
        return None
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(cfg_file):
            raise ValueError(f"config {path!r}: no config.json found")
        with open(cfg_file) as f:
            return json.load(f)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a transformers config, a dict or a path, got {type(config).__name__}")


class GlideModel:
    """Target + GLIDE draft behind LongSpec's methods (see the module docstring).

    The decoders come from ``backend``, a namespace with the public decoder API (``load_model``,
    ``load_glide``, ``tree_spec_generate``, ``spec_generate``, ``magicdec_generate``,
    ``vanilla_generate``) that each path's ``longspec`` module sets: :mod:`specdec.ref.longspec`
    and :mod:`specdec.fast.longspec` define ``LlamaGlide`` / ``Qwen2Glide`` over this one class.
    """

    model_type = ""
    backend: Any = None

    def __init__(self, config, target_model_path, glide_path, dtype=None, device=None, window: int | None = None,
                 tp: Any = None):
        """``tp``: the fast path's tensor parallelism (:func:`specdec.fast.tp.init_tensor_parallel`; every rank
        builds the object and calls the same methods, each holding its slice of the target and the draft);
        the reference path is single-process and refuses it."""
        if self.backend is None or not self.model_type:
            raise TypeError(f"{type(self).__name__} is abstract: use LlamaGlide / Qwen2Glide from specdec.ref or specdec.fast")
        if tp is not None and not getattr(self.backend, "tensor_parallel", False):
            raise ValueError(f"tp needs the fast path (specdec.fast.{type(self).__name__}); the reference runs in one process")
        cfg = _config_dict(config)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            # LongSpec runs in half precision on the GPU; fp32 on CPU.
            dtype = (cfg or {}).get("torch_dtype") or (cfg or {}).get("dtype") or "bfloat16"
            dtype = resolve_dtype(dtype) if str(device).startswith("cuda") else torch.float32
        self.target = self.backend.load_model(target_model_path, dtype=dtype, device=device,
                                              **({} if tp is None else {"tp": tp}))
        tc = self.target.config
        if tc.model_type != self.model_type:
            raise ValueError(f"{type(self).__name__} needs a {self.model_type!r} target, but {target_model_path!r} is {tc.model_type!r}")
        if cfg is not None:
            # The config the caller passed must describe the checkpoint we loaded.
            for key, mine in (("vocab_size", tc.vocab_size), ("hidden_size", tc.hidden_size), ("num_hidden_layers", tc.num_layers)):
                if key in cfg and int(cfg[key]) != mine:
                    raise ValueError(f"config {key}={cfg[key]} does not match the target checkpoint at {target_model_path!r} ({key}={mine})")
        self.config = config
        self.glide = self.backend.load_glide(glide_path, self.target, window=window)

    @property
    def device(self) -> torch.device:
        return self.target.device

    def _eos(self, eos_id):
        """LongSpec's default eos_id when it fits the vocabulary; else (a smaller vocabulary, e.g. a Llama)
        the model's own EOS ids, with a warning. Explicit ids go to the decoders, which check their range."""
        if eos_id is not LONGSPEC_EOS:
            return eos_id
        tc = self.target.config
        if int(eos_id) < tc.vocab_size:
            return int(eos_id)
        warnings.warn(f"{type(self).__name__}: LongSpec's default eos_id={int(eos_id)} is outside this model's vocabulary "
                      f"of {tc.vocab_size} tokens; using the model's own EOS ids {tc.eos_token_ids} (pass eos_id= to choose)",
                      stacklevel=3)
        return None

    def tree_spec_generate(self, input_ids, prompt_length, tree_shape=None, max_gen_len=64, eos_id=LONGSPEC_EOS, temperature=0.0,
                           generator=None, sampling="rejection", seed=None):
        """Beam-tree speculation; returns ``(output_ids, count, num, elapsed_time, spec_mask)``."""
        return self.backend.tree_spec_generate(self.target, self.glide, input_ids, prompt_length, tree_shape=tree_shape,
                                               max_gen_len=max_gen_len, eos_id=self._eos(eos_id), temperature=temperature,
                                               generator=generator, sampling=sampling, seed=seed)

    def spec_generate(self, input_ids, prompt_length, gamma=4, max_gen_len=64, eos_id=LONGSPEC_EOS, temperature=0.0,
                      generator=None, sampling="rejection", seed=None):
        """Chain speculation with ``gamma`` drafts; returns ``(output_ids, count, num, elapsed_time, spec_mask)``."""
        return self.backend.spec_generate(self.target, self.glide, input_ids, prompt_length, gamma=gamma, max_gen_len=max_gen_len,
                                          eos_id=self._eos(eos_id), temperature=temperature, generator=generator,
                                          sampling=sampling, seed=seed)

    def magicdec_generate(self, input_ids, prompt_length, gamma=4, max_gen_len=64, eos_id=LONGSPEC_EOS, temperature=0.0,
                          sink_tokens=4, window=256, generator=None, sampling="rejection", seed=None):
        """MagicDec self-speculation (LongSpec's ``--method magicdec``); same 5-tuple."""
        return self.backend.magicdec_generate(self.target, input_ids, prompt_length, gamma=gamma, sink_tokens=sink_tokens,
                                              window=window, max_gen_len=max_gen_len, eos_id=self._eos(eos_id),
                                              temperature=temperature, generator=generator, sampling=sampling, seed=seed)

    def vanilla_generate(self, input_ids, prompt_length, max_gen_len=64, eos_id=LONGSPEC_EOS, temperature=0.0,
                         generator=None, sampling="rejection", seed=None):
        """Autoregressive baseline (LongSpec's is greedy: ``temperature=0``, the default); returns
        ``(output_ids, num_tokens, elapsed_time)``."""
        res = self.backend.vanilla_generate(self.target, input_ids, prompt_length, max_gen_len=max_gen_len,
                                            eos_id=self._eos(eos_id), temperature=temperature, generator=generator,
                                            sampling=sampling, seed=seed)
        return res.output_ids, res.num_tokens, res.elapsed_time

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, glide={self.glide!r})"
