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

**Truncated draft vocabulary** (optional; docs/design.md §12). A draft may propose only N of the
target's V tokens (as EAGLE-3's draft vocabulary / FR-Spec): :attr:`Glide.vocab_map` is the int64 [N]
tensor draft id -> target id, **sorted ascending** (draft id i is the i-th smallest kept target id), so
ties in the beam still go to the lower target id and a map of all V ids is exactly the full vocabulary.
The draft's logits are then ``hidden @ lm_head_target[vocab_map]^T`` (the path keeps a sliced copy of
those rows) and its beam proposes ``vocab_map[draft id]``. Verification is unchanged, so every decoder
stays lossless. On disk the map is the tensor ``draft_vocab`` (:data:`DRAFT_VOCAB_KEY`, int64 [N]) in the
weights file, with ``draft_vocab_size`` = N and the target's ``vocab_size`` in ``config.json``; absent =
the full vocabulary (today's behaviour, bit for bit). :func:`validate_draft_vocab` checks a map (shape,
dtype, range, strictly increasing; the file's ``vocab_size`` against the target: a map built for another
tokenizer fails at load). :func:`draft_vocab_from_counts` builds one from token counts (``specdec
draft-vocab``, :mod:`specdec.draft_vocab`).

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
from specdec.shared.sampling import TIE_SLACK, stable_topk
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
    "DRAFT_VOCAB_KEY",
    "validate_draft_vocab",
    "with_draft_vocab",
    "draft_vocab_from_counts",
    "draft_vocab_size",
]

GLIDE_WINDOW = 512
"""Default sliding window of the draft's self-attention (query t sees draft positions (t - 512, t])."""

GLIDE_CONFIG_TYPE = "specdec_glide"

DRAFT_VOCAB_KEY = "draft_vocab"
"""Name of the draft-id -> target-id map (int64 [N], sorted ascending) in a GLIDE weights file."""



def glide_summary(c: "GlideConfig", vocab_map: torch.Tensor | None = None) -> str:
    """The architecture part of a GLIDE draft's repr (both paths' draft objects use it)."""
    vocab = f"{c.vocab_size}" if vocab_map is None else f"{vocab_map.numel()} of {c.vocab_size}"
    return (f"GLIDE draft layer, layers=1, hidden={c.hidden_size}, heads={c.num_heads}/{c.num_kv_heads}, "
            f"head_dim={c.head_dim}, mlp={c.intermediate_size}, vocab={vocab}, window={c.window}")


def draft_vocab_size(glide) -> int:
    """N for a draft with a truncated vocabulary (its ``vocab_map``), else the target's V (any draft object
    with ``config`` and ``vocab_map``: both paths' drafts)."""
    vmap = getattr(glide, "vocab_map", None)
    return int(vmap.numel()) if vmap is not None else int(glide.config.vocab_size)


def validate_draft_vocab(vocab_map, vocab_size: int, where: str = "vocab_map") -> torch.Tensor:
    """Check a draft-id -> target-id map for a target of ``vocab_size`` tokens; returns it as int64 [N] (CPU).

    Raises TypeError unless it is a 1-D integer tensor (or a list of ints), ValueError unless
    ``1 <= N <= vocab_size``, every id is in ``[0, vocab_size)`` and the ids are strictly increasing
    (sorted, no repeats). ``where`` names the argument or file in the message."""
    if isinstance(vocab_map, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab_map):
            raise TypeError(f"{where} must hold ints (target token ids)")
        vocab_map = torch.tensor(vocab_map, dtype=torch.long)
    if not isinstance(vocab_map, torch.Tensor) or vocab_map.is_floating_point() or vocab_map.dtype == torch.bool \
            or vocab_map.is_complex():
        raise TypeError(f"{where} must be an int64 tensor [N] of target token ids, got "
                        f"{getattr(vocab_map, 'dtype', type(vocab_map).__name__)}")
    if vocab_map.dim() != 1:
        raise ValueError(f"{where} must be 1-D [N], got shape {tuple(vocab_map.shape)}")
    n = vocab_map.numel()
    if not 1 <= n <= vocab_size:
        raise ValueError(f"{where} holds {n} ids; a draft vocabulary needs 1 <= N <= the target's {vocab_size} tokens")
    ids = vocab_map.detach().to("cpu", torch.long)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{where} has target ids in [{lo}, {hi}], outside the target's vocabulary [0, {vocab_size - 1}]")
    if n > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError(f"{where} must be strictly increasing (sorted target ids, no repeats)")
    return ids


def with_draft_vocab(glide: "Glide", vocab_map) -> "Glide":
    """A copy of ``glide`` (same weight tensors, fresh ``extras``) that proposes only the target ids in
    ``vocab_map`` (validated by :func:`validate_draft_vocab`; None = the full vocabulary)."""
    vmap = None if vocab_map is None else validate_draft_vocab(vocab_map, glide.config.vocab_size).to(glide.device)
    return Glide(glide.config, glide.weights, source=glide.source, extras={k: v for k, v in glide.extras.items()
                 if k == "prefix"}, acceptance=glide.acceptance, vocab_map=vmap)


