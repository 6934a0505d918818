"""The GLIDE draft layer on new tokens, on the fast path's kernels: :func:`glide_layer`.

Self-attention over the draft's :class:`~specdec.fast.glide.cache.SlidingCache` (+ the round's tree
block), cross-attention over the target's last-layer cache, SwiGLU MLP; which keys each query sees
comes in a :class:`~specdec.fast.glide.cache.GlideBounds`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from specdec.fast.glide.cache import GlideBounds, SlidingCache
from specdec.fast.glide.weights import FastGlide
from specdec.fast.model import FastModel, _cos_sin, _kernels

# Most bytes one row-wise GEMV call of the GLIDE draft layer may re-read over all rows of a call
# (rows x weight bytes). Chosen on the embedded default model on an H100 (BENCHMARKS "GPU, session 7"): at 4 MiB its 5-row chain
# verifications and 4-row draft levels take the GEMVs (GLIDE chain 1.47x at 0 MiB, 1.78x at 4 MiB in
# one comparison); at 48 MiB its 69-row tree verification did too (35 MiB of L2 reads per w13 call)
# and the tree fell from 1.77x to 1.35x.
GEMV_ROWS_MAX_BYTES = 4 << 20


def _gemv_rows_ok(weights: Iterable[torch.Tensor], rows: int, device: torch.device) -> bool:
    """Project ``rows`` token rows through norm-folding GEMVs (:mod:`.kernels.gemv`) rather than
    norm kernels + GEMMs? One row always (a pure weight stream); several only on CUDA and only when
    ``rows`` x the largest of ``weights`` (bytes) stays within :data:`GEMV_ROWS_MAX_BYTES` (each row
    re-reads the weight: a few-hundred-KB weight, from L2)."""
    if rows == 1:
        return True
    if device.type != "cuda":
        return False
    return rows * max(t.numel() * t.element_size() for t in weights) <= GEMV_ROWS_MAX_BYTES


__all__ = ["glide_layer", "glide_kv_write"]


def _use_gemv(g: FastGlide, tokens: torch.Tensor) -> bool:
    """Does a :func:`glide_layer` call on ``tokens`` [B, T] take the per-row GEMVs (one sequence, weights
    small enough to re-read per row) rather than norm kernels + GEMMs?"""
    weights = [g.w[n] for n in ("wqkv", "wo", "wq_x", "wo_x", "w13", "w2")]
    return tokens.shape[0] == 1 and _gemv_rows_ok(weights, tokens.numel(), tokens.device)


def _qkv_write(fm: FastModel, g: FastGlide, cache: SlidingCache, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rows: torch.Tensor, gemv: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's first projection: normed embeddings -> q (rotated, returned) and K/V (rotated, written to
    buffer rows ``rows`` of ``cache``). Returns ``(q, x)``, x the embeddings (the residual stream).

    The embedding is the target's frozen one (the ids come from the round's own pack or beam kernels: no
    host-side range check)."""
    kern = _kernels()
    eps = g.config.rms_norm_eps
    if gemv and fm.w["embed"].dtype == g.dtype:   # one GEMV with the embedding lookup and the norm folded in,
        # which also does RoPE and the K/V write, and writes the embeddings (the residual stream)
        return kern.embed_gemv_qkv_rope(tokens, fm.w["embed"], g.w["wqkv"], g.w["bqkv"], cos, sin, cache.k, cache.v,
                                        rows, norm_weight=g.w["norm1"], eps=eps, check_rows=False)
    if gemv:
        x = F.embedding(tokens, fm.w["embed"]).to(g.dtype)
        return kern.gemv_qkv_rope(x, g.w["wqkv"], g.w["bqkv"], cos, sin, cache.k, cache.v, rows,
                                  norm_weight=g.w["norm1"], eps=eps, check_rows=False), x
    h, x = kern.embed_rms_norm(tokens, fm.w["embed"], g.w["norm1"], eps, dtype=g.dtype, check_ids=False)
    return kern.rope_qkv_write(F.linear(h, g.w["wqkv"], g.w["bqkv"]), cos, sin, cache.k, cache.v, rows, check_rows=False), x


def glide_kv_write(fm: FastModel, g: FastGlide, cache: SlidingCache, tokens: torch.Tensor, positions: torch.Tensor,
                   rows: torch.Tensor) -> None:
    """Write the draft K/V of ``tokens`` [1, T] at ``positions`` [T] to buffer rows ``rows`` [1, T] (int32) of
    ``cache`` -- the very values :func:`glide_layer` writes for them (the same kernels, chosen by the same
    rule), without the rest of the layer. Matches :func:`specdec.ref.glide.glide_kv`: the K/V depend on the
    tokens and positions alone."""
    cos, sin = _cos_sin(fm, positions)
    cos, sin = cos[None].to(g.dtype), sin[None].to(g.dtype)
    _qkv_write(fm, g, cache, tokens, cos, sin, rows, _use_gemv(g, tokens))


