"""GLIDE draft (LongSpec): configuration, checkpoint I/O and the beam-tree rule (ref and fast share these).

The GLIDE draft is ONE decoder layer that reuses the target's embedding and lm_head (docs/design.md §4)::

    x = embed_target(tokens)
    x = x + SelfAttn(input_layernorm(x))                 # sliding window over the draft's own KV
    x = x + CrossAttn(post_self_attention_layernorm(x))  # keys/values = target's last-layer KV cache
    x = x + MLP(post_cross_attention_layernorm(x))       # SwiGLU
    logits = lm_head_target(x)                           # no final norm

Its sizes are the target's (hidden, heads, kv heads, head dim, MLP size, RMSNorm eps), so
:class:`GlideConfig` is *derived* from the target config plus the self-attention ``window``.

Checkpoint key names (canonical, no prefix)::

    self_attn.{q,k,v}_proj.{weight,bias}   self_attn.o_proj.weight
    cross_attn.q_proj.{weight,bias}        cross_attn.o_proj.weight
    (cross_attn.{k,v}_proj.* may be present in LongSpec files; they are unused and ignored)
    mlp.{gate,up,down}_proj.weight
    input_layernorm.weight  post_self_attention_layernorm.weight  post_cross_attention_layernorm.weight

Two on-disk formats load (:func:`load_glide_weights`):

* an HF-format directory (``model.safetensors``, sharded safetensors, or ``pytorch_model*.bin``),
  as in the public ``sail/longspec-*`` repositories; and
* a plain ``state_dict`` file (``.pth`` / ``.pt`` / ``.bin``) as LongSpec's training saves it.

Keys may carry any prefix (``draft_model.``, ``glide.``, ``model.layers.0.``, ...). The prefix is
found by grouping the keys by "everything before a known suffix" and taking the one group that
holds a ``cross_attn.q_proj.weight`` (target layers have no cross-attention), so a file that also
holds the whole target model still loads the right tensors.

:func:`save_glide` writes ``config.json`` + ``model.safetensors`` with canonical keys (and
``acceptance.json``, the draft's measured acceptance by level and rank, when it has one; loading reads it
into :attr:`Glide.acceptance`).

:func:`beam_level` is the GLIDE beam-tree rule (docs/design.md §5), one pure function shared by the
reference and the fast path.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from specdec.shared.config import ModelConfig
from specdec.shared.tree_search import AcceptanceStats, acceptance_file_for
from specdec.shared.weights import iter_checkpoint, one_line_repr, resolve_dtype

__all__ = [
    "GLIDE_WINDOW",
    "GlideConfig",
    "Glide",
    "glide_expected_shapes",
    "GLIDE_UNUSED_SUFFIXES",
    "strip_glide_prefix",
    "load_glide_weights",
    "save_glide",
    "init_glide_weights",
    "beam_level",
]

GLIDE_WINDOW = 512
"""Default sliding window of the draft's self-attention (query t sees draft positions (t - 512, t])."""

GLIDE_CONFIG_TYPE = "specdec_glide"



def glide_summary(c: "GlideConfig") -> str:
    """The architecture part of a GLIDE draft's repr (both paths' draft objects use it)."""
    return (f"GLIDE draft layer, layers=1, hidden={c.hidden_size}, heads={c.num_heads}/{c.num_kv_heads}, "
            f"head_dim={c.head_dim}, mlp={c.intermediate_size}, vocab={c.vocab_size}, window={c.window}")


