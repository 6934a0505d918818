"""GLIDE drafting (LongSpec), the readable reference: one draft layer, chain and beam-tree speculation.

The draft model (docs/design.md §4) is ONE decoder layer on top of the target's frozen embedding
and lm_head::

    x = embed_target(tokens)
    x = x + SelfAttn(norm1(x))    # causal, sliding window over the draft's OWN K/V; q/k/v biased, o not
    x = x + CrossAttn(norm2(x))   # q (biased) + o only; keys/values ARE the target's last-layer cache
    x = x + MLP(norm3(x))         # SwiGLU
    logits = lm_head_target(x)    # no final norm

Visibility:

* self-attention: a query at position t sees draft keys at positions s with t - window < s <= t
  (among tree nodes: only its ancestors and itself);
* cross-attention: the target's last-layer K/V are used as stored (already rotated by RoPE at their
  positions); the draft query is rotated at its own position. A query at position t sees target
  positions < t; every node of a draft tree sees the verified prefix [0, L).

The draft's own cache is constant-size: :class:`GlideCache` keeps only the last ``window``
positions. Each round the draft first *catches up*: it runs the tokens emitted since its last
round (accepted drafts + the target's extra token, which is the new root) through the layer, so its
self-attention sees the real prefix. Draft tree nodes are never written to that cache (they live
in a per-round scratch list), so nothing needs rolling back.

A round (``tree_shape = (4, 16, 16, 16, 16)``):

1. catch up and run the root (position L): draft log-probs for the next token;
2. level 1 = the top ``tree_shape[0]`` tokens at the root;
3. level k + 1 = the best ``tree_shape[k]`` (node, token) pairs over ALL nodes of level k by
   cumulative draft log-probability (:func:`specdec.shared.glide.beam_level`), one draft forward
   per level (tree mask among draft nodes + window over the draft prefix + cross-attention over
   target [0, L));
4. the engine verifies root + all nodes in one target pass, accepts a path, compacts the KV
   of every target layer and adds one token (:func:`specdec.ref.engine.run_speculative`).

``spec_generate`` is the chain ``tree_shape = (1,) * gamma`` (each step the draft's argmax).

Sampling (temperature > 0): the candidates are *deterministic* (argmax / beam of the draft), so
the engine applies the deterministic-candidate tree rule (try children in order, accept child c with
probability p(c), else zero it and renormalise) -- exactly lossless; no draft ``q`` is needed.

A batch (docs/design.md §11): every row has its own :class:`GlideDrafter` (its own window cache),
drafts its tree from its own row of the target cache (a per-row loop), and the engine verifies
all rows' trees in one target pass, each over its own prefix length.

Keyed sampling (``sampling="keyed"``, temperature > 0): the beam is ranked by *perturbed* draft
scores -- the draft's processed log-probabilities plus the keyed noise of the position each
candidate token would take, keyed by the row's sequence id
(:func:`specdec.shared.keyed.perturbed_logprobs`; the root's children
at L + 1, a depth-d node's children at L + d + 1) -- so a chain is the draft's keyed choice at
every step, and the target accepts a draft iff it is its own keyed choice there: the output is
exactly vanilla keyed sampling's.

Truncated draft vocabulary (docs/design.md §12; :attr:`Glide.vocab_map`, N sorted target ids): the draft's
logits cover only those N tokens -- ``hidden @ lm_head_target[vocab_map]^T``, a sliced copy of the rows
kept with the draft (:func:`draft_lm_head`) -- the beam ranks draft ids, and each chosen draft id i
becomes the target token ``vocab_map[i]`` before it is embedded, drafted from or verified. In keyed
mode the noise added to draft id i is the noise of target token ``vocab_map[i]`` at that position, so
the draft still guesses the target's keyed choice whenever that token is among the N. Verification
is unchanged: still lossless.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from specdec.ref.attention import fused_masked_attention, masked_attention
from specdec.ref.engine import run_speculative
from specdec.ref.model import Model, embed, linear, rms_norm, swiglu_mlp
from specdec.shared.glide import GLIDE_WINDOW, Glide, GlideConfig, beam_level, load_glide_weights
from specdec.shared.keyed import perturbed_logprobs
from specdec.shared.result import GenerationResult
from specdec.shared.round import Draft, RoundRecord, RoundState
from specdec.shared.rope import apply_rope, rope_cos_sin
from specdec.shared import tree_search
from specdec.shared.tree import Tree, validate_tree_shape
from specdec.shared.tree_search import AcceptanceStats, CostModel

__all__ = [
    "Glide",
    "GlideConfig",
    "GlideCache",
    "load_glide",
    "check_glide_matches",
    "glide_layer",
    "glide_kv",
    "glide_logits",
    "draft_lm_head",
    "glide_full_forward",
    "window_mask",
    "GlideDrafter",
    "spec_generate",
    "tree_spec_generate",
    "DEFAULT_TREE_SHAPE",
    "resolve_tree_shape",
    "resolve_gamma",
    "device_cost_model",
    "measure_cost_model",
]

DEFAULT_TREE_SHAPE = tree_search.DEFAULT_TREE_SHAPE  # LongSpec's beam tree
"""LongSpec's beam: 68 drafts + root = 69 verified positions (``tree_shape=None`` means this)."""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_glide(path: str | os.PathLike, target: Model, window: int | None = None, dtype=None) -> Glide:
    """Load a GLIDE draft for ``target``: an HF-format dir (``sail/longspec-*`` layout) or a LongSpec
    training ``state_dict`` (.pth, ``draft_model.`` prefix and the like stripped). Shapes are checked
    against the target. Weights go to the target's device, in the target's dtype unless ``dtype``.
    A truncated draft vocabulary stored with it (:attr:`Glide.vocab_map`) is checked against the target
    and its lm_head rows are sliced once (:func:`draft_lm_head`)."""
    from specdec.shared.assets import resolve_model_path

    glide = load_glide_weights(resolve_model_path(path), target.config, dtype=dtype or target.dtype, device=target.device, window=window)
    draft_lm_head(target, glide)  # the sliced copy, kept with the draft (a no-op for the full vocabulary)
    return glide


