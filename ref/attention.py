"""Attention, written out: the masked attention every layer uses, and tree attention.

``tree_attention`` is the operation speculative verification needs (docs/design.md §6):

    q     [B, Hq,  M, D]   the M tree nodes' queries
    k, v  [B, Hkv, N, D]   rows [0, prefix_len) = the verified prefix,
                           rows [prefix_len, prefix_len + M) = the M tree nodes
    tree_mask [B, M, M]    bool, True = node i may attend to node j (ancestor or self)
    prefix_len             int, or a [B] integer tensor (ragged batch)
    ->    [B, Hq, M, D]

Every node sees the whole prefix. GQA: ``Hq`` is a multiple of ``Hkv``; query head ``h`` reads
KV head ``h // (Hq // Hkv)``.

It is written twice, and the tests check both agree:

(a) :func:`tree_attention_full` -- the definition: one softmax over the concatenated scores with
    the full mask;
(b) :func:`tree_attention_merged` -- what the Triton kernel does: attention over the prefix and
    over the tree separately, each returning (output, lse), merged exactly by

        o = sigmoid(lse1 - lse2) * o1 + sigmoid(lse2 - lse1) * o2

    All log-sum-exps here are natural logs.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange, repeat

__all__ = [
    "masked_attention",
    "fused_masked_attention",
    "tree_attention",
    "tree_attention_full",
    "tree_attention_merged",
    "attention_with_lse",
    "merge_attention",
    "check_tree_attention_args",
]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """Plain attention with an arbitrary boolean mask, GQA aware.

    q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B, T, S] or [T, S] (True = attend) -> [B, Hq, T, D].
    Softmax is computed in fp32. A row with no visible key returns zeros.
    """
    out, _ = attention_with_lse(q, k, v, mask, sm_scale)
    return out


def fused_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """:func:`masked_attention`, evaluated by torch's fused ``scaled_dot_product_attention``.

    The same function (same shapes, GQA, a row with no visible key returns zeros), but the kernel never
    holds the [B, Hq, T, S] score tensor: a prompt of 7.4k tokens costs ~0.35 s per layer on two CPU
    cores instead of ~2.5 s (and ~1 GB of scores). The rounding differs from the explicit softmax
    (fp32: ~1e-6), so the reference uses it only where no exactness rule looks (the prefill, every
    pass of a drafter, GLIDE training: docs/design.md §6 lists them). Every decode-phase pass of the
    target -- steps and verifications -- keeps :func:`masked_attention`.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    gqa = hq != hkv        # the kernel reads KV head h // (Hq // Hkv) itself: K and V are never copied per query head
    t, s = q.shape[2], k.shape[2]
    if bool(mask.all()):
        # A mask that hides nothing (a drafter's query over the whole verified prefix): no mask at all, so the
        # kernel adds none (README command 1 on a CPU: +2-3 %, BENCHMARKS "Session 23: README command 1 on another
        # 2-core CPU").
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=sm_scale, enable_gqa=gqa)
        return out.to(q.dtype)
    if t == s and torch.equal(mask, torch.ones(t, s, dtype=torch.bool, device=mask.device).tril().expand_as(mask)):
        # A plain causal mask (one prompt, or prompts of one length): the kernel's own causal mode skips
        # the key tiles above the diagonal (~3x faster than the same mask given as a tensor).
        out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, scale=sm_scale,
                                                               enable_gqa=gqa)
        return out.to(q.dtype)
    # SDPA has no defined output for a row with no visible key: give such a row one visible (zeroed)
    # key so the kernel stays finite, then zero the row as masked_attention does.
    empty = ~mask.any(dim=-1)                                                    # [B, T]
    safe = mask.clone()
    safe[..., 0] |= empty
    unseen = ~mask.any(dim=-2)[:, None, :, None]                                 # keys no row may see
    if unseen.any():                                                             # (e.g. padding) carry nothing
        k, v = k.masked_fill(unseen, 0), v.masked_fill(unseen, 0)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=safe[:, None], scale=sm_scale, enable_gqa=gqa)
    out = out.masked_fill(empty[:, None, :, None], 0)
    return out.to(q.dtype)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sm_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention that also returns the natural-log LSE of the scaled scores.

    Returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] fp32). A fully masked row has
    out = 0 and lse = -inf, so it carries zero weight when merged.
    """
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    # 1. Group the query heads by the KV head they read (GQA: groups of Hq // Hkv query heads share one),
    #    so K and V are used as stored, never copied per query head.
    qg = rearrange(q.float(), "b (h g) t d -> b h g t d", g=hq // hkv)
    # 2. Scores in fp32, masked to -inf where the mask forbids.
    scores = torch.einsum("bhgtd,bhsd->bhgts", qg, k.float()) * scale
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    scores = scores.masked_fill(~rearrange(mask, "b t s -> b 1 1 t s"), float("-inf"))
    # Keys no query may see (e.g. unused cache rows of a ragged batch) must not leak NaN/inf via 0 * v.
    unseen = ~mask.any(dim=-2)                                                   # [B, S]
    v = v.float()
    if unseen.any():
        v = v.masked_fill(rearrange(unseen, "b s -> b 1 s 1"), 0)
    # 3. Log-sum-exp per row and the normalised weights (a fully masked row gets weight 0).
    lse = torch.logsumexp(scores, dim=-1)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(scores - safe_lse[..., None])
    out = torch.einsum("bhgts,bhsd->bhgtd", weights, v)
    out = rearrange(out, "b h g t d -> b (h g) t d")
    return out.to(q.dtype), rearrange(lse, "b h g t -> b (h g) t")


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets into one, exactly.

    o = sigmoid(lse1 - lse2) * o1 + sigmoid(lse2 - lse1) * o2, lse = logaddexp(lse1, lse2).
    -inf on either side is handled (that side gets weight 0).
    """
    w1 = torch.sigmoid(lse1 - lse2)
    w2 = torch.sigmoid(lse2 - lse1)
    # sigmoid(-inf - -inf) is nan: both sides empty -> both weights 0.
    w1 = torch.nan_to_num(w1, nan=0.0)
    w2 = torch.nan_to_num(w2, nan=0.0)
    o = w1[..., None] * o1.float() + w2[..., None] * o2.float()
    return o.to(o1.dtype), torch.logaddexp(lse1, lse2)