@dataclass
class GlideConfig:
    """Sizes of the GLIDE draft layer; all but ``window`` come from the target config.

    ``window``: the draft's self-attention at position t sees its own keys at positions s with
    ``t - window < s <= t`` (so exactly ``window`` positions including itself).
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    window: int = GLIDE_WINDOW

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"GLIDE window must be an int >= 1, got {self.window!r}")

    @classmethod
    def from_target(cls, target_config: ModelConfig, window: int = GLIDE_WINDOW) -> "GlideConfig":
        c = target_config
        return cls(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size, c.rms_norm_eps, int(window))

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": GLIDE_CONFIG_TYPE, **asdict(self)}


@dataclass
class Glide:
    """A GLIDE draft layer: config + flat dict of canonical weights (embedding/lm_head live in the target).

    ``acceptance``: the draft's measured acceptance by level and beam rank, which ``tree_shape="auto"``
    uses (docs/design.md §12); read from ``acceptance.json`` next to the weights, None if there is none."""

    config: GlideConfig
    weights: dict[str, torch.Tensor] = field(repr=False)
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    acceptance: AcceptanceStats | None = None

    @property
    def device(self) -> torch.device:
        return self.weights["self_attn.q_proj.weight"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights["self_attn.q_proj.weight"].dtype

    @property
    def window(self) -> int:
        return self.config.window

    def __repr__(self) -> str:  # one line: never print tensors
        return one_line_repr(self, "Glide", glide_summary(self.config))


def glide_expected_shapes(config: GlideConfig | ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor the draft layer needs."""
    c = config
    h, d, f = c.hidden_size, c.head_dim, c.intermediate_size
    hq, hkv = c.num_heads * d, c.num_kv_heads * d
    return {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (hq, h),
        "self_attn.q_proj.bias": (hq,),
        "self_attn.k_proj.weight": (hkv, h),
        "self_attn.k_proj.bias": (hkv,),
        "self_attn.v_proj.weight": (hkv, h),
        "self_attn.v_proj.bias": (hkv,),
        "self_attn.o_proj.weight": (h, hq),
        "post_self_attention_layernorm.weight": (h,),
        "cross_attn.q_proj.weight": (hq, h),
        "cross_attn.q_proj.bias": (hq,),
        "cross_attn.o_proj.weight": (h, hq),
        "post_cross_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }


GLIDE_UNUSED_SUFFIXES = ("cross_attn.k_proj.weight", "cross_attn.k_proj.bias", "cross_attn.v_proj.weight", "cross_attn.v_proj.bias")
"""In LongSpec files but unused: the cross-attention reads the target's cached K/V directly."""

_ALL_SUFFIXES = tuple(glide_expected_shapes(GlideConfig(1, 1, 1, 2, 1, 1, 1e-6)).keys()) + GLIDE_UNUSED_SUFFIXES


def strip_glide_prefix(names: list[str]) -> tuple[str, dict[str, str]]:
    """Find the GLIDE layer's key prefix among checkpoint key ``names``.

    Returns (prefix, {canonical name: original name}) for the keys of that one layer.
    Raises ValueError if no group of keys looks like a GLIDE layer, or if several do.
    """
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        for suffix in _ALL_SUFFIXES:
            if name == suffix or name.endswith("." + suffix):
                groups.setdefault(name[: len(name) - len(suffix)], {})[suffix] = name
                break
    glide_groups = {p: g for p, g in groups.items() if "cross_attn.q_proj.weight" in g}
    if not glide_groups:
        sample = ", ".join(sorted(names)[:6])
        raise ValueError(
            "not a GLIDE checkpoint: no 'cross_attn.q_proj.weight' key found (a GLIDE draft layer has self_attn, "
            f"cross_attn, mlp and three norms); keys start with: {sample}"
        )
    if len(glide_groups) > 1:
        raise ValueError(f"ambiguous GLIDE checkpoint: several layers have a cross_attn ({sorted(glide_groups)}); keep one")
    prefix, group = next(iter(glide_groups.items()))
    return prefix, group


def _read_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A plain ``state_dict`` saved with ``torch.save`` (possibly nested under 'state_dict'/'model')."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        raise ValueError(f"{path}: corrupt or unreadable state_dict file ({e})") from None
    # LongSpec-style trainers sometimes wrap the weights: {'state_dict': {...}} or {'model': {...}}.
    for key in ("state_dict", "model", "module", "draft_model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and not isinstance(sd.get(key), torch.Tensor):
            inner = sd[key]
            if any(isinstance(v, torch.Tensor) for v in inner.values()):
                sd = inner
                break
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """All tensors of a GLIDE checkpoint (dir or file) and the window from its config.json, if any."""
    window = None
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file) as f:
                    cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
            if isinstance(cfg.get("window"), int):
                window = cfg["window"]
        pths = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt")))
        has_hf = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
        if not has_hf and pths:
            return _read_state_dict_file(os.path.join(path, pths[0])), window
        tensors = {name: t for _, name, t in iter_checkpoint(path)}
        return tensors, window
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                return load_file(path), window
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
        return _read_state_dict_file(path), window
    raise ValueError(f"GLIDE checkpoint {path!r} does not exist (expected an HF-format directory or a .pth state_dict)")


def load_glide_weights(
    path: str | os.PathLike,
    target_config: ModelConfig,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    window: int | None = None,
) -> Glide:
    """Load a GLIDE draft for a target with ``target_config`` (both formats, any key prefix).

    Args:
        path: HF-format directory (config.json optional) or a state_dict file (.pth/.pt/.bin/.safetensors).
        target_config: the target's config; every tensor's shape is checked against it.
        dtype: weights dtype (default float32); device: where to put them.
        window: self-attention window; default = ``window`` in the checkpoint's config.json, else 512.

    Raises:
        ValueError naming the tensor, the expected and the found shape when they differ; naming the
        missing tensors when some are absent.
    """
    path = os.fspath(path)
    tensors, file_window = _read_checkpoint(path)
    cfg = GlideConfig.from_target(target_config, window if window is not None else (file_window or GLIDE_WINDOW))
    prefix, names = strip_glide_prefix(list(tensors))
    shapes = glide_expected_shapes(cfg)
    dt = resolve_dtype(dtype)
    weights: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key not in names:
            continue
        t = tensors[names[key]]
        if tuple(t.shape) != shape:
            raise ValueError(
                f"GLIDE checkpoint {path!r}: tensor {names[key]!r} has shape {tuple(t.shape)}, but the target "
                f"(hidden={target_config.hidden_size}, heads={target_config.num_heads}/{target_config.num_kv_heads}, "
                f"head_dim={target_config.head_dim}, mlp={target_config.intermediate_size}) needs {shape}"
            )
        weights[key] = t.to(device=device, dtype=dt)
    missing = [k for k in shapes if k not in weights]
    if missing:
        raise ValueError(f"GLIDE checkpoint {path!r} (prefix {prefix!r}) is missing tensor(s) {missing}")
    stats_file = acceptance_file_for(path)
    acceptance = AcceptanceStats.load(stats_file) if os.path.isfile(stats_file) else None
    return Glide(cfg, weights, source=path, extras={"prefix": prefix}, acceptance=acceptance)


def save_glide(glide: Glide, path: str | os.PathLike) -> str:
    """Write ``config.json`` + ``model.safetensors`` (canonical keys) into directory ``path``, and
    ``acceptance.json`` when the draft carries measured :attr:`Glide.acceptance`."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(glide.config.to_dict(), f, indent=2)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in glide.weights.items()}
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if glide.acceptance is not None:
        glide.acceptance.save(acceptance_file_for(path))
    return path


def init_glide_weights(
    target_config: ModelConfig,
    window: int = GLIDE_WINDOW,
    seed: int = 0,
    std: float = 0.02,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> Glide:
    """A freshly initialised draft: linear weights N(0, std), biases 0, norm weights 1 (like HF init).

    Tests use a larger ``std`` (e.g. 0.3) so random drafts are not degenerate.
    """
    cfg = GlideConfig.from_target(target_config, window)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in glide_expected_shapes(cfg).items():
        if "norm" in name:
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        weights[name] = t.to(device=device, dtype=resolve_dtype(dtype))
    return Glide(cfg, weights, source="init")


TIE_SLACK = 16
"""Extra candidates :func:`beam_level` ranks beyond ``k`` before it checks for a tie at the cut."""


def beam_level(cum_logprob: torch.Tensor, draft_logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the GLIDE beam tree: the best ``k`` (node, token) pairs over ALL nodes of a level.

    Args:
        cum_logprob: [n] cumulative draft log-probability of each node of the current level
            (root: ``[0.]``).
        draft_logprobs: [n, V] the draft's log-probabilities for the token after each node.
        k: how many children the next level keeps (clamped to n * V).

    Returns:
        (parent_idx [k] long: index into the current level, tokens [k] long, cum [k] fp32), best first.
        Score of a pair = ``cum_logprob[node] + draft_logprobs[node, token]`` (one fp32 add); the
        order is score descending, ties to the lower flat index ``node * V + token`` (lower node
        first, then lower token id) -- exactly, however many pairs tie -- so the result is
        deterministic. The pairs are distinct, so sibling tokens never repeat. A NaN score counts
        as -inf. The fast path's kernel (:func:`specdec.fast.kernels.beam_topk`) follows the same rule.
    """
    if draft_logprobs.dim() != 2 or cum_logprob.shape != draft_logprobs.shape[:1]:
        raise ValueError(f"beam_level needs cum_logprob [n] and draft_logprobs [n, V], got {tuple(cum_logprob.shape)} and {tuple(draft_logprobs.shape)}")
    n, v = draft_logprobs.shape
    k = min(int(k), n * v)
    if k < 1:
        raise ValueError(f"beam_level needs k >= 1, got {k}")
    scores2d = cum_logprob.float()[:, None] + draft_logprobs.float()  # [n, V]
    scores2d = torch.where(torch.isnan(scores2d), float("-inf"), scores2d)  # NaN counts as -inf
    scores = scores2d.reshape(-1)  # [n * V], node-major: flat index = node * V + token
    # The k best of n * V pairs: take a few more than k with topk (fast, no full sort), then order those
    # by score with a stable sort over ascending flat index -- equal scores keep flat-index order.
    kk = min(k + TIE_SLACK, n * v)
    if n > 1 and kk < v:
        # two stages (same set): every pair among the kk best overall is among its own row's kk best,
        # and n row-wise top-kk's run in parallel where one top-kk over n * V runs on one block
        row_best = torch.topk(scores2d, kk, dim=1)
        flat = (row_best.indices + torch.arange(n, device=scores.device)[:, None] * v).reshape(-1)
        cand = flat[torch.topk(row_best.values.reshape(-1), kk).indices]
    else:
        cand = torch.topk(scores, kk).indices
    cand = torch.sort(cand).values
    order = cand[torch.sort(-scores[cand], stable=True).indices[:k]]
    if kk < n * v and bool(scores[cand].min() == scores[order[-1]]):
        # the k-th score also ends the kk candidates: pairs tied with it may have been cut by topk (which
        # breaks ties arbitrarily) -- rank every pair instead (rare: only with many exactly equal scores)
        order = torch.sort(-scores, stable=True).indices[:k]
    return order // v, order % v, scores[order]
