"""Greedy acceptance of a verified tree on the device: two small kernels instead of ~25 PyTorch ops.

* :func:`row_argmax` ``(logits [M, V]) -> [M] int64`` -- one program per row: the index of the row's
  largest value, the lowest index among equal ones (``torch.argmax``'s rule; NaN is not supported).
* :func:`greedy_accept` -- one program for the whole tree (M <= 128): the rule of
  :func:`specdec.shared.acceptance.greedy_best_node` (the deepest node whose whole root path matches
  the target's argmax choices; among equals the lowest index; ``valid`` False = a padding node that
  is never right), then everything the round needs from it:

      packed [2 + 3M] int64 = [best, next token = argmax[best], on-path mask (M), tokens (M), parents (M)]
      src    [M] int32      = L + (path nodes in index order, then the other nodes)   (rows to keep first)
      dst    [1] int32      = L                                                       (where they go)
      n      [1] int32      = number of path nodes (root included)
      length_t              <- L + n                                                  (in place)
      seq (optional)        <- seq[L + r] = token of the r-th path node (r < n), seq[L + n] = next token

  with ``L = length_t[0]`` on entry. ``seq`` [capacity] int32 is a device copy of the sequence by
  position (position ``L`` holds the root), so a device-driven next round can read its catch-up
  tokens without the host (see ``FastGlideDrafter.launch_ahead``).

  :func:`specdec.fast.kernels.compact_kv` then moves rows ``src[:n]`` to ``dst ..``; ``length_t``
  already counts them.

Shapes: tokens, parents (root -1), depth [M] int64; ancestor [M, M] bool (ancestor-or-self, unit
column stride); valid [M] bool; length_t [>= 1] int32. Graph-capturable (no host synchronisation).

Reference (must match): :func:`greedy_accept_ref`, the same outputs from torch ops (:func:`greedy_paths`
over :func:`specdec.shared.acceptance.greedy_best_nodes`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_int_tensor, next_pow2

__all__ = ["row_argmax", "greedy_accept", "greedy_accept_ref", "greedy_paths"]

MAX_NODES = 128


@triton.jit(do_not_specialize=["stride_m", "V"])
def _row_argmax_kernel(X, stride_m, V, Out, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    base = X + row.to(tl.int64) * stride_m
    # per lane: the best value seen and its (first) index; lanes see increasing indices
    best_v = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    best_i = offs
    for v0 in range(BLOCK_V, V, BLOCK_V):
        x = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        better = x > best_v  # strict: an equal later value keeps the earlier index
        best_v = tl.where(better, x, best_v)
        best_i = tl.where(better, v0 + offs, best_i)
    top = tl.max(best_v, axis=0)
    idx = tl.min(tl.where((best_v == top) & (best_i < V), best_i, 2147483647), axis=0)
    tl.store(Out + row + tl.arange(0, 1), tl.full([1], 0, tl.int64) + idx)


@triton.jit(do_not_specialize=["M", "stride_a"])
def _greedy_accept_kernel(Amax, Tok, Par, Depth, Anc, stride_a, Valid, LenT, Packed, Src, Dst, NAcc, Seq, M,
                          BLOCK: tl.constexpr, HAS_SEQ: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < M
    one = tl.arange(0, 1)
    par = tl.load(Par + i, mask=ok, other=0)
    tok = tl.load(Tok + i, mask=ok, other=-1)
    valid = tl.load(Valid + i, mask=ok, other=0) != 0
    # 1. A node is right when its token is the target's choice after its parent (the root always is).
    choice = tl.load(Amax + tl.maximum(par, 0), mask=ok, other=-2)
    right = ((tok == choice) & valid) | (par < 0)
    # 2. A path is right when no node among the ancestors-or-self is wrong.
    anc = tl.load(Anc + i[:, None] * stride_a + i[None, :], mask=ok[:, None] & ok[None, :], other=0) != 0
    wrong_on_path = tl.max((anc & (right == 0)[None, :]).to(tl.int32), axis=1)
    path_ok = (wrong_on_path == 0) & ok
    # 3. Deepest right path wins; among equals the lowest index (scores are distinct).
    depth = tl.load(Depth + i, mask=ok, other=0)
    score = tl.where(path_ok, depth * (M + 1) + (M - i), -1)
    top = tl.max(score, axis=0)
    best = tl.min(tl.where(score == top, i, BLOCK), axis=0)
    on = (tl.load(Anc + best * stride_a + i, mask=ok, other=0) != 0) & ok
    on32 = on.to(tl.int32)
    n = tl.sum(on32, axis=0)
    # 4. Rows to keep first: the path's nodes in index order (parents before children), then the rest.
    L = tl.load(LenT + one)
    rank = tl.where(on, tl.cumsum(on32, axis=0) - 1, tl.cumsum((ok & (on == 0)).to(tl.int32), axis=0) - 1 + n)
    tl.store(Src + rank, L + i, mask=ok)
    tl.store(Dst + one, L)
    tl.store(NAcc + one, tl.full([1], 0, tl.int32) + n)
    tl.store(LenT + one, L + n)
    # 5. The round's read-back.
    nxt = tl.load(Amax + best + one)
    tl.store(Packed + one, tl.full([1], 0, tl.int64) + best)
    tl.store(Packed + 1 + one, nxt)
    tl.store(Packed + 2 + i, on.to(tl.int64), mask=ok)
    tl.store(Packed + 2 + M + i, tok, mask=ok)
    tl.store(Packed + 2 + 2 * M + i, par, mask=ok)
    # 6. The sequence by position: the path's tokens at L .. L + n - 1 (rank order = depth order), then the next one.
    if HAS_SEQ:
        tl.store(Seq + L + rank, tok.to(tl.int32), mask=on)
        tl.store(Seq + L + n + one, nxt.to(tl.int32))


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` for a [M, V] float tensor (unit stride along V) as one launch."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating [M, V] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along V, got strides {logits.stride()}")
    check_device(("logits", logits))
    m, v = logits.shape
    out = torch.empty(m, dtype=torch.long, device=logits.device)
    if m == 0 or v == 0:
        if v == 0 and m:
            raise ValueError("logits must have V >= 1")
        return out
    block = min(next_pow2(v), 2048)
    _row_argmax_kernel[(m,)](logits, logits.stride(0), v, out, BLOCK_V=block, num_warps=4)
    return out


def _check_tree(tokens, parents, depth, ancestor, valid) -> int:
    m = tokens.shape[0] if isinstance(tokens, torch.Tensor) and tokens.dim() == 1 else -1
    if not 1 <= m <= MAX_NODES:
        raise ValueError(f"tokens must be a [M] tensor with 1 <= M <= {MAX_NODES}, got {getattr(tokens, 'shape', type(tokens).__name__)}")
    for name, t in (("tokens", tokens), ("parents", parents), ("depth", depth)):
        check_int_tensor(name, t, (m,))
        if t.dtype != torch.int64 or t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous int64, got {t.dtype} with stride {t.stride()}")
    if not isinstance(ancestor, torch.Tensor) or ancestor.dtype != torch.bool or tuple(ancestor.shape) != (m, m) or ancestor.stride(1) != 1:
        raise ValueError(f"ancestor must be a bool [{m}, {m}] tensor with unit column stride, got "
                         f"{getattr(ancestor, 'dtype', None)} {tuple(getattr(ancestor, 'shape', ()))}")
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (m,) or valid.stride(0) != 1:
        raise ValueError(f"valid must be a contiguous bool [{m}] tensor")
    return m


def greedy_accept(target_argmax, tokens, parents, depth, ancestor, valid, length_t, seq=None):
    """Greedy acceptance of a verified tree (module docstring). Returns ``(packed, src, dst, n)``;
    advances ``length_t[0]`` by ``n`` in place and, with ``seq`` (contiguous int32), writes the
    accepted path and the next token at their positions ``L ..  L + n``."""
    m = _check_tree(tokens, parents, depth, ancestor, valid)
    check_int_tensor("target_argmax", target_argmax, (m,))
    if target_argmax.dtype != torch.int64 or target_argmax.stride(0) != 1:
        raise ValueError("target_argmax must be contiguous int64")
    if not isinstance(length_t, torch.Tensor) or length_t.dtype != torch.int32 or length_t.dim() != 1 or length_t.numel() < 1:
        raise ValueError("length_t must be an int32 [B] tensor (the cache's device-side length)")
    dev = check_device(("target_argmax", target_argmax), ("tokens", tokens), ("parents", parents), ("depth", depth),
                       ("ancestor", ancestor), ("valid", valid), ("length_t", length_t))
    if seq is not None:
        if not isinstance(seq, torch.Tensor) or seq.dtype != torch.int32 or seq.dim() != 1 or seq.stride(0) != 1:
            raise ValueError("seq must be a contiguous int32 [capacity] tensor (the sequence by position)")
        check_device(("seq", seq), ("length_t", length_t))
    packed = torch.empty(2 + 3 * m, dtype=torch.long, device=dev)
    ma = -(-m // 4) * 4
    ints = torch.empty(ma + 8, dtype=torch.int32, device=dev)  # src | dst | n, each 16-byte aligned
    src, dst, n = ints[:m], ints[ma : ma + 1], ints[ma + 4 : ma + 5]
    _greedy_accept_kernel[(1,)](target_argmax, tokens, parents, depth, ancestor.view(torch.int8), ancestor.stride(0),
                                valid.view(torch.int8), length_t, packed, src, dst, n, seq if seq is not None else length_t, m,
                                BLOCK=max(next_pow2(m), 16) if dev.type == "cpu" else MAX_NODES, HAS_SEQ=seq is not None,
                                num_warps=4)
    return packed, src, dst, n


def greedy_paths(target_argmax, tokens, parents, depth, ancestor, valid):
    """The greedy rule in torch ops for B trees at once, and what compaction needs from it: ``(best [B],
    on_path [B, M] bool, order [B, M])`` -- each tree's accepted node
    (:func:`specdec.shared.acceptance.greedy_best_nodes`; ``valid`` False never accepted), its
    ancestors-or-self, and the node indices with the path's first (index order = root-to-leaf order), the
    rest after. Shapes as :func:`greedy_accept`'s with a leading B. No host synchronisation."""
    from specdec.shared.acceptance import greedy_best_nodes

    b, m = tokens.shape
    best = greedy_best_nodes(ancestor, depth, torch.where(valid, tokens, torch.full_like(tokens, -1)), target_argmax, parents)
    on_path = ancestor.gather(1, best[:, None, None].expand(b, 1, m))[:, 0]
    # each node's place in the order: the path's nodes first (index order), then the others (index order) --
    # a stable partition by counting, no sort (every op here is CUDA-graph safe)
    n = on_path.sum(dim=1, keepdim=True)
    place = torch.where(on_path, on_path.cumsum(dim=1) - 1, n + (~on_path).cumsum(dim=1) - 1)
    idx = torch.arange(m, device=tokens.device).expand(b, m)
    order = torch.empty((b, m), dtype=torch.long, device=tokens.device).scatter_(1, place, idx)
    return best, on_path, order


def greedy_accept_ref(target_argmax, tokens, parents, depth, ancestor, valid, length_t, seq=None):
    """Reference for :func:`greedy_accept`: torch ops (:func:`greedy_paths` on a batch of one tree)."""
    best, on_path, order = (t[0] for t in greedy_paths(target_argmax[None], tokens[None], parents[None], depth[None],
                                                       ancestor[None], valid[None]))
    best = best.reshape(1)
    n = on_path.sum().to(torch.int32).reshape(1)
    L = length_t[:1].clone()
    src = (L.long() + order).to(torch.int32)
    length_t[:1] += n
    packed = torch.cat([best, target_argmax.index_select(0, best), on_path.long(), tokens, parents])
    if seq is not None:
        k = int(n)
        seq[int(L) : int(L) + k] = tokens[order[:k]].to(torch.int32)
        seq[int(L) + k] = target_argmax[best].to(torch.int32)
    return packed, src, L, n
