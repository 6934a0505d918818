"""Model configuration, read from a Hugging Face ``config.json`` (Llama and Qwen2 families).

One dataclass, :class:`ModelConfig`, holds everything the reference and fast models need.
It understands both the classic keys (``rope_theta`` + ``rope_scaling``) and the newer
``rope_parameters`` layout that recent ``transformers`` versions write.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ModelConfig", "SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES", "load_config"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Architecture of a Llama- or Qwen2-family decoder.

    ``rope_scaling`` is a dict with at least ``rope_type`` (one of :data:`SUPPORTED_ROPE_TYPES`)
    and the type's own parameters (``factor``, ``low_freq_factor``, ...), or ``None``.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    o_proj_bias: bool = False  # bias on o_proj (Llama with attention_bias=True; never Qwen2)
    mlp_bias: bool = False  # bias on gate/up/down projections (Llama's mlp_bias)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}: specdec supports {list(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config field {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_attention_heads={self.num_heads} must be a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", "default")
            if rt not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"unsupported rope_scaling type {rt!r}: supported are {list(SUPPORTED_ROPE_TYPES)}")
            if rt == "default":
                self.rope_scaling = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        """Build from the parsed ``config.json`` (and optionally ``generation_config.json``)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures")
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
                f"specdec supports model_type in {list(SUPPORTED_MODEL_TYPES)} (Llama, Vicuna, CodeLlama, Qwen2, Qwen2.5, QwQ)"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json is missing required keys {missing}")
        num_heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // num_heads
        rope_theta, rope_scaling = _read_rope(cfg)
        eos = _as_id_list(cfg.get("eos_token_id"))
        if generation_config:
            for t in _as_id_list(generation_config.get("eos_token_id")):
                if t not in eos:
                    eos.append(t)
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            # Qwen2 always has q/k/v bias; Llama has it when attention_bias is set.
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            eos_token_ids=eos,
            bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
            pad_token_id=cfg.get("pad_token_id") if isinstance(cfg.get("pad_token_id"), int) else None,
            # transformers' Llama puts attention_bias on o_proj too, and has an optional mlp_bias; Qwen2 has neither.
            o_proj_bias=model_type == "llama" and bool(cfg.get("attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias", False)),
        )


def _as_id_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(t) for t in x]


def _read_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, scaling dict or None) from either config layout."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", theta)
        scaling = dict(params)
    if theta is None:
        theta = 10000.0
    if scaling:
        scaling = dict(scaling)
        rt = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("rope_theta", None)
        scaling.pop("type", None)
        if rt == "default":
            return theta, None
        if rt not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling type {rt!r}: supported are {list(SUPPORTED_ROPE_TYPES)}")
        if rt in ("linear", "dynamic", "llama3", "yarn") and "factor" not in scaling and rt != "yarn":
            raise ValueError(f"rope_scaling of type {rt!r} needs a 'factor'")
        if rt == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in scaling:
                    raise ValueError(f"rope_scaling of type 'llama3' needs {key!r}")
        if rt == "yarn":
            scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        scaling["rope_type"] = rt
        return theta, scaling
    return theta, None


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json`` if present) from a model directory."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_file):
        raise ValueError(f"no config.json found at {cfg_file!r}: expected a Hugging Face model directory")
    try:
        with open(cfg_file) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    gen = None
    gen_file = os.path.join(os.path.dirname(cfg_file), "generation_config.json")
    if os.path.isfile(gen_file):
        try:
            with open(gen_file) as f:
                gen = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{gen_file}: not valid JSON ({e})") from None
    return ModelConfig.from_hf_dict(cfg, gen)