def check_glide_matches(target: Model, glide: Glide) -> None:
    """Raise ValueError if the draft's sizes do not fit the target."""
    want = GlideConfig.from_target(target.config, glide.config.window)
    if want != glide.config:
        raise ValueError(f"GLIDE draft {glide.config} does not match the target, which needs {want}")


# ---------------------------------------------------------------------------------------------
# The draft layer
# ---------------------------------------------------------------------------------------------


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[..., T, S] bool: key position s is inside the causal window of query position t
    (``t - window < s <= t``). ``q_pos`` [..., T], ``k_pos`` [..., S]."""
    d = q_pos[..., :, None] - k_pos[..., None, :]
    return (d >= 0) & (d < window)


def glide_layer(
    target: Model,
    glide: Glide,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    past_k: torch.Tensor | None,
    past_v: torch.Tensor | None,
    self_mask: torch.Tensor,
    target_k: torch.Tensor,
    target_v: torch.Tensor,
    cross_mask: torch.Tensor,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft layer on new tokens, masks given explicitly (decoding, trees, training, tests).

    Args:
        input_ids: [B, T] new tokens; positions: [T] or [B, T] their RoPE positions.
        past_k, past_v: [B, Hkv, P, D] draft keys/values the new tokens may read (or None).
        self_mask: [T, P + T] or [B, T, P + T] bool over (past rows, new rows).
        target_k, target_v: [B, Hkv, N, D] the target's last-layer cache (post-RoPE), as stored.
        cross_mask: [T, N] or [B, T, N] bool over target rows.
        fused: both attentions through :func:`~specdec.ref.attention.fused_masked_attention` (the same
            function without the score tensors, rounded differently): the drafter's passes (catch-up and
            beam levels: drafts are only proposals) and training; the written-out form is the definition.

    Returns:
        (hidden [B, T, H] before the lm_head, k_new, v_new [B, Hkv, T, D] the new tokens' draft K/V).
    """
    c, w = glide.config, glide.weights
    cos, sin = rope_cos_sin(target.config, positions, dtype=glide.dtype)
    # 1. Embed with the target's frozen embedding (no target hidden states are used).
    x = embed(target, input_ids).to(glide.dtype)

    # 2. Self-attention over the draft's own (windowed) K/V; RoPE at the true positions.
    h = rms_norm(x, w["input_layernorm.weight"], c.rms_norm_eps)
    q = apply_rope(rearrange(linear(h, w, "self_attn.q_proj"), "b t (h d) -> b h t d", d=c.head_dim), cos, sin)
    k_new, v_new = _self_kv(glide, h, cos, sin)
    k = k_new if past_k is None else torch.cat([past_k.to(k_new.dtype), k_new], dim=2)
    v = v_new if past_v is None else torch.cat([past_v.to(v_new.dtype), v_new], dim=2)
    attend = fused_masked_attention if fused else masked_attention
    o = attend(q, k, v, self_mask)
    x = x + linear(rearrange(o, "b h t d -> b t (h d)"), w, "self_attn.o_proj")

    # 3. Cross-attention: only the query is projected (and rotated at its own position); keys and
    #    values are the target's last-layer cache exactly as stored.
    h = rms_norm(x, w["post_self_attention_layernorm.weight"], c.rms_norm_eps)
    q = apply_rope(rearrange(linear(h, w, "cross_attn.q_proj"), "b t (h d) -> b h t d", d=c.head_dim), cos, sin)
    o = attend(q, target_k, target_v, cross_mask)
    x = x + linear(rearrange(o, "b h t d -> b t (h d)"), w, "cross_attn.o_proj")

    # 4. SwiGLU MLP.
    x = x + swiglu_mlp(rms_norm(x, w["post_cross_attention_layernorm.weight"], c.rms_norm_eps), w, "mlp.")
    return x, k_new, v_new


