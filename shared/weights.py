"""Checkpoint loading into a flat dict of tensors with canonical names.

Canonical names are the Hugging Face names without the ``model.`` prefix::

    embed_tokens.weight                      [V, H]
    layers.{i}.input_layernorm.weight        [H]
    layers.{i}.self_attn.{q,k,v}_proj.weight [Hq*D | Hkv*D, H]   (+ .bias when config.attention_bias)
    layers.{i}.self_attn.o_proj.weight       [H, Hq*D]   (+ .bias when config.o_proj_bias: Llama attention_bias)
    layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight      (+ .bias when config.mlp_bias)
    norm.weight                              [H]
    lm_head.weight                           [V, H]  (the same tensor as embed_tokens when tied)

Loading is lazy: tensors are read one at a time from safetensors (single file or sharded with
``model.safetensors.index.json``) or, as a fallback, from ``pytorch_model*.bin`` with
``torch.load(weights_only=True)``; no random model is ever built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from specdec.shared.config import ModelConfig, load_config

__all__ = ["Model", "expected_shapes", "load_weights", "load_checkpoint", "model_from_hf", "resolve_dtype", "resolve_device",
           "list_checkpoint_files"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """Accept a torch dtype or its name ('bf16', 'float16', ...)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}")


def resolve_device(device: torch.device | str | int) -> torch.device:
    """``device`` ('cpu', 'cuda', 'cuda:1', a torch.device or a CUDA index) as a torch.device, checked:
    a CUDA device needs CUDA to be available and the index to exist (torch would fail deep inside a copy)."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # torch's meaning of a bare index
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device={str(device)!r} but this machine has {n} CUDA device(s): use cuda:0..cuda:{n - 1}")
    return dev



def one_line_repr(obj, name: str, summary: str) -> str:
    """``name(summary, dtype=..., device=..., source=...)``: the one-line repr of every model and draft
    object (never their tensors); dtype/device read as None while the weights are not filled in."""
    try:
        dtype, device = obj.dtype, obj.device
    except (KeyError, AttributeError):
        dtype = device = None
    return f"{name}({summary}, dtype={dtype}, device={device}, source={obj.source!r})"


def model_summary(c) -> str:
    """The architecture part of a target model's repr."""
    return (f"{c.model_type}, layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}/{c.num_kv_heads}, "
            f"vocab={c.vocab_size}")

@dataclass
class Model:
    """A target (or draft) LM: its config and a flat dict of weights with canonical names.

    Plain data: the reference model is a set of functions over it (:mod:`specdec.ref.model`).
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor] = field(repr=False)
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict, repr=False)  # e.g. tokenizer dir, caches of the fast path

    @property
    def device(self) -> torch.device:
        return self.weights["embed_tokens.weight"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights["embed_tokens.weight"].dtype

    def __repr__(self) -> str:  # one line: never print tensors
        return one_line_repr(self, "Model", model_summary(self.config))


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor a checkpoint must provide (lm_head omitted when tied)."""
    h, d, v = config.hidden_size, config.head_dim, config.vocab_size
    hq, hkv, f = config.num_heads * d, config.num_kv_heads * d, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (v, h), "norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config.num_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (hq, h)
        shapes[p + "self_attn.k_proj.weight"] = (hkv, h)
        shapes[p + "self_attn.v_proj.weight"] = (hkv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, hq)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (hq,)
            shapes[p + "self_attn.k_proj.bias"] = (hkv,)
            shapes[p + "self_attn.v_proj.bias"] = (hkv,)
        if config.o_proj_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
        if config.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (f,)
            shapes[p + "mlp.up_proj.bias"] = (f,)
            shapes[p + "mlp.down_proj.bias"] = (h,)
    return shapes