def check_tree_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len, tree_mask: torch.Tensor) -> torch.Tensor:
    """Validate the tree_attention contract; return ``prefix_len`` as a [B] long tensor on q's device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, len, D], got shape {tuple(t.shape)}")
    b, hq, m, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}: need [B={b}, Hkv, N, D={d}]")
    hkv, n = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv} (grouped-query attention)")
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
        raise TypeError("tree_mask must be a bool tensor [B, M, M]")
    if tuple(tree_mask.shape) != (b, m, m):
        raise ValueError(f"tree_mask must have shape [B, M, M] = {[b, m, m]}, got {list(tree_mask.shape)}")
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dim() != 1 or prefix_len.shape[0] != b:
            raise ValueError(f"prefix_len tensor must have shape [B] = [{b}], got {list(prefix_len.shape)}")
        if prefix_len.dtype.is_floating_point or prefix_len.dtype == torch.bool:
            raise TypeError("prefix_len tensor must hold integers")
        plen = prefix_len.to(device=q.device, dtype=torch.long)
        lo, hi = int(plen.min()), int(plen.max())
    else:
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
            raise TypeError(f"prefix_len must be an int or a [B] tensor, got {type(prefix_len).__name__}")
        lo = hi = prefix_len
        plen = torch.full((b,), prefix_len, dtype=torch.long, device=q.device)
    if lo < 0 or hi + m > n:
        raise ValueError(f"prefix_len must be in [0, N - M] = [0, {n - m}] so the M={m} tree rows fit in k/v (N={n}); got range [{lo}, {hi}]")
    return plen


def _prefix_and_tree_masks(plen: torch.Tensor, tree_mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [B, M, N] masks selecting the prefix rows and the tree rows of k/v for every node."""
    b, m, _ = tree_mask.shape
    cols = torch.arange(n, device=tree_mask.device)
    # Prefix part: node i sees columns [0, prefix_len[b]).
    prefix = (cols[None, :] < plen[:, None])  # [B, N]
    prefix = repeat(prefix, "b n -> b m n", m=m)
    # Tree part: node i sees column prefix_len[b] + j when tree_mask[b, i, j].
    tree = torch.zeros(b, m, n, dtype=torch.bool, device=tree_mask.device)
    idx = plen[:, None] + torch.arange(m, device=tree_mask.device)[None, :]  # [B, M] column of each node
    tree.scatter_(2, repeat(idx, "b j -> b i j", i=m), tree_mask)
    return prefix, tree


def tree_attention_full(q, k, v, prefix_len, tree_mask, sm_scale: float | None = None) -> torch.Tensor:
    """(a) The definition: one softmax over [prefix | tree] with the combined mask."""
    plen = check_tree_attention_args(q, k, v, prefix_len, tree_mask)
    prefix, tree = _prefix_and_tree_masks(plen, tree_mask, k.shape[2])
    return masked_attention(q, k, v, prefix | tree, sm_scale)


def tree_attention_merged(q, k, v, prefix_len, tree_mask, sm_scale: float | None = None) -> torch.Tensor:
    """(b) What the kernel does: prefix attention and tree attention separately, merged by LSE."""
    plen = check_tree_attention_args(q, k, v, prefix_len, tree_mask)
    prefix, tree = _prefix_and_tree_masks(plen, tree_mask, k.shape[2])
    # 1. Prefix part: every node against the verified prefix (no mask inside the prefix).
    o1, lse1 = attention_with_lse(q, k, v, prefix, sm_scale)
    # 2. Tree part: every node against the tree rows, ancestor-or-self only.
    o2, lse2 = attention_with_lse(q, k, v, tree, sm_scale)
    # 3. Exact merge of the two softmaxes: weights are sigmoid of the LSE difference.
    out, _ = merge_attention(o1, lse1, o2, lse2)
    return out


def tree_attention(q, k, v, prefix_len, tree_mask, sm_scale: float | None = None) -> torch.Tensor:
    """Masked tree attention (reference). See the module docstring for shapes.

    Uses the split-and-merge formulation (b); :func:`tree_attention_full` is the definition it is
    tested against.
    """
    return tree_attention_merged(q, k, v, prefix_len, tree_mask, sm_scale)
