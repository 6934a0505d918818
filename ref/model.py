"""The reference Llama / Qwen2 decoder: plain functions over a flat weight dict.

Read it top to bottom like nanoGPT:

    embed -> N x [ x + Attn(RMSNorm(x)),  x + SwiGLU(RMSNorm(x)) ] -> RMSNorm -> lm_head

Attention is grouped-query attention with RoPE over an explicit KV cache and an arbitrary
boolean mask, so the same function serves the prefill (causal mask), plain decoding, tree
verification (prefix + tree ancestor mask), and MagicDec's compressed view (sinks + window).

The KV cache stores keys *after* RoPE (like Hugging Face and LongSpec), so the GLIDE draft can
read the target's last-layer cache as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from specdec.ref.attention import fused_masked_attention, masked_attention
from specdec.shared.rope import apply_rope, rope_cos_sin
from specdec.shared.weights import Model, load_checkpoint, model_from_hf

__all__ = [
    "Model",
    "KVCache",
    "load_model",
    "as_model",
    "rms_norm",
    "embed",
    "forward",
    "forward_step",
    "causal_mask",
    "new_cache",
]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_model(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32, device: torch.device | str = "cpu") -> Model:
    """Load a local HF-format model directory (config.json + safetensors/bin) as a :class:`Model`.

    ``path="default"`` loads the small code model shipped inside the package.
    """
    from specdec.shared.assets import resolve_model_path

    return load_checkpoint(resolve_model_path(path), dtype=dtype, device=device)


def as_model(obj, dtype=None, device=None) -> Model:
    """Accept a :class:`Model` or a ``transformers`` causal LM (converted once) and return a Model."""
    if isinstance(obj, Model):
        return obj
    return model_from_hf(obj, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# The KV cache: per layer, keys (post-RoPE) and values [B, Hkv, S, D]
# ---------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Keys and values of every layer; ``k[i]``/``v[i]`` are [B, Hkv, S, D] with S = :attr:`length`.

    The reference cache simply grows by concatenation; compaction keeps a set of rows.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def truncate(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (roll back rejected drafts)."""
        self.k = [t[:, :, :length] for t in self.k]
        self.v = [t[:, :, :length] for t in self.v]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows`` (1-D long), in that order, in EVERY layer (KV compaction)."""
        self.k = [t.index_select(2, rows) for t in self.k]
        self.v = [t.index_select(2, rows) for t in self.v]


def new_cache(model: Model, batch_size: int = 1) -> KVCache:
    c = model.config
    empty = lambda: torch.empty(batch_size, c.num_kv_heads, 0, c.head_dim, dtype=model.dtype, device=model.device)  # noqa: E731
    return KVCache(k=[empty() for _ in range(c.num_layers)], v=[empty() for _ in range(c.num_layers)])


def causal_mask(past: int, t: int, device=None) -> torch.Tensor:
    """[t, past + t] bool: new token i (at position past + i) sees every column <= past + i."""
    cols = torch.arange(past + t, device=device)
    rows = torch.arange(t, device=device) + past
    return cols[None, :] <= rows[:, None]


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, scaled by ``weight``, back in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def embed(model: Model, input_ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(input_ids, model.weights["embed_tokens.weight"])


def linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x @ W^T (+ b if the checkpoint has a bias for ``name``)."""
    return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def swiglu_mlp(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    gate = linear(x, w, prefix + "gate_proj")
    up = linear(x, w, prefix + "up_proj")
    return linear(F.silu(gate) * up, w, prefix + "down_proj")


def attention_layer(model: Model, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, mask: torch.Tensor,
                    fused: bool = False) -> torch.Tensor:
    """Layer ``i``'s self-attention for new tokens x [B, T, H]; appends their K/V to ``cache``.

    ``mask`` is [B, T, S] (or [T, S]) over all S = past + T cache columns after the append.
    ``fused``: evaluate the attention with :func:`fused_masked_attention` (a prefill, a drafter's passes)
    instead of the written-out :func:`masked_attention`.
    """
    c, w, p = model.config, model.weights, f"layers.{i}.self_attn."
    # 1. Project to queries, keys and values and split the heads.
    q = rearrange(linear(x, w, p + "q_proj"), "b t (h d) -> b h t d", d=c.head_dim)
    k = rearrange(linear(x, w, p + "k_proj"), "b t (h d) -> b h t d", d=c.head_dim)
    v = rearrange(linear(x, w, p + "v_proj"), "b t (h d) -> b h t d", d=c.head_dim)
    # 2. Rotate q and k by their positions (RoPE); the cache stores rotated keys.
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # 3. Append to the cache, then attend over everything the mask allows (GQA inside).
    if cache is not None:
        cache.k[i] = torch.cat([cache.k[i], k], dim=2)
        cache.v[i] = torch.cat([cache.v[i], v], dim=2)
        k, v = cache.k[i], cache.v[i]
    out = (fused_masked_attention if fused else masked_attention)(q, k, v, mask)
    # 4. Merge heads and project back.
    return linear(rearrange(out, "b h t d -> b t (h d)"), w, p + "o_proj")


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------


def forward_step(
    model: Model,
    input_ids: torch.Tensor,
    cache: KVCache,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_hidden: bool = False,
    fused_attention: bool = False,
):
    """Run new tokens through the model, appending their K/V to ``cache``.

    Args:
        input_ids: [B, T] new tokens.
        cache: KV cache holding ``past`` positions; grows to ``past + T``.
        positions: [T] or [B, T] RoPE positions; default ``past + arange(T)``.
        mask: [T, past + T] or [B, T, past + T] bool (True = attend); default causal.
        return_hidden: also return the final normed hidden states [B, T, H].
        fused_attention: attend with torch's fused SDPA (:func:`fused_masked_attention`: the same
            function without the [T, S] scores, rounded differently) -- for a prefill and a drafter's
            passes only; every decode-phase pass of the target (steps, verifications) uses the
            written-out softmax, so its rows keep one arithmetic.

    Returns:
        logits [B, T, V] in fp32 (and hidden states when asked).
    """
    c, w = model.config, model.weights
    b, t = input_ids.shape
    past = cache.length
    if positions is None:
        positions = torch.arange(past, past + t, device=input_ids.device)
    if mask is None:
        mask = causal_mask(past, t, device=input_ids.device)
    cos, sin = rope_cos_sin(c, positions, dtype=model.dtype)
    x = embed(model, input_ids)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        x = x + attention_layer(model, i, rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps), cos, sin, cache, mask,
                                fused=fused_attention)
        x = x + swiglu_mlp(rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps), w, p + "mlp.")
    x = rms_norm(x, w["norm.weight"], c.rms_norm_eps)
    logits = F.linear(x, w["lm_head.weight"]).float()
    return (logits, x) if return_hidden else logits


def forward(model: Model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [B, T, V] (fp32) with a causal mask and no cache kept (for tests)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    return forward_step(model, input_ids.to(model.device), new_cache(model, input_ids.shape[0]))
