"""Fast GLIDE (LongSpec) decoding: the draft layer on Triton kernels with a constant-size cache.

Same algorithm as :mod:`specdec.ref.glide` (read that file for the steps) and token-identical
greedy output; what changes is where the numbers live:

* :class:`FastGlide` -- the draft layer's weights fused once (``wqkv`` for self-attention,
  ``w13`` for the MLP);
* :class:`SlidingCache` -- the draft's own K/V in ONE buffer of ``2 * window + MAX_TREE_NODES``
  rows whatever the context length: row ``r`` holds position ``base + r``; when the prefix would
  overflow ``2 * window`` rows, the last ``window`` rows are moved to the front (one copy every
  ``window`` tokens) and ``base`` advances. Tree nodes of the current round sit right after the
  prefix rows and are simply overwritten next round;
* self-attention: :func:`specdec.fast.kernels.glide_self_attention` (sliding window over the
  prefix rows + the tree block with its ancestor mask), cross-attention:
  :func:`specdec.fast.kernels.glide_cross_attention` over the target's last-layer cache (split over
  its length; per-query bound = own position while catching up, the verified length ``L`` for
  tree nodes);
* verification, acceptance and compaction: :func:`specdec.fast.engine.run_speculative_fast`, the
  tree padded to ``1 + sum(tree_shape)`` nodes so one CUDA graph serves every round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from specdec.fast.engine import run_speculative_fast
from specdec.fast.model import MAX_TREE_NODES, FastModel, as_fast_model, rms_norm
from specdec.ref.engine import Draft, RoundRecord, RoundState
from specdec.shared.glide import Glide, GlideConfig, beam_level, load_glide_weights
from specdec.shared.result import GenerationResult
from specdec.shared.rope import rope_cos_sin
from specdec.shared.tree import Tree, tree_shape_num_nodes, validate_tree_shape
from specdec.shared.validate import check_positive_int

__all__ = ["FastGlide", "SlidingCache", "as_fast_glide", "load_glide", "spec_generate", "tree_spec_generate"]


def _kernels():
    from specdec.fast import kernels

    return kernels


@dataclass
class FastGlide:
    """The GLIDE draft layer prepared for the fast path (see :func:`as_fast_glide`)."""

    config: GlideConfig
    w: dict[str, torch.Tensor]
    source: str = ""

    @property
    def window(self) -> int:
        return self.config.window

    @property
    def device(self) -> torch.device:
        return self.w["wqkv"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.w["wqkv"].dtype


def as_fast_glide(glide) -> FastGlide:
    """Fuse a :class:`~specdec.shared.glide.Glide`'s weights (a FastGlide passes through)."""
    if isinstance(glide, FastGlide):
        return glide
    if not isinstance(glide, Glide):
        raise TypeError(f"expected a GLIDE draft (specdec load_glide), got {type(glide).__name__}")
    w = glide.weights
    fw = {
        "wqkv": torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]]),
        "bqkv": torch.cat([w["self_attn.q_proj.bias"], w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"]]),
        "wo": w["self_attn.o_proj.weight"],
        "wq_x": w["cross_attn.q_proj.weight"],
        "bq_x": w["cross_attn.q_proj.bias"],
        "wo_x": w["cross_attn.o_proj.weight"],
        "w13": torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]),
        "w2": w["mlp.down_proj.weight"],
        "norm1": w["input_layernorm.weight"],
        "norm2": w["post_self_attention_layernorm.weight"],
        "norm3": w["post_cross_attention_layernorm.weight"],
    }
    return FastGlide(glide.config, fw, glide.source)


def load_glide(path: str | os.PathLike, target, window: int | None = None, dtype=None) -> FastGlide:
    """Load a GLIDE draft for a fast ``target`` (HF-format dir or LongSpec ``.pth``); same formats as
    :func:`specdec.ref.load_glide`."""
    from specdec.shared.assets import resolve_model_path

    fm = as_fast_model(target)
    g = load_glide_weights(resolve_model_path(path), fm.config, dtype=dtype or fm.dtype, device=fm.device, window=window)
    return as_fast_glide(g)


