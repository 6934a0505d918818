"""GLIDE draft attention on the split-KV kernel of :mod:`.tree_attention`.

The GLIDE draft (one decoder layer) attends twice per layer (docs/design.md §6):

* :func:`glide_self_attention` -- causal sliding-window attention over the draft's OWN cache::

      q      [B, Hq,  M, D]   draft queries
      k, v   [B, Hkv, N, D]   draft cache, row s holds position s
      q_pos  [B, M] (or [M])  position of every query; its own key must already be in row q_pos
      window int (512)        query at position t sees rows s with t - window < s <= t
      -> [B, Hq, M, D]

  Tree levels: pass ``tree_mask [B, M, T]`` and ``tree_start`` (int or [B]). The tree nodes'
  keys are rows ``[tree_start, tree_start + T)``; the windowed causal part is then cut at
  ``tree_start`` (rows ``t - window < s < tree_start``, the verified prefix) and query ``i`` also
  sees tree row ``tree_start + j`` whenever ``tree_mask[b, i, j]``. Tree rows are not windowed
  (the tree is assumed shallower than the window).

* :func:`glide_cross_attention` -- attention over the TARGET's cache with a per-query bound::

      q         [B, Hq, M, D]
      k, v      [B, Hkv, N, D]   target cache (can be 128k long: split over N like the tree kernel)
      kv_bound  int, [B] or [B, M] integer   query i sees rows [0, kv_bound[b, i])
      -> [B, Hq, M, D]

  Decoding: bound = the query's position; tree levels: bound = the verified prefix length L.

Both are one launch of ``_split_attention_kernel`` (per-row bounds ``[row_lo, row_hi)`` inside the
split range, optional tree block) plus the merge; all lse inside are base 2. A query that sees no
key returns zeros. References: :func:`glide_self_attention_ref` and
:func:`glide_cross_attention_ref`, both :func:`._common.masked_attention_ref` (what
:func:`specdec.ref.attention.masked_attention` computes) with an explicit [B, M, N] boolean mask;
the kernels must match them.
"""

from __future__ import annotations

import torch

from ._common import check_device, check_int_tensor, graph_capturing, masked_attention_ref
from .tree_attention import _check_qkv, split_attention

__all__ = [
    "glide_self_attention",
    "glide_cross_attention",
    "glide_self_attention_ref",
    "glide_cross_attention_ref",
    "glide_self_mask",
    "glide_cross_mask",
]


# ---------------------------------------------------------------------------------------------
# argument normalisation
# ---------------------------------------------------------------------------------------------


def _per_query(name: str, x, b: int, m: int, device) -> torch.Tensor:
    """An int, [B], [M]-for-q_pos-only or [B, M] integer argument as an int32 [B, M] tensor."""
    if isinstance(x, bool) or not isinstance(x, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(x).__name__}")
    if isinstance(x, int):
        return torch.full((b, m), x, dtype=torch.int32, device=device)
    if x.dim() == 2:
        check_int_tensor(name, x, (b, m))
    elif x.dim() == 1:
        check_int_tensor(name, x, (x.shape[0],))
        if x.shape[0] != b:
            raise ValueError(f"{name} must have shape [B]={[b]} or [B, M]={[b, m]}, got {list(x.shape)}")
        x = x[:, None].expand(b, m)
    else:
        raise ValueError(f"{name} must have shape [B]={[b]} or [B, M]={[b, m]}, got {list(x.shape)}")
    return x.to(device=device, dtype=torch.int32).contiguous()