def _canonical(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def list_checkpoint_files(path: str) -> tuple[str, list[str]]:
    """Return (format, files) for a checkpoint directory: 'safetensors' or 'bin'."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint directory {path!r} does not exist")
    for fmt, index_name, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"), ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: corrupt index file ({e})") from None
            files = sorted(set(weight_map.values()))
            for fn in files:
                if not os.path.isfile(os.path.join(path, fn)):
                    raise ValueError(f"{index} names shard {fn!r}, which is missing from {path}")
            return fmt, [os.path.join(path, fn) for fn in files]
        if os.path.isfile(os.path.join(path, single)):
            return fmt, [os.path.join(path, single)]
    others = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
    if others:
        fmt = "safetensors" if others[0].endswith(".safetensors") else "bin"
        return fmt, [os.path.join(path, f) for f in others if f.endswith("." + fmt)]
    raise ValueError(f"no weights found in {path}: expected model.safetensors, a sharded index, or pytorch_model.bin")


def iter_checkpoint(path: str) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (file, name, tensor) one tensor at a time (lazily) from a checkpoint directory."""
    fmt, files = list_checkpoint_files(path)
    for fn in files:
        if fmt == "safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(fn, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{fn}: corrupt or unreadable safetensors file ({e})") from None
            with handle as f:
                for name in f.keys():
                    try:
                        yield fn, name, f.get_tensor(name)
                    except Exception as e:
                        raise ValueError(f"{fn}: tensor {name!r} could not be read ({e})") from None
        else:
            try:
                sd = torch.load(fn, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"{fn}: corrupt or unreadable .bin checkpoint ({e})") from None
            for name, t in sd.items():
                yield fn, name, t


def load_weights(path: str, config: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Load and validate every tensor ``config`` needs into a canonical flat dict.

    The checkpoint is read one tensor at a time. ``transform(key, tensor)``, if given, maps each validated
    tensor (canonical name, shape checked, still on the host at its stored dtype) before it is converted
    and moved -- e.g. to keep one tensor-parallel rank's slice, so the full model is never held anywhere.
    A tied ``lm_head.weight`` is not transformed: it is the (transformed) embedding."""
    shapes = expected_shapes(config)
    weights: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for fn, name, t in iter_checkpoint(path):
        key = _canonical(name)
        if key not in shapes:
            if key == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied: the embedding is used
            if key.endswith("rotary_emb.inv_freq"):
                continue  # old checkpoints store a recomputable buffer
            continue  # unknown extras are ignored (e.g. a draft head stored beside the model)
        if tuple(t.shape) != shapes[key]:
            raise ValueError(f"{fn}: tensor {name!r} has shape {tuple(t.shape)}, but the config needs {shapes[key]}")
        if transform is not None:
            t = transform(key, t)
        weights[key] = t.to(device=device, dtype=dtype)
        where[key] = fn
    missing = [k for k in shapes if k not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {path!r} is missing tensor(s) {missing[:5]}{more} needed by config.json")
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    return weights


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu") -> Model:
    """Config + weights of a local HF-format model directory as a :class:`Model`."""
    path = os.fspath(path)
    device = resolve_device(device)
    config = load_config(path)
    dt = resolve_dtype(dtype)
    return Model(config=config, weights=load_weights(path, config, dt, device), source=path)


def model_from_hf(hf_model, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> Model:
    """Convert an already-loaded ``transformers`` ``LlamaForCausalLM``/``Qwen2ForCausalLM`` to a :class:`Model`.

    The config is read from ``hf_model.config``; tensors are copied (not shared) at ``dtype``.
    """
    hf_cfg = getattr(hf_model, "config", None)
    if hf_cfg is None or not hasattr(hf_model, "state_dict"):
        raise TypeError(f"expected a transformers causal-LM model, got {type(hf_model).__name__}")
    cfg_dict = hf_cfg.to_dict()
    gen = getattr(hf_model, "generation_config", None)
    config = ModelConfig.from_hf_dict(cfg_dict, gen.to_dict() if gen is not None else None)
    sd = hf_model.state_dict()
    first = next(iter(sd.values()))
    dt = resolve_dtype(dtype, default=first.dtype if first.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32)
    dev = resolve_device(device) if device is not None else first.device
    shapes = expected_shapes(config)
    weights = {}
    for name, t in sd.items():
        key = _canonical(name)
        if key in shapes:
            if tuple(t.shape) != shapes[key]:
                raise ValueError(f"transformers model tensor {name!r} has shape {tuple(t.shape)}, config needs {shapes[key]}")
            weights[key] = t.detach().to(device=dev, dtype=dt).clone()
    missing = [k for k in shapes if k not in weights]
    if missing:
        raise ValueError(f"transformers model is missing tensor(s) {missing[:5]}")
    if config.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    return Model(config=config, weights=weights, source=f"transformers:{type(hf_model).__name__}")