class SlidingCache:
    """The draft's constant-size K/V buffer: ``[1, Hkv, 2 * window + MAX_TREE_NODES, D]``.

    Rows ``[0, n)`` hold positions ``[base, base + n)`` of the verified sequence (the last ones the
    window can still reach); the rows after them are scratch for the current tree.
    """

    def __init__(self, glide: FastGlide):
        c = glide.config
        self.window = glide.window
        rows = 2 * self.window + MAX_TREE_NODES
        self.k = torch.zeros(1, c.num_kv_heads, rows, c.head_dim, dtype=glide.dtype, device=glide.device)
        self.v = torch.zeros_like(self.k)
        self.n = 0
        self.base = 0

    def make_room(self, count: int) -> None:
        """Ensure ``count`` more prefix rows fit in ``2 * window`` rows by dropping unreachable ones."""
        if self.n + count <= 2 * self.window:
            return
        keep = min(self.n, self.window)  # the next query can only see the last `window` positions
        drop = self.n - keep
        self.k[:, :, :keep] = self.k[:, :, drop : self.n].clone()
        self.v[:, :, :keep] = self.v[:, :, drop : self.n].clone()
        self.n, self.base = keep, self.base + drop


def glide_layer(fm: FastModel, g: FastGlide, cache: SlidingCache, tokens: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor, q_rows: torch.Tensor, target_k: torch.Tensor, target_v: torch.Tensor, kv_bound,
                tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The draft layer on new tokens [1, T]; matches :func:`specdec.ref.glide.glide_layer` with the
    masks the reference builds. Returns hidden [1, T, H].

    * K/V of the new tokens are written to buffer ``rows`` [T];
    * self-attention: query i sees prefix rows in ``(q_rows[i] - window, q_rows[i]]`` (row = position -
      base); with ``tree_mask`` [1, T, n_tree] the prefix part is cut at ``cache.n`` and the tree
      block (rows ``[cache.n, cache.n + n_tree)``) is masked by ancestry;
    * cross-attention: query i sees target rows ``[0, kv_bound)`` (an int, or [1, T]).
    """
    kern = _kernels()
    c = g.config
    cos, sin = rope_cos_sin(fm.config, positions, dtype=g.dtype)  # [T, D], true positions
    cos, sin = cos[None, None], sin[None, None]
    half = c.head_dim // 2

    def rope(x):
        return (x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin).to(x.dtype)

    x = F.embedding(tokens, fm.w["embed"]).to(g.dtype)  # the target's frozen embedding
    # 1. Self-attention over the sliding cache (+ the tree block).
    h = rms_norm(x, g.w["norm1"], c.rms_norm_eps)
    dq, dkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    q, k, v = F.linear(h, g.w["wqkv"], g.w["bqkv"]).split([dq, dkv, dkv], dim=-1)
    q = rope(rearrange(q, "b t (h d) -> b h t d", d=c.head_dim))
    k = rope(rearrange(k, "b t (h d) -> b h t d", d=c.head_dim))
    v = rearrange(v, "b t (h d) -> b h t d", d=c.head_dim)
    cache.k[0].index_copy_(1, rows, k[0])
    cache.v[0].index_copy_(1, rows, v[0])
    if tree_mask is None:
        o = kern.glide_self_attention(q, cache.k, cache.v, q_rows, g.window)
    else:
        o = kern.glide_self_attention(q, cache.k, cache.v, q_rows, g.window, tree_mask=tree_mask, tree_start=cache.n)
    x = x + F.linear(rearrange(o, "b h t d -> b t (h d)"), g.w["wo"])
    # 2. Cross-attention over the target's last-layer cache, as stored (query projected + rotated only).
    h = rms_norm(x, g.w["norm2"], c.rms_norm_eps)
    q = rope(rearrange(F.linear(h, g.w["wq_x"], g.w["bq_x"]), "b t (h d) -> b h t d", d=c.head_dim))
    o = kern.glide_cross_attention(q, target_k, target_v, kv_bound)
    x = x + F.linear(rearrange(o, "b h t d -> b t (h d)"), g.w["wo_x"])
    # 3. SwiGLU MLP.
    h = rms_norm(x, g.w["norm3"], c.rms_norm_eps)
    gate, up = F.linear(h, g.w["w13"]).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, g.w["w2"])


class FastGlideDrafter:
    """GLIDE beam trees (chains when every level keeps one node) on the fast path."""

    def __init__(self, target: FastModel, glide: FastGlide, tree_shape: Sequence[int]):
        want = GlideConfig.from_target(target.config, glide.config.window)
        if want != glide.config:
            raise ValueError(f"GLIDE draft {glide.config} does not match the target, which needs {want}")
        self.target, self.glide = target, glide
        self.tree_shape = validate_tree_shape(tree_shape)
        self.cache = SlidingCache(glide)
        self.processed = 0

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden.to(self.target.dtype), self.target.w["lm_head"]).float()  # no final norm
        return torch.log_softmax(logits, dim=-1)

    def _catch_up(self, tokens: list[int], target_k, target_v) -> torch.Tensor:
        """Run positions [processed, L] through the layer (chunks of <= window). Root hidden [H]."""
        dev, window, cache = self.glide.device, self.glide.window, self.cache
        L = len(tokens) - 1
        hidden = None
        for start in range(self.processed, L + 1, window):
            stop = min(start + window, L + 1)
            cache.make_room(stop - start)
            pos = torch.arange(start, stop, device=dev)
            rows = pos - cache.base
            ids = torch.tensor(tokens[start:stop], dtype=torch.long, device=dev)[None]
            h = glide_layer(self.target, self.glide, cache, ids, pos, rows, rows, target_k, target_v, pos.to(torch.int32)[None])
            cache.n = stop - cache.base
            hidden = h[0, -1]
        self.processed = L + 1
        return hidden

    def propose(self, state: RoundState) -> Draft:
        dev, cache = self.glide.device, self.cache
        L = state.target_cache.length
        target_k = state.target_cache.k[-1]  # [1, Hkv, capacity, D]: rows [0, L) are verified
        target_v = state.target_cache.v[-1]
        # 1. Catch up and run the root.
        root_hidden = self._catch_up(state.tokens, target_k, target_v)
        logprobs = self._logprobs(root_hidden[None])
        depth = min(len(self.tree_shape), max(state.budget - 1, 0))
        token_chunks = [torch.tensor([state.tokens[-1]], dtype=torch.long, device=dev)]
        parents = [-1]
        level_nodes = [0]
        cum = torch.zeros(1, device=dev)
        n_tree = sum(self.tree_shape[: max(depth - 1, 0)])
        anc = torch.zeros(max(n_tree, 1), max(n_tree, 1), dtype=torch.bool, device=dev)
        for level in range(depth):
            # 2. Best (node, token) pairs over the whole level (shared rule).
            parent_local, new_tokens, cum = beam_level(cum, logprobs, self.tree_shape[level])
            first = len(parents)
            parent_global = [level_nodes[i] for i in parent_local.tolist()]
            parents += parent_global
            token_chunks.append(new_tokens)
            level_nodes = list(range(first, len(parents)))
            if level == depth - 1:
                break
            # 3. One draft forward over this level's nodes (tree rows follow the prefix rows).
            n = len(level_nodes)
            lo = first - 1  # row offset of this level inside the tree block (root excluded)
            if level > 0:
                anc[lo : lo + n, :lo] = anc[torch.tensor(parent_global, device=dev) - 1, :lo]
            anc[lo : lo + n, lo : lo + n] = torch.eye(n, dtype=torch.bool, device=dev)
            pos = torch.full((n,), L + level + 1, dtype=torch.long, device=dev)
            rows = torch.arange(cache.n + lo, cache.n + lo + n, device=dev)
            q_rows = torch.full((n,), cache.n - 1 + level + 1, dtype=torch.long, device=dev)  # row coordinate of position L + level + 1
            h = glide_layer(self.target, self.glide, cache, new_tokens.to(dev)[None], pos, rows, q_rows,
                            target_k, target_v, L, tree_mask=anc[lo : lo + n, : lo + n][None])
            logprobs = self._logprobs(h[0])
        return Draft(torch.cat(token_chunks), Tree.from_parents(parents))


def tree_spec_generate(
    target,
    glide,
    input_ids: torch.Tensor,
    prompt_length: int,
    tree_shape: Sequence[int] | None = (4, 16, 16, 16, 16),
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.tree_spec_generate` (at most 127 draft nodes on the fast path)."""
    shape = validate_tree_shape((4, 16, 16, 16, 16) if tree_shape is None else tree_shape)
    size = tree_shape_num_nodes(shape)
    if size > MAX_TREE_NODES:
        raise ValueError(f"tree_shape {list(shape)} has {size} nodes; the fast path verifies at most {MAX_TREE_NODES}")
    fm = as_fast_model(target)
    drafter = FastGlideDrafter(fm, as_fast_glide(glide), shape)
    return run_speculative_fast(fm, drafter, input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="tree_spec_generate", tree_size=size, on_round=on_round)


def spec_generate(
    target,
    glide,
    input_ids: torch.Tensor,
    prompt_length: int,
    gamma: int = 4,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.spec_generate` (``gamma`` <= 127 on the fast path)."""
    check_positive_int("gamma", gamma)
    if gamma + 1 > MAX_TREE_NODES:
        raise ValueError(f"gamma must be <= {MAX_TREE_NODES - 1} on the fast path, got {gamma}")
    fm = as_fast_model(target)
    drafter = FastGlideDrafter(fm, as_fast_glide(glide), (1,) * gamma)
    return run_speculative_fast(fm, drafter, input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="spec_generate", tree_size=gamma + 1, on_round=on_round)