def _per_batch(name: str, x, b: int, device) -> torch.Tensor:
    if isinstance(x, bool) or not isinstance(x, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int or a [B] integer tensor, got {type(x).__name__}")
    if isinstance(x, int):
        return torch.full((b,), x, dtype=torch.int32, device=device)
    check_int_tensor(name, x, (b,))
    return x.to(device=device, dtype=torch.int32)


def _minmax(*ts: torch.Tensor) -> list[tuple[int, int]]:
    """(min, max) of every tensor with one host sync."""
    stats = torch.stack([torch.stack([t.min(), t.max()]).long() for t in ts])
    return [tuple(r) for r in stats.tolist()]


# ---------------------------------------------------------------------------------------------
# self-attention (sliding window, optional tree block)
# ---------------------------------------------------------------------------------------------


def glide_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos,
    window: int = 512,
    *,
    tree_mask: torch.Tensor | None = None,
    tree_start=None,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Sliding-window causal self-attention of the GLIDE draft (see module docstring).

    Args:
        q: [B, Hq, M, D]; k, v: [B, Hkv, N, D] (row s = position s), D a multiple of 16 up to 256.
        q_pos: [B, M] or [M] integer positions, each in [0, N) (without a tree: its key is row q_pos).
        window: int >= 1; query at t sees rows (t - window, t].
        tree_mask: optional [B, M, T] bool; tree keys are rows [tree_start, tree_start + T).
        tree_start: int or [B] integer, required with tree_mask, tree_start + T <= N.
    Returns [B, Hq, M, D] in q's dtype; matches :func:`glide_self_attention_ref`.
    """
    _check_qkv(q, k, v)
    b, _, m, _ = q.shape
    n = k.shape[2]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if isinstance(q_pos, torch.Tensor) and q_pos.dim() == 1 and q_pos.shape[0] == m and m != b:
        q_pos = q_pos[None, :].expand(b, m)
    if not isinstance(q_pos, torch.Tensor):
        raise TypeError(f"q_pos must be a [B, M] or [M] integer tensor, got {type(q_pos).__name__}")
    pos = _per_query("q_pos", q_pos, b, m, q.device)
    row_lo = (pos - (window - 1)).clamp_min(0)
    row_hi = pos + 1
    t_start = None
    if tree_mask is not None:
        if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
            raise TypeError("tree_mask must be a bool tensor [B, M, T]")
        if tree_mask.dim() != 3 or tree_mask.shape[0] != b or tree_mask.shape[1] != m:
            raise ValueError(f"tree_mask must have shape [B, M, T] = [{b}, {m}, T], got {list(tree_mask.shape)}")
        check_device(("q", q), ("tree_mask", tree_mask))
        if tree_start is None:
            raise ValueError("tree_start (int or [B]) is required with tree_mask")
        t_start = _per_batch("tree_start", tree_start, b, q.device)
        row_hi = torch.minimum(row_hi, t_start[:, None])
    elif tree_start is not None:
        raise ValueError("tree_start given without tree_mask")
    row_lo = row_lo.contiguous()
    row_hi = torch.maximum(row_hi, row_lo).contiguous()   # empty window -> lo == hi
    span_lo = row_lo.amin(dim=1)
    span_hi = row_hi.amax(dim=1)
    if graph_capturing(q.device):
        max_span = min(n, window + m)
    else:
        checks = [pos, span_hi - span_lo] + ([t_start] if t_start is not None else [])
        stats = _minmax(*checks)
        (plo, phi), (_, max_span) = stats[0], stats[1]
        if plo < 0 or phi >= n:
            raise ValueError(f"q_pos must be in [0, N) = [0, {n}); got range [{plo}, {phi}]")
        if t_start is not None:
            slo, shi = stats[2]
            t = tree_mask.shape[2]
            if slo < 0 or shi + t > n:
                raise ValueError(f"tree_start must be in [0, N - T] = [0, {n - t}] so the T={t} tree rows fit "
                                 f"in k/v (N={n}); got range [{slo}, {shi}]")
    return split_attention(
        q, k, v, span_lo=span_lo, span_hi=span_hi, max_span=max_span, row_lo=row_lo, row_hi=row_hi,
        tree_start=t_start, tree_mask=tree_mask, sm_scale=sm_scale, num_splits=num_splits, config=config,
    )


def glide_self_mask(q_pos: torch.Tensor, n: int, window: int = 512, tree_mask=None, tree_start=None) -> torch.Tensor:
    """The [B, M, N] boolean mask :func:`glide_self_attention` applies, built by brute force."""
    pos = q_pos.long()
    cols = torch.arange(n, device=pos.device)
    mask = (cols > pos[..., None] - window) & (cols <= pos[..., None])
    if tree_mask is not None:
        b, m, t = tree_mask.shape
        start = torch.as_tensor(tree_start, device=pos.device).long().expand(b)
        mask &= cols < start[:, None, None]
        tree = torch.zeros(b, m, n, dtype=torch.bool, device=pos.device)
        idx = (start[:, None] + torch.arange(t, device=pos.device))[:, None, :].expand(b, m, t)
        tree.scatter_(2, idx, tree_mask.to(pos.device))
        mask |= tree
    return mask


def glide_self_attention_ref(q, k, v, q_pos, window: int = 512, *, tree_mask=None, tree_start=None, sm_scale=None):
    """Reference for :func:`glide_self_attention`: masked attention with the brute-force mask."""
    b, m = q.shape[0], q.shape[2]
    pos = q_pos if q_pos.dim() == 2 else q_pos[None, :].expand(b, m)
    return masked_attention_ref(q, k, v, glide_self_mask(pos, k.shape[2], window, tree_mask, tree_start), sm_scale)


# ---------------------------------------------------------------------------------------------
# cross-attention over the target cache (per-query upper bound)
# ---------------------------------------------------------------------------------------------


def glide_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_bound,
    *,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Cross-attention of draft queries over the target cache: query i sees rows [0, kv_bound[b, i]).

    Args:
        q: [B, Hq, M, D]; k, v: [B, Hkv, N, D] target cache, D a multiple of 16 up to 256.
        kv_bound: int, [B] or [B, M] integer, each in [0, N]. A bound of 0 gives a zero output row.
    Returns [B, Hq, M, D] in q's dtype; matches :func:`glide_cross_attention_ref`.
    """
    _check_qkv(q, k, v)
    b, _, m, _ = q.shape
    n = k.shape[2]
    per_row = isinstance(kv_bound, torch.Tensor) and kv_bound.dim() == 2
    if per_row:
        row_hi = _per_query("kv_bound", kv_bound, b, m, q.device)
        span_hi = row_hi.amax(dim=1)
    else:
        span_hi = _per_batch("kv_bound", kv_bound, b, q.device)
    if graph_capturing(q.device):
        max_span = n
    else:
        lo, max_span = _minmax(row_hi if per_row else span_hi)[0]
        if lo < 0 or max_span > n:
            raise ValueError(f"kv_bound must be in [0, N] = [0, {n}]; got range [{lo}, {max_span}]")
    if per_row:
        return split_attention(
            q, k, v, span_hi=span_hi, max_span=max_span, row_lo=torch.zeros_like(row_hi), row_hi=row_hi,
            sm_scale=sm_scale, num_splits=num_splits, config=config,
        )
    return split_attention(q, k, v, span_hi=span_hi, max_span=max_span, sm_scale=sm_scale,
                           num_splits=num_splits, config=config)


def glide_cross_mask(kv_bound, b: int, m: int, n: int, device=None) -> torch.Tensor:
    """The [B, M, N] boolean mask :func:`glide_cross_attention` applies."""
    bound = torch.as_tensor(kv_bound, device=device).long()
    if bound.dim() == 0:
        bound = bound.expand(b)
    if bound.dim() == 1:
        bound = bound[:, None].expand(b, m)
    return torch.arange(n, device=bound.device) < bound[..., None]


def glide_cross_attention_ref(q, k, v, kv_bound, *, sm_scale=None):
    """Reference for :func:`glide_cross_attention`: masked attention with the brute-force mask."""
    mask = glide_cross_mask(kv_bound, q.shape[0], q.shape[2], k.shape[2], q.device)
    return masked_attention_ref(q, k, v, mask, sm_scale)