def _self_kv(glide: Glide, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The self-attention keys (rotated) and values [B, Hkv, T, D] of normed inputs ``h`` [B, T, H]."""
    c, w = glide.config, glide.weights
    k = rearrange(linear(h, w, "self_attn.k_proj"), "b t (h d) -> b h t d", d=c.head_dim)
    v = rearrange(linear(h, w, "self_attn.v_proj"), "b t (h d) -> b h t d", d=c.head_dim)
    return apply_rope(k, cos, sin), v


def glide_kv(target: Model, glide: Glide, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft K/V of tokens ``input_ids`` [B, T] at ``positions`` -- exactly the ``k_new, v_new`` that
    :func:`glide_layer` returns for them. They are projections of the tokens' normed embeddings, so they
    depend on the tokens and positions alone: never on the draft's past or on the target's cache."""
    cos, sin = rope_cos_sin(target.config, positions, dtype=glide.dtype)
    x = embed(target, input_ids).to(glide.dtype)
    return _self_kv(glide, rms_norm(x, glide.weights["input_layernorm.weight"], glide.config.rms_norm_eps), cos, sin)


def draft_lm_head(target: Model, glide: Glide | None = None) -> torch.Tensor:
    """The output layer the draft uses: the target's lm_head [V, H], or with a truncated draft vocabulary
    its rows ``vocab_map`` [N, H] -- a sliced copy made once and kept with the draft (in ``glide.extras``,
    remembered together with the target lm_head it was cut from)."""
    lm_head = target.weights["lm_head.weight"]
    if glide is None or glide.vocab_map is None:
        return lm_head
    cached = glide.extras.get("draft_lm_head")
    if cached is None or cached[0] is not lm_head or cached[1] is not glide.vocab_map:
        cached = glide.extras["draft_lm_head"] = (lm_head, glide.vocab_map, lm_head[glide.vocab_map.to(lm_head.device)].clone())
    return cached[2]


def glide_logits(target: Model, hidden: torch.Tensor, glide: Glide | None = None) -> torch.Tensor:
    """The target's frozen lm_head on the draft's hidden states (no final norm) -> fp32 logits [..., V];
    with ``glide``'s truncated vocabulary only its N rows (:func:`draft_lm_head`) -> [..., N], column i
    being target token ``glide.vocab_map[i]``."""
    lm_head = draft_lm_head(target, glide)
    return F.linear(hidden.to(lm_head.dtype), lm_head).float()


def glide_full_forward(
    target: Model,
    glide: Glide,
    input_ids: torch.Tensor,
    target_k: torch.Tensor,
    target_v: torch.Tensor,
    positions: torch.Tensor | None = None,
    lag: int | torch.Tensor = 1,
    window: int | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Brute-force draft logits over whole sequences, no cache: the definition the incremental
    decoding must match, and the training forward.

    Query i (position ``positions[i]``) sees draft rows j with i - window < j <= i and target
    rows j <= i - lag (decoding = lag 1: target positions < t). ``lag`` is an int or a [B] tensor.
    ``target_k``/``target_v`` [B, Hkv, T, D] are the target's last-layer K/V over the same tokens.
    Returns logits [B, T, V] fp32 ([B, T, N] over the draft vocabulary when ``glide`` has one).
    ``fused``: attend through the fused kernel (training; see :func:`glide_layer`).
    """
    b, t = input_ids.shape
    dev = input_ids.device
    if positions is None:
        positions = torch.arange(t, device=dev)
    idx = torch.arange(t, device=dev)
    # Windowed causal self-attention mask (by index: the tokens are consecutive).
    self_mask = window_mask(idx, idx, glide.window if window is None else window)
    # Cross-attention: query i sees target rows j <= i - lag (lag per sequence).
    lag_t = torch.as_tensor(lag, device=dev).reshape(-1, 1, 1)
    cross_mask = (idx[None, :, None] - idx[None, None, :]) >= lag_t  # [B or 1, T, T]
    cross_mask = cross_mask.expand(b, t, t)
    hidden, _, _ = glide_layer(target, glide, input_ids, positions, None, None, self_mask, target_k, target_v, cross_mask,
                               fused=fused)
    return glide_logits(target, hidden, glide)


# ---------------------------------------------------------------------------------------------
# The draft's constant-size cache
# ---------------------------------------------------------------------------------------------


@dataclass
class GlideCache:
    """The draft's own K/V, at most ``window`` rows: k, v [1, Hkv, S, D] and their positions pos [S]."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    window: int

    @staticmethod
    def empty(glide: Glide) -> "GlideCache":
        c = glide.config
        z = torch.empty(1, c.num_kv_heads, 0, c.head_dim, dtype=glide.dtype, device=glide.device)
        return GlideCache(z, z.clone(), torch.empty(0, dtype=torch.long, device=glide.device), c.window)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Add rows, then drop all but the last ``window`` positions (older ones can never be read)."""
        self.k = torch.cat([self.k, k], dim=2)[:, :, -self.window:]
        self.v = torch.cat([self.v, v], dim=2)[:, :, -self.window:]
        self.pos = torch.cat([self.pos, pos])[-self.window:]


# ---------------------------------------------------------------------------------------------
# The drafter: catch-up, root, beam levels
# ---------------------------------------------------------------------------------------------


class GlideDrafter:
    """Proposes a GLIDE beam tree each round (a chain when every level keeps 1 node)."""

    def __init__(self, target: Model, glide: Glide, tree_shape: Sequence[int]):
        check_glide_matches(target, glide)
        self.target, self.glide = target, glide
        self.tree_shape = validate_tree_shape(tree_shape)
        self.cache = GlideCache.empty(glide)
        self.processed = 0  # positions [0, processed) are in the draft cache (or already out of its window)

    def _catch_up(self, tokens: list[int], target_k: torch.Tensor, target_v: torch.Tensor) -> torch.Tensor:
        """Bring the draft's cache up to the root L (positions emitted since last round, or the prompt) and
        run the root through the layer. Returns the root's hidden [H].

        Of the positions before the root only their draft K/V are ever read (the root's and later nodes'
        self-attention), and those depend on the tokens alone (:func:`glide_kv`): no cross-attention or MLP
        runs for them. Only the last ``window - 1`` can be read, so a long prompt costs one window."""
        dev, window = self.glide.device, self.glide.window
        L = len(tokens) - 1
        # 1. Draft K/V of positions [first, L): the ones the root's window reaches that are not cached yet.
        first = max(self.processed, L - window + 1)
        if first < L:
            pos = torch.arange(first, L, device=dev)
            ids = torch.tensor(tokens[first:L], dtype=torch.long, device=dev)[None]
            self.cache.append(*glide_kv(self.target, self.glide, ids, pos), pos)
        # 2. The root at position L: the whole layer. Self: the window over the cache and itself; cross: the
        #    verified prefix, every target position < L.
        pos = torch.tensor([L], device=dev)
        self_mask = window_mask(pos, torch.cat([self.cache.pos, pos]), window)
        cross_mask = torch.ones(1, L, dtype=torch.bool, device=dev)
        # (The draft only proposes, so the drafter's passes may take the fused attention.)
        h, k, v = glide_layer(self.target, self.glide, torch.tensor([[tokens[L]]], device=dev), pos, self.cache.k, self.cache.v,
                              self_mask, target_k, target_v, cross_mask, fused=True)
        self.cache.append(k, v, pos)
        self.processed = L + 1
        return h[0, -1]

    def _scores(self, logits: torch.Tensor, state: RoundState, position: int) -> torch.Tensor:
        """What the beam ranks for the tokens after a level's nodes [n, V] (or [n, N] over a truncated draft
        vocabulary): the draft's log-probs, or in keyed mode its processed log-probs plus the keyed noise of
        the children's ``position`` -- for draft id i the noise of target token ``vocab_map[i]``."""
        p = state.params
        if not p.keyed:
            return torch.log_softmax(logits, dim=-1)
        pos = torch.full(logits.shape[:1], position, dtype=torch.long, device=logits.device)
        if self.glide.vocab_map is None:
            return perturbed_logprobs(logits, p.temperature, p.top_k, p.top_p, p.seed, state.seq_id, pos)
        # a truncated vocabulary: draft id i gets the noise of target token vocab_map[i]
        return perturbed_logprobs(logits, p.temperature, p.top_k, p.top_p, p.seed, state.seq_id, pos,
                                  token_ids=self.glide.vocab_map)

    def _to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids -> target token ids (the identity without a truncated vocabulary)."""
        vmap = self.glide.vocab_map
        return draft_ids if vmap is None else vmap[draft_ids]

    def propose(self, state: RoundState) -> Draft:
        dev, window = self.glide.device, self.glide.window
        L = state.target_cache.length
        target_k, target_v = state.target_cache.k[-1], state.target_cache.v[-1]  # [1, Hkv, L, D], post-RoPE

        # 1. Catch up on the emitted tokens and run the root: draft log-probs for the next token.
        root_hidden = self._catch_up(state.tokens, target_k, target_v)
        logprobs = self._scores(glide_logits(self.target, root_hidden[None], self.glide), state, L + 1)  # [1, V or N]

        # No more levels than could still be emitted (the extra token always is).
        depth = min(len(self.tree_shape), state.max_drafts)
        tokens = [state.tokens[-1]]
        parents = [-1]
        level_nodes = [0]  # global indices of the current level (root)
        cum = torch.zeros(1, device=dev)
        tree_k = tree_v = None  # draft K/V of the nodes 1..M-1 of this round (scratch, not cached)
        tree_pos = torch.empty(0, dtype=torch.long, device=dev)  # their positions
        anc = torch.empty(0, 0, dtype=torch.bool, device=dev)  # ancestor-or-self among nodes 1..M-1
        for level in range(depth):
            # 2./3. Best (node, token) pairs over the whole level by cumulative log-probability.
            parent_local, new_ids, cum = beam_level(cum, logprobs, self.tree_shape[level])
            new_tokens = self._to_target(new_ids)  # draft ids -> target token ids
            first = len(tokens)
            parent_global = [level_nodes[int(i)] for i in parent_local]
            parents += parent_global
            tokens += new_tokens.tolist()
            level_nodes = list(range(first, len(tokens)))
            if level == depth - 1:
                break  # the last level needs no draft forward
            # Ancestor-or-self rows of the new nodes: their parent's row plus themselves.
            n = len(level_nodes)
            parent_rows = anc[torch.tensor(parent_global, device=dev) - 1] if level > 0 else torch.zeros(n, 0, dtype=torch.bool, device=dev)
            anc = torch.cat([torch.cat([anc, torch.zeros(anc.shape[0], n, dtype=torch.bool, device=dev)], dim=1),
                             torch.cat([parent_rows, torch.eye(n, dtype=torch.bool, device=dev)], dim=1)], dim=0)
            pos = torch.full((n,), L + level + 1, dtype=torch.long, device=dev)
            tree_pos = torch.cat([tree_pos, pos])
            # One draft forward over this level's nodes (all at position L + level + 1):
            #    self: window over the cached prefix (root included) + ancestors-or-self among the nodes
            self_mask = torch.cat([window_mask(pos, self.cache.pos, window), anc[first - 1:] & window_mask(pos, tree_pos, window)], dim=1)
            #    cross: every node sees the verified prefix [0, L)
            cross_mask = torch.ones(n, L, dtype=torch.bool, device=dev)
            past_k = self.cache.k if tree_k is None else torch.cat([self.cache.k, tree_k], dim=2)
            past_v = self.cache.v if tree_v is None else torch.cat([self.cache.v, tree_v], dim=2)
            #    (a draft pass, like the catch-up: it may take the fused attention)
            h, k, v = glide_layer(self.target, self.glide, new_tokens.to(dev)[None], pos, past_k, past_v, self_mask, target_k, target_v,
                                  cross_mask, fused=True)
            tree_k = k if tree_k is None else torch.cat([tree_k, k], dim=2)
            tree_v = v if tree_v is None else torch.cat([tree_v, v], dim=2)
            logprobs = self._scores(glide_logits(self.target, h[0], self.glide), state, L + level + 2)  # [n, V or N]

        return Draft(torch.tensor(tokens, dtype=torch.long), Tree.from_parents(parents))


# ---------------------------------------------------------------------------------------------
# "auto": the tree for this device (docs/design.md §12)
# ---------------------------------------------------------------------------------------------


def measure_cost_model(target: Model, glide: Glide, reps: int = 2, shapes: Sequence[Sequence[int]] | None = None,
                       max_gen_len: int = 24, prompt_length: int = 512) -> CostModel:
    """Time rounds of this path's :func:`tree_spec_generate` on the target's device (a random prompt of
    ``prompt_length`` tokens, greedy, the calibration shapes of
    :func:`specdec.shared.tree_search.calibration_shapes`) and fit a
    :class:`~specdec.shared.tree_search.CostModel`. About 20 s for the default model on one CPU thread."""
    c = target.config
    timer = tree_search.round_timer(lambda *a, **kw: tree_spec_generate(target, glide, *a, **kw), c.vocab_size,
                                    c.max_position_embeddings, stamps=True, max_gen_len=max_gen_len,
                                    prompt_length=prompt_length)
    shapes = tree_search.calibration_shapes(c.vocab_size) if shapes is None else shapes
    timer((1,))  # warm-up (allocator, first-call overheads)
    meta = {"path": "ref", "device": tree_search.device_description(target.device), "dtype": str(target.dtype), "reps": reps,
            "prompt_length": prompt_length}
    return tree_search.measure_cost_model(timer, shapes, reps=reps, meta=meta)


def device_cost_model(target: Model, glide: Glide, cache: bool = True) -> CostModel:
    """:func:`measure_cost_model`, once per process and (``cache``) per device and model in
    ``$XDG_CACHE_HOME/specdec/cost_models.json`` (:func:`specdec.shared.tree_search.cached_cost_model`)."""
    extra = () if glide.vocab_map is None else ({"draft_vocab": glide.draft_vocab_size},)  # a smaller lm_head costs less
    key = tree_search.cost_cache_key("ref.glide", target.device, target.dtype, target.config, glide.config, *extra)
    return tree_search.cached_cost_model(key, lambda: measure_cost_model(target, glide), cache=cache)


def resolve_tree_shape(target: Model, glide: Glide, tree_shape: Sequence[int] | str | None = "auto",
                       stats: AcceptanceStats | None = None, cost: CostModel | None = None, cache: bool = True) -> tuple[int, ...]:
    """The concrete beam shape :func:`tree_spec_generate` runs for ``tree_shape``: a shape is validated,
    None is :data:`DEFAULT_TREE_SHAPE`, ``"auto"`` is the shape with the most expected tokens per second
    (:func:`specdec.shared.tree_search.best_tree_shape`) under ``stats`` (default: the draft's measured
    :attr:`Glide.acceptance`, else :data:`~specdec.shared.tree_search.DEFAULT_PRIOR`) and ``cost`` (default:
    :func:`device_cost_model`), with at most 127 draft nodes."""
    if tree_search.is_auto("tree_shape", tree_shape):
        check_glide_matches(target, glide)
    return tree_search.choose_tree_shape(tree_shape, glide, glide.draft_vocab_size, stats, cost,
                                         lambda: device_cost_model(target, glide, cache=cache))


def resolve_gamma(target: Model, glide: Glide, gamma: int | str = "auto", stats: AcceptanceStats | None = None,
                  cost: CostModel | None = None, cache: bool = True) -> int:
    """The chain length :func:`spec_generate` runs for ``gamma``: an int is checked, ``"auto"`` is
    :func:`specdec.shared.tree_search.best_gamma` (stats and cost as in :func:`resolve_tree_shape`)."""
    if tree_search.is_auto("gamma", gamma):
        check_glide_matches(target, glide)
    return tree_search.choose_gamma(gamma, glide, stats, cost, lambda: device_cost_model(target, glide, cache=cache))


# ---------------------------------------------------------------------------------------------
# Public decoders
# ---------------------------------------------------------------------------------------------


def tree_spec_generate(
    target: Model,
    glide: Glide,
    input_ids: torch.Tensor,
    prompt_length: int,
    tree_shape: Sequence[int] | str | None = (4, 16, 16, 16, 16),
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """GLIDE beam-tree speculative decoding (LongSpec). ``tree_shape`` = nodes per level
    (None = the default ``(4, 16, 16, 16, 16)``: 68 drafts + root = 69 verified positions; ``"auto"`` = the
    shape with the most expected tokens per second on this device, :func:`resolve_tree_shape`; the
    result's ``tree_shape`` says which shape ran).

    Lossless: greedy output equals :func:`specdec.ref.vanilla_generate`; with temperature > 0 the
    deterministic-candidate rule keeps the target distribution exactly; ``sampling="keyed"`` with a
    ``seed`` gives exactly vanilla's keyed tokens (the beam ranked by keyed-perturbed draft scores).
    Returns a :class:`GenerationResult` (unpacks as ``output_ids, count, num, elapsed_time, spec_mask``).
    """
    shape = resolve_tree_shape(target, glide, tree_shape)
    GlideDrafter(target, glide, shape)  # check the draft against the target before anything runs
    # One drafter per row of the batch: each keeps its own window cache of draft K/V.
    res = run_speculative(target, lambda: GlideDrafter(target, glide, shape), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                          generator, method="tree_spec_generate", on_round=on_round, sampling=sampling, seed=seed)
    res.tree_shape = shape
    return res


def spec_generate(
    target: Model,
    glide: Glide,
    input_ids: torch.Tensor,
    prompt_length: int,
    gamma: int | str = 4,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """GLIDE chain speculative decoding: ``gamma`` drafts per round, each the draft's argmax (keyed:
    the draft's keyed choice) -- the beam tree with ``tree_shape = (1,) * gamma``; ``gamma="auto"``: the
    chain length with the most expected tokens per second on this device (:func:`resolve_gamma`);
    verification, ``sampling`` and ``seed`` as in :func:`tree_spec_generate`."""
    gamma = resolve_gamma(target, glide, gamma)
    GlideDrafter(target, glide, (1,) * gamma)  # check the draft against the target before anything runs
    res = run_speculative(target, lambda: GlideDrafter(target, glide, (1,) * gamma), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                          generator, method="spec_generate", on_round=on_round, sampling=sampling, seed=seed)
    res.tree_shape = (1,) * gamma
    return res


__all__ += ["GLIDE_WINDOW"]