def glide_layer(fm: FastModel, g: FastGlide, cache: SlidingCache, tokens: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor, target_k: torch.Tensor, target_v: torch.Tensor, bounds: GlideBounds,
                tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The draft layer on new tokens [B, T]; matches :func:`specdec.ref.glide.glide_layer` with the
    masks the reference builds. Returns hidden [B, T, H].

    ``positions`` ([T], or [B, T] for rows at different positions) are the tokens' true positions (RoPE);
    their K/V are written to buffer rows ``rows`` [B, T] (int32) of ``cache`` ([B] rows: a batched round,
    :mod:`specdec.fast.glide.batch`). ``bounds`` says which keys every query sees (see :class:`GlideBounds`:
    [B] / [B, T] tensors); with ``tree_mask`` [B, T, n_tree] the tree block (rows
    ``[tree_start, tree_start + n_tree)``) is masked by ancestry; ``target_k``/``target_v`` hold the B rows'
    target caches. The same fused kernels as a target layer (:mod:`.kernels.fused`):

        embed_rms_norm -> wqkv GEMM -> rope_qkv_write (k, v into the sliding cache) -> windowed
        self-attention -> wo GEMM -> add_rms_norm -> wq_x GEMM -> rope_q -> cross-attention over the
        target cache -> wo_x GEMM -> add_rms_norm -> w13 GEMM -> silu_mul -> w2 GEMM -> + residual

    or, for one sequence (B = 1) when the layer's weights are small enough to re-read per row
    (:func:`_gemv_rows_ok`), every projection is one GEMV with the norm before it or the residual add after
    it folded in, the q|k|v one also does RoPE and the K/V write and the cross-attention's query projection
    its RoPE (:mod:`.kernels.gemv`): no norm, RoPE, SwiGLU or add kernels.

    Under tensor parallelism (``g.tp``: the rank's heads and MLP slice, :func:`specdec.fast.glide.shard_glide`)
    the attentions run over the rank's heads -- the cross-attention over the target cache's heads this rank
    holds -- and the outputs of ``wo``, ``wo_x`` and ``w2`` are all-reduced before their residual adds, so
    every rank returns the same hidden states.
    """
    from specdec.fast.kernels.tree_attention import split_attention

    kern = _kernels()
    eps = g.config.rms_norm_eps
    cos, sin = _cos_sin(fm, positions)  # [T, D] or [B, T, D], true positions (the target's table: no host sync)
    if positions.dim() == 1:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.to(g.dtype), sin.to(g.dtype)

    def self_attention(q):  # over the sliding cache (+ the tree block), [B, H, T, D] -> [B, T, H * D]
        o = split_attention(q, cache.k, cache.v, span_lo=bounds.self_lo, span_hi=bounds.self_hi,
                            max_span=g.window + q.shape[2], row_lo=bounds.self_row_lo, row_hi=bounds.self_row_hi,
                            tree_start=bounds.tree_start if tree_mask is not None else None, tree_mask=tree_mask)
        return rearrange(o, "b h t d -> b t (h d)")

    def reduce(partial):  # a row-parallel projection's output: summed over the ranks (as is without TP)
        return partial if g.tp is None else g.tp.all_reduce(partial)

    def row_parallel(a, name, x):  # x + a @ w[name]^T as one GEMV with the residual folded in; under TP the
        # ranks' partial products are summed first, then added (the residual must be added once)
        if g.tp is None:
            return kern.gemv(a, g.w[name], residual=x)
        return x + g.tp.all_reduce(kern.gemv(a, g.w[name]))

    def cross_attention(q):  # over the target's last-layer cache, as stored
        o = split_attention(q, target_k, target_v, span_hi=bounds.cross_hi, max_span=bounds.cross_span,
                            row_lo=bounds.cross_row_lo, row_hi=bounds.cross_row_hi)
        return rearrange(o, "b h t d -> b t (h d)")

    gemv = _use_gemv(g, tokens)
    # 1. Self-attention over the sliding cache (+ the tree block): q, with the new K/V written to the cache
    q, x = _qkv_write(fm, g, cache, tokens, cos, sin, rows, gemv)
    if gemv:
        # 2. Cross-attention (query projected + rotated only). 3. SwiGLU MLP.
        x = row_parallel(self_attention(q), "wo", x)
        q = kern.gemv_q_rope(x, g.w["wq_x"], g.w["bq_x"], cos, sin, norm_weight=g.w["norm2"], eps=eps)
        x = row_parallel(cross_attention(q), "wo_x", x)
        return row_parallel(kern.gemv_silu(x, g.w["w13"], norm_weight=g.w["norm3"], eps=eps), "w2", x)
    h, x = kern.add_rms_norm(reduce(F.linear(self_attention(q), g.w["wo"])), x, g.w["norm2"], eps)
    # 2. Cross-attention over the target's last-layer cache, as stored (query projected + rotated only).
    q = kern.rope_q(F.linear(h, g.w["wq_x"], g.w["bq_x"]), cos, sin)
    h, x = kern.add_rms_norm(reduce(F.linear(cross_attention(q), g.w["wo_x"])), x, g.w["norm3"], eps)
    # 3. SwiGLU MLP.
    return x + reduce(F.linear(kern.silu_mul(F.linear(h, g.w["w13"])), g.w["w2"]))