def draft_vocab_from_counts(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` most frequent token ids of ``counts`` [V] (occurrences per target id) as a draft
    vocabulary: int64 [size], sorted ascending. Equal counts go to the lower id.

    Raises ValueError unless ``counts`` is 1-D and ``1 <= size <= V`` (naming the accepted range)."""
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1:
        raise ValueError(f"counts must be a 1-D tensor [V], got {getattr(counts, 'shape', type(counts).__name__)}")
    v = counts.numel()
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= v:
        raise ValueError(f"size must be an int in [1, {v}] (the target's vocabulary), got {size!r}")
    # stable sort by count, descending: equal counts keep ascending id order
    order = torch.sort(-counts.to(torch.float64), stable=True).indices[:size]
    return torch.sort(order.long()).values


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
    uses (docs/design.md §12); read from ``acceptance.json`` next to the weights, None if there is none.

    ``vocab_map``: the truncated draft vocabulary, int64 [N] target ids sorted ascending (draft id i
    proposes target token ``vocab_map[i]``), on the weights' device; None = the full vocabulary.
    Set it with :func:`with_draft_vocab` (validated)."""

    config: GlideConfig
    weights: dict[str, torch.Tensor] = field(repr=False)
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    acceptance: AcceptanceStats | None = None
    vocab_map: torch.Tensor | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.weights["self_attn.q_proj.weight"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights["self_attn.q_proj.weight"].dtype

    @property
    def window(self) -> int:
        return self.config.window

    @property
    def draft_vocab_size(self) -> int:
        """N, the tokens the draft can propose (the target's V without a truncated vocabulary)."""
        return draft_vocab_size(self)

    def __repr__(self) -> str:  # one line: never print tensors
        return one_line_repr(self, "Glide", glide_summary(self.config, self.vocab_map))


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


def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors of a GLIDE checkpoint (dir or file) and its config.json (``{}`` without one)."""
    cfg: dict[str, Any] = {}
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            try:
                with open(cfg_file) as f:
                    cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
        pths = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt")))
        has_hf = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
        if not has_hf and pths:
            return _read_state_dict_file(os.path.join(path, pths[0])), cfg
        tensors = {name: t for _, name, t in iter_checkpoint(path)}
        return tensors, cfg
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                return load_file(path), cfg
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
        return _read_state_dict_file(path), cfg
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

    A ``draft_vocab`` tensor (:data:`DRAFT_VOCAB_KEY`, with or without the layer's prefix) becomes
    :attr:`Glide.vocab_map` (on ``device``); without one the draft covers the full vocabulary.

    Raises:
        ValueError naming the tensor, the expected and the found shape when they differ; naming the
        missing tensors when some are absent; for a draft vocabulary that is not a sorted set of ids of
        this target (:func:`validate_draft_vocab`), whose size differs from config.json's
        ``draft_vocab_size``, or that config.json says was built for another vocabulary size.
    """
    path = os.fspath(path)
    tensors, file_cfg = _read_checkpoint(path)
    file_window = file_cfg.get("window") if isinstance(file_cfg.get("window"), int) else None
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
    vocab_map = _load_draft_vocab(path, tensors, prefix, file_cfg, target_config.vocab_size)
    stats_file = acceptance_file_for(path)
    acceptance = AcceptanceStats.load(stats_file) if os.path.isfile(stats_file) else None
    return Glide(cfg, weights, source=path, extras={"prefix": prefix}, acceptance=acceptance,
                 vocab_map=None if vocab_map is None else vocab_map.to(device))


def _load_draft_vocab(path: str, tensors: dict[str, torch.Tensor], prefix: str, file_cfg: dict[str, Any],
                      vocab_size: int) -> torch.Tensor | None:
    """The checkpoint's draft vocabulary (validated against the target), or None when it has none."""
    name = next((n for n in (prefix + DRAFT_VOCAB_KEY, DRAFT_VOCAB_KEY) if n in tensors), None)
    want_n = file_cfg.get("draft_vocab_size")
    if name is None:
        if want_n is not None:
            raise ValueError(f"GLIDE checkpoint {path!r}: config.json says draft_vocab_size={want_n} but the weights "
                             f"hold no {DRAFT_VOCAB_KEY!r} tensor")
        return None
    built_for = file_cfg.get("vocab_size")
    if built_for is not None and built_for != vocab_size:
        raise ValueError(f"GLIDE checkpoint {path!r}: its draft vocabulary was built for a {built_for}-token vocabulary, "
                         f"but the target has {vocab_size} tokens (another tokenizer?)")
    ids = validate_draft_vocab(tensors[name], vocab_size, where=f"GLIDE checkpoint {path!r}: {name!r}")
    if want_n is not None and want_n != ids.numel():
        raise ValueError(f"GLIDE checkpoint {path!r}: {name!r} holds {ids.numel()} ids but config.json says "
                         f"draft_vocab_size={want_n}")
    return ids


def save_glide(glide: Glide, path: str | os.PathLike) -> str:
    """Write ``config.json`` + ``model.safetensors`` (canonical keys) into directory ``path``, and
    ``acceptance.json`` when the draft carries measured :attr:`Glide.acceptance`. A truncated draft
    vocabulary (:attr:`Glide.vocab_map`) is written as the ``draft_vocab`` tensor, with
    ``draft_vocab_size`` in config.json; without one the files are exactly as before."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = glide.config.to_dict()
    if glide.vocab_map is not None:
        cfg["draft_vocab_size"] = int(glide.vocab_map.numel())
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in glide.weights.items()}
    if glide.vocab_map is not None:
        sd[DRAFT_VOCAB_KEY] = validate_draft_vocab(glide.vocab_map, glide.config.vocab_size).contiguous()
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
    # The k best of n * V pairs in stable order (equal scores keep flat-index order), without a full sort.
    kk = min(k + TIE_SLACK, n * v)
    cand = None
    if n > 1 and kk < v:
        # two stages (same set): every pair among the kk best overall is among its own row's kk best,
        # and n row-wise top-kk's run in parallel where one top-kk over n * V runs on one block
        row_best = torch.topk(scores2d, kk, dim=1)
        flat = (row_best.indices + torch.arange(n, device=scores.device)[:, None] * v).reshape(-1)
        cand = flat[torch.topk(row_best.values.reshape(-1), kk).indices]
    order = stable_topk(scores, k, candidates=cand)
    return order // v, order % v, scores[order]
