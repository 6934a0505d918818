"""Decode-phase attention whose every query row is computed bit for bit the same whatever M (docs/design.md §8).

Computes what :func:`specdec.ref.attention.tree_attention` computes (and what
:func:`specdec.fast.kernels.tree_attention` computes), for the target model's decode phase::

    q     [B, Hq,  M, D]   the M new tokens' queries (a decode step: M = 1; a verification: M tree nodes)
    k, v  [B, Hkv, N, D]   cache rows [0, prefix_len) = verified prefix,
                           rows [prefix_len, prefix_len + M) = the M new tokens (tree order)
    tree_mask [B, M, M]    bool, True = node i may attend to node j (ancestor or self); nodes are in
                           topological order (a parent's index is below its children's)
    prefix_len             [B] int32
    ->    [B, Hq, M, D]    in q's dtype

with one more promise, the one speculation needs to be exact in bf16: **row i's output is a function
of its query and of the key/value vectors at the positions it may see, in position order** -- the
same bits as a one-token step (M = 1) at position ``prefix_len + depth_i`` after the node's
ancestors have been written to the cache, whatever M, the tree, the batch or the tile size.

How (one launch plus the merge of :mod:`.tree_attention`):

* **Keys by absolute position.** Node i at depth d_i sits at position ``p_i = prefix_len + d_i``;
  the key at position ``t <= p_i`` is cache row t for ``t < prefix_len`` and otherwise the tree row of
  i's ancestor at depth ``t - prefix_len`` (``anc[i, t - prefix_len]``, from the mask). A key tile
  holds positions ``[n0, n0 + BLOCK_N)`` with ``n0`` a multiple of ``BLOCK_N``: position t is always
  in lane ``t % BLOCK_N`` (lane placement changes tensor-core rounding), and a lane the row may not
  see holds an exact zero key and value with score -inf -- the same lanes in a decode step and in a
  verification.
* **Splits by absolute position.** Split s covers a FIXED range of positions (:data:`SPLIT_TIERS`:
  256 keys each below position 4096, 1024 below 32768, 4096 beyond), never chosen from M, the batch
  or the prompt length; a row's partials are merged in an order fixed by the split index alone
  (:func:`.tree_attention.merge_partials`: split s in lane s % ``MERGE_LANES``, the lanes combined by
  one fixed tile; an empty split is an exact no-op in the merge).
* **One arithmetic per tile.** A tile wholly below ``prefix_len`` is shared by all rows of the
  program (one ``q @ K^T`` for the packed ``BLOCK_M`` rows); a tile that reaches the tree is built
  per node (a loop over the program's nodes, each with its own gathered K and V, the rows of other
  nodes discarded). Both run the same instructions on the same lane contents, and tensor-core MMAs
  never mix rows, so a row's bits do not depend on which tile path, which other rows or which BLOCK_M.
  Row sums that feed the softmax are taken by the MMA too (``p @ 1``), never by a register
  reduction whose order would follow the tile's layout; the running max is exact in any order.
* **Two loops per split.** A split's prefix tiles run in one loop and its tree-reaching tiles (the last
  ones) in a second, rather than one loop with a branch per tile: the prefix loop's loads then sit
  under no condition and the compiler pipelines them (``num_stages``). Same tiles, same order, same
  instructions per tile, so the same bits (BENCHMARKS "Session 30: the decode attention's prefix loop
  without a branch": the 69-row verification 25-33 % faster at 32k-128k on the H200).
* **The largest splits start first.** The grid runs the splits outermost and in reverse (the last split, then
  the long-context tiers' long splits, down to the 256-key ones), so the GPU's block scheduler starts the
  programs with the most tiles first and fills the SMs' remaining time with the short ones, instead of
  leaving an SM to finish three long splits after the others are done. Which program runs when is not
  part of any row's arithmetic: same bits.
* **No FMA contraction.** The kernel is compiled with ``enable_fp_fusion=False``, so every multiply and
  add rounds once, as written, on both tile paths. With contraction on, the compiler was free to fuse
  the two paths differently (on the shared path ``s`` flows straight into ``s - m``; on the per-node
  path it first passes through a ``tl.where``), and on the H100 a row of a tree that starts below a
  split boundary -- its last tile of that split on the per-node path -- came out a few ulp away from the
  one-token step at its position, whose same tile is on the shared path. That flipped a bf16 near-tie
  of the embedded model (session 23, BENCHMARKS "Exactness: the split-boundary rows"); the GPU test
  ``test_gpu_rows_across_a_split_boundary`` pins it. The interpreter never contracts: only the GPU
  shows it.

* **The split that holds L runs narrow programs.** Only the split holding position ``L`` (the prefix's end) has
  tiles that reach the tree, and those tiles loop over the program's nodes, two gathered loads and two dots
  each. With few KV heads (the embedded model) that loop was the kernel's critical path. So that split's
  programs hold ``program_rows`` packed rows each (whole nodes, :data:`FILL_PROGRAMS`; the rest of the BLOCK_M
  tile padding), while every other split's programs hold BLOCK_M rows and share each prefix tile among them as
  before. The split is found in the kernel from ``L`` (``_split_of``), so a CUDA graph captured on a large cache
  needs no more programs than one on a small cache. Grid: ``(B x Hkv, program)``, where the first
  ``cdiv(M G, program_rows)`` programs take the split that holds L, and the rest take the other splits, last
  split first, ``cdiv(M G, BLOCK_M)`` programs each. When L is at or past 4096 (1024- and 4096-key splits), that
  split's prefix tiles would be re-read by every narrow program, so its first programs hold BLOCK_M rows too and
  the others idle. Which rows share a program is not part of a row's arithmetic: same bits (BENCHMARKS "Session
  37: fewer nodes per attention program"; with the split found from L, the embedded model's 32-node verification
  takes 10.3-10.9 us per layer on 4k and 8k caches where it took 13.3 and 20.0, "Session 38: narrow programs only
  in the split that holds L").

Rows are packed as in :mod:`.tree_attention`: ``row = node * G + g`` for the ``G = Hq // Hkv``
query heads of one KV head. The tests (``tests/fast/test_decode_attention.py``) check the values
against :func:`specdec.fast.kernels._common.masked_attention_ref` and the row invariance bitwise.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, check_int_tensor, check_tensor, graph_capturing, interpreter_active, next_pow2
from .tree_attention import LOG2E, merge_partials

__all__ = ["decode_attention", "ancestor_table", "SPLIT_KEYS", "SPLIT_TIERS", "MAX_HEAD_DIM", "decode_attention_config",
           "split_bounds", "split_of", "num_splits_for", "FILL_PROGRAMS"]

SPLIT_TIERS = ((4096, 256), (32768, 1024), (None, 4096))
"""The fixed partition of key positions into splits: 256-key splits below position 4096, 1024-key splits
below 32768, 4096-key splits beyond (every size a multiple of every BLOCK_N used here). A row's
partial boundaries depend on nothing but positions; short contexts still get several splits (a
one-token step fills the GPU), long ones not too many (a verification's partials stay small)."""
SPLIT_KEYS = SPLIT_TIERS[0][1]
"""The smallest split (tests place trees across its boundary)."""


def split_bounds(s: int) -> tuple[int, int]:
    """Key positions ``[lo, hi)`` of split ``s`` (host mirror of the kernel's ``_split_range``)."""
    lo = 0
    for end, size in SPLIT_TIERS:
        count = None if end is None else (end - lo) // size
        if count is None or s < count:
            return lo + s * size, lo + (s + 1) * size
        s -= count
        lo = end
    raise AssertionError("unreachable")


def num_splits_for(positions: int) -> int:
    """Splits covering key positions ``[0, positions)``."""
    s, lo = 0, 0
    for end, size in SPLIT_TIERS:
        if end is None or positions <= end:
            return s + triton.cdiv(max(positions - lo, 0), size)
        s += (end - lo) // size
        lo = end
    raise AssertionError("unreachable")


def split_of(t: int) -> int:
    """The split holding key position ``t`` (host mirror of the kernel's ``_split_of``): the last of the splits
    covering ``[0, t]``."""
    return num_splits_for(t + 1) - 1

MAX_HEAD_DIM = 256
"""Head dims: any multiple of 16 up to this (the tile is padded to the next power of two)."""


@triton.jit
def _split_range(s):
    """``(lo, hi)`` key positions of split s: the partition :data:`SPLIT_TIERS` (constants inlined)."""
    if s < 16:                      # [0, 4096) in 256-key splits
        lo = s * 256
        hi = lo + 256
    elif s < 44:                    # [4096, 32768) in 1024-key splits
        lo = 4096 + (s - 16) * 1024
        hi = lo + 1024
    else:                           # [32768, ...) in 4096-key splits
        lo = 32768 + (s - 44) * 4096
        hi = lo + 4096
    return lo, hi


@triton.jit
def _split_of(t):
    """The split holding key position t (the inverse of :func:`_split_range`; host mirror :func:`split_of`)."""
    if t < 4096:
        s = t // 256
    elif t < 32768:
        s = 16 + (t - 4096) // 1024
    else:
        s = 44 + (t - 32768) // 4096
    return s


@triton.jit
def _node_lanes(Depth, a_base, depth_off, j, stride_ai, offs_n, t, in_prefix, L):
    """Lanes of node j in a tile that reaches the tree: the cache row each lane reads (position t + L
    of the prefix, or the tree row of j's ancestor at depth t) and whether j may see it."""
    d_j = tl.load(Depth + depth_off + j)
    in_tree = (t >= 0) & (t <= d_j)
    anc = tl.load(a_base + j * stride_ai + t, mask=in_tree, other=0)
    return tl.where(in_prefix, offs_n, L + anc), in_prefix | in_tree


@triton.jit
def _qk(q, kT, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """Scores ``q @ K^T`` [BLOCK_M, BLOCK_N] in fp32 (the interpreter's bf16 dot is wrong: UPCAST)."""
    if IS_FP32:
        return tl.dot(q, kT, input_precision="ieee")
    elif UPCAST:
        return tl.dot(q.to(tl.float32), kT.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(q, kT)


@triton.jit
def _pv(p, v, acc, IS_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + p @ v`` with p rounded to v's dtype first (the MMA accumulates into acc)."""
    if IS_FP32:
        return tl.dot(p, v, acc, input_precision="ieee")
    elif UPCAST:
        return tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def _softmax_step(s, m_i, l_i, ones, IS_FP32: tl.constexpr, UPCAST: tl.constexpr, V_DTYPE: tl.constexpr):
    """The online-softmax statistics for scores s [BLOCK_M, BLOCK_N] (base 2; -inf = not seen).

    Returns (p, alpha, m_new, l_new). The row sum of p is an MMA against a ones tile, read back with
    an exact max over identical columns, so it does not depend on how the tile is laid out."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    if IS_FP32:
        row_sum = tl.max(_pv(p, ones, tl.zeros([s.shape[0], 16], dtype=tl.float32), IS_FP32, UPCAST), 1)
    else:
        row_sum = tl.max(_pv(p, ones.to(V_DTYPE), tl.zeros([s.shape[0], 16], dtype=tl.float32), IS_FP32, UPCAST), 1)
    l_new = l_i * alpha + row_sum
    return p, alpha, m_new, l_new


@triton.jit(do_not_specialize=["stride_ab", "stride_ai", "stride_db", "M", "NUM_SPLITS", "NARROW_GROUPS", "WIDE_GROUPS",
                               "stride_pz", "stride_pp", "stride_lz", "stride_lp"])
def _decode_attention_kernel(
    Q, K, V, O_part, L_part, PrefixLen, Anc, Depth,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ab, stride_ai, stride_db,
    stride_pz, stride_pp, stride_pr,
    stride_lz, stride_lp,
    qk_scale, H_KV, M, NUM_SPLITS, NARROW_GROUPS, WIDE_GROUPS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, NARROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_FP32: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_z = tl.program_id(0)   # b * H_KV + kv head
    pid = tl.program_id(1)     # which split and which rows (module docstring, "The split that holds L")
    b = pid_z // H_KV
    hkv = pid_z % H_KV
    b64 = b.to(tl.int64)
    L = tl.load(PrefixLen + b)

    # -- this program's split and rows: programs [0, NARROW_GROUPS) take the split s_L that holds position L,
    #    NARROW rows each when s_L is a 256-key split (else BLOCK_M rows, the programs past WIDE_GROUPS idle);
    #    the others take the other splits, last split first, BLOCK_M rows each ------------------------------
    s_L = _split_of(L)
    narrow = s_L < 16
    is_l = pid < NARROW_GROUPS
    w = pid - NARROW_GROUPS
    s_w = NUM_SPLITS - 2 - w // tl.maximum(WIDE_GROUPS, 1)
    pid_s = tl.where(is_l, s_L, s_w + (s_w >= s_L).to(s_w.dtype))
    row0 = tl.where(is_l, pid * tl.where(narrow, NARROW, BLOCK_M), (w % tl.maximum(WIDE_GROUPS, 1)) * BLOCK_M)
    nrows = tl.where(is_l, tl.where(narrow, NARROW, tl.where(pid < WIDE_GROUPS, BLOCK_M, 0)), BLOCK_M)

    arange_m = tl.arange(0, BLOCK_M)
    offs_r = row0 + arange_m
    row_ok = (arange_m < nrows) & (offs_r < M * GROUP)   # the tile's rows past nrows are padding
    node = offs_r // GROUP
    head = hkv * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    arange_n = tl.arange(0, BLOCK_N)

    # -- this block's rows: positions p = L + depth, the block's nodes [first, last] ---------------
    depth = tl.load(Depth + b64 * stride_db + node, mask=row_ok, other=0)
    pos = L + depth
    hi = tl.max(tl.where(row_ok, pos, -1), 0)        # the block's last visible position (-1: no rows)
    first = row0 // GROUP
    last = tl.minimum(M - 1, (row0 + nrows - 1) // GROUP)

    q_ptrs = (Q + b64 * stride_qb + head.to(tl.int64)[:, None] * stride_qh
              + node[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh
    a_base = Anc + b64 * stride_ab

    ones = tl.full([BLOCK_N, 16], 1.0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # the split's tiles [s_lo, s_hi) in position order: the prefix tiles, then those that reach the tree
    # (module docstring, "Two loops per split")
    s_lo, s_end = _split_range(pid_s)
    s_hi = tl.minimum(s_end, hi + 1)
    tree_lo = tl.maximum(s_lo, (L // BLOCK_N) * BLOCK_N)     # the first tile with n0 + BLOCK_N > L
    for n0 in range(s_lo, tl.minimum(s_hi, tree_lo), BLOCK_N):
        # == a tile of the verified prefix: every row sees every lane; one K/V tile for all rows ==
        offs_n = n0 + arange_n
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=d_ok[None, :], other=0.0)
        s = _qk(q, kT, IS_FP32, UPCAST) * qk_scale
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, ones, IS_FP32, UPCAST, V.dtype.element_ty)
        acc = _pv(p, v, acc * alpha[:, None], IS_FP32, UPCAST)
    for n0 in range(tree_lo, s_hi, BLOCK_N):
        # == a tile that reaches the tree: lane t holds cache row t (t < L) or the row's ancestor at
        #    depth t - L; built per node, each node's rows kept, the other rows discarded ==========
        offs_n = n0 + arange_n
        in_prefix = offs_n < L
        t = offs_n - L
        s = tl.full([BLOCK_M, BLOCK_N], float("-inf"), dtype=tl.float32)
        for j in range(first, last + 1):
            src, lane_ok = _node_lanes(Depth, a_base, b64 * stride_db, j, stride_ai, offs_n, t, in_prefix, L)
            kT = tl.load(k_base + src[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=lane_ok[None, :] & d_ok[:, None], other=0.0)
            s_j = _qk(q, kT, IS_FP32, UPCAST) * qk_scale
            s = tl.where((node == j)[:, None] & lane_ok[None, :], s_j, s)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, ones, IS_FP32, UPCAST, V.dtype.element_ty)
        acc_scaled = acc * alpha[:, None]
        acc = acc_scaled
        for j in range(first, last + 1):
            src, lane_ok = _node_lanes(Depth, a_base, b64 * stride_db, j, stride_ai, offs_n, t, in_prefix, L)
            v = tl.load(v_base + src[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=lane_ok[:, None] & d_ok[None, :], other=0.0)
            acc_j = _pv(p, v, acc_scaled, IS_FP32, UPCAST)
            acc = tl.where((node == j)[:, None], acc_j, acc)

    # -- partial: normalised o and base-2 lse; a row that saw nothing in this split -> (0, -inf) ----
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    p_ptrs = O_part + pid_z.to(tl.int64) * stride_pz + pid_s * stride_pp + offs_r[:, None] * stride_pr + offs_d[None, :]
    tl.store(p_ptrs, o, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(L_part + pid_z.to(tl.int64) * stride_lz + pid_s * stride_lp + offs_r, lse, mask=row_ok)


def ancestor_table(tree_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(anc [B, M, M] int32, depth [B, M] int32)`` from an ancestor-or-self mask [B, M, M].

    ``anc[b, i, d]`` is the tree row of node i's ancestor at depth d (``d <= depth[b, i]``; the entry
    at ``d = depth`` is i itself) -- the ancestors in index order, which is depth order for nodes in
    topological order. Plain torch ops, no host synchronisation (CUDA-graph capturable).
    """
    m = tree_mask.shape[-1]
    idx = torch.arange(m, dtype=torch.int32, device=tree_mask.device)
    anc = torch.where(tree_mask, idx, m).sort(dim=-1).values.to(torch.int32)
    depth = tree_mask.sum(dim=-1, dtype=torch.int32) - 1
    return anc, depth


MIN_PROGRAMS = 1024
"""16-bit BLOCK_M rule: the largest tile (<= 64 rows) whose grid still has this many programs (about eight
waves of an H100/H200's 132 SMs); below it, the smallest tile. BENCHMARKS "Session 29: a 16-row tail tile
..., and the attention's BLOCK_M": the 69-node Llama-3-8B verification was fastest at BLOCK_M 16 / 32 / 64 at a 1k / 4k / 32k
prefix -- 5, 17 and 45 key splits -- which this rule picks."""


FILL_PROGRAMS = 256
"""Narrow-program rule (16-bit, GPU): the programs of the split that holds L (below position 4096) hold as few
whole nodes as keep their count -- B x Hkv x row groups -- within this many. Their tiles that reach the tree loop
over the program's nodes (two gathered loads and two dots per node), so with few KV heads (the embedded model)
that loop is the kernel's critical path. The other splits' programs are not counted: they hold BLOCK_M rows
whatever this rule picks, and only the split that holds L has programs per row group. BENCHMARKS "Session 37:
fewer nodes per attention program"."""


def decode_attention_config(rows: int, head_dim: int, dtype: torch.dtype, programs_per_tile: int = 1,
                            group: int = 1, heads: int = 1) -> dict:
    """Tile sizes for ``rows = M * G`` packed query rows (``group`` = G query heads per KV head),
    ``programs_per_tile`` = key splits x B x Hkv (the grid's other two axes), ``heads`` = B x Hkv. BLOCK_M
    follows the rows and the grid, and ``program_rows`` (the rows of one program of the split that holds L, <=
    BLOCK_M, the rest of its tile padding) follows the heads: an MMA never mixes rows, and nothing here reduces
    across a tile's layout, so neither changes a row's bits. BLOCK_N is fixed per dtype (lanes are positions:
    it is part of every row's arithmetic)."""
    if interpreter_active():
        return dict(block_m=16, program_rows=16, block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        block_m = min(max(16, next_pow2(rows)), 32)
        return dict(block_m=block_m, program_rows=block_m, block_n=32, num_warps=4, num_stages=2)
    block_m = _gpu_block_m(rows, programs_per_tile)
    return dict(block_m=block_m, program_rows=_gpu_program_rows(rows, group, block_m, heads),
                block_n=64, num_warps=4, num_stages=2)


def _gpu_block_m(rows: int, programs_per_tile: int) -> int:
    """The 16-bit BLOCK_M of :func:`decode_attention_config` on the GPU (pure, so the CPU tests check it):
    at most 64 rows (a tile that reaches the tree costs two dots per node of the program), halved while the
    grid would have fewer than :data:`MIN_PROGRAMS` programs (short prefixes: few key splits), at least 16."""
    block_m = min(max(16, next_pow2(rows)), 64)
    while block_m > 16 and triton.cdiv(rows, block_m) * programs_per_tile < MIN_PROGRAMS:
        block_m //= 2
    return block_m


def _gpu_program_rows(rows: int, group: int, block_m: int, heads: int) -> int:
    """The 16-bit ``program_rows`` of :func:`decode_attention_config` on the GPU (pure, so the CPU tests check it):
    a whole BLOCK_M tile, except at the smallest tile (16 rows), where the programs of the split that holds L
    hold whole nodes -- as few as keep ``heads`` (B x Hkv) x their row groups within :data:`FILL_PROGRAMS`, at
    least one."""
    if block_m > 16 or group > block_m:
        return block_m
    nodes = block_m // group
    while nodes > 1 and triton.cdiv(rows, (nodes // 2) * group) * heads <= FILL_PROGRAMS:
        nodes //= 2
    return nodes * group


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    *,
    config: dict | None = None,
    ancestors: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_prefix: int | None = None,
) -> torch.Tensor:
    """Masked tree attention with position-aligned, row-invariant arithmetic (module docstring).

    Args:
        q: [B, Hq, M, D] fp16/bf16/fp32, D a multiple of 16 up to :data:`MAX_HEAD_DIM`, 1 <= M.
        k, v: [B, Hkv, N, D] (cache views allowed), same dtype/device; Hq a multiple of Hkv.
        prefix_len: [B] integer tensor, each in [0, N - M].
        tree_mask: [B, M, M] bool ancestor-or-self mask, nodes in topological order.
        sm_scale: softmax scale, default 1/sqrt(D).
        config: tile override (block_m, program_rows, block_n, num_warps, num_stages) -- for tests and sweeps;
            block_n must divide :data:`SPLIT_KEYS`. Changing block_n changes the lanes, hence the bits; the
            others never do. A block_m override without program_rows holds a whole tile per program.
        ancestors: ``ancestor_table(tree_mask)`` when the caller has it already (one per step, shared by
            every layer); not checked against the mask.
        max_prefix: the largest ``prefix_len`` when the caller has checked the range already (one check per
            step, not one host synchronisation per layer); it only sizes the split count.

    Returns [B, Hq, M, D] in q's dtype (a view of [B, M, Hq, D] memory). Under CUDA graph capture the
    range of ``prefix_len`` is not checked and the split count is sized for ``N``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, 4)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, m, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v must both be [B={b}, Hkv, N, D={d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv, n = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv} (grouped-query attention)")
    if d % 16 or not 16 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={d} is not supported: it must be a multiple of 16 in [16, {MAX_HEAD_DIM}]")
    if m < 1:
        raise ValueError(f"q must hold at least one query row (M >= 1), got M={m}")
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
        raise TypeError("tree_mask must be a bool tensor [B, M, M]")
    if tuple(tree_mask.shape) != (b, m, m):
        raise ValueError(f"tree_mask must have shape [B, M, M] = {[b, m, m]}, got {list(tree_mask.shape)}")
    check_int_tensor("prefix_len", prefix_len, (b,))
    check_device(("q", q), ("k", k), ("v", v), ("tree_mask", tree_mask), ("prefix_len", prefix_len))
    plen = prefix_len.to(torch.int32)
    if max_prefix is not None:
        hi = max_prefix + m - 1
    elif graph_capturing(q.device) or b == 0:
        hi = n - 1
    else:
        lo, top = (int(x) for x in torch.stack([plen.min(), plen.max()]).tolist())
        if lo < 0 or top > n - m:
            raise ValueError(f"prefix_len must be in [0, N - M] = [0, {n - m}] so the M={m} new rows fit in k/v "
                             f"(N={n}); got range [{lo}, {top}]")
        hi = top + m - 1
    out = torch.empty((b, m, hq, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    if b == 0:
        return out
    group = hq // hkv
    rows = m * group
    num_splits = num_splits_for(hi + 1)
    cfg = dict(decode_attention_config(rows, d, q.dtype, num_splits * b * hkv, group, b * hkv))
    if config:
        cfg.update(config)
        if "block_m" in config and "program_rows" not in config:
            cfg["program_rows"] = cfg["block_m"]   # a tile override holds a whole tile per program
    if SPLIT_KEYS % cfg["block_n"]:
        raise ValueError(f"block_n={cfg['block_n']} must divide SPLIT_KEYS={SPLIT_KEYS}")
    block_d = next_pow2(d)
    anc, depth = ancestor_table(tree_mask) if ancestors is None else ancestors
    o_part = torch.empty((b * hkv, num_splits, rows, d), device=q.device, dtype=torch.float32)
    l_part = torch.empty((b * hkv, num_splits, rows), device=q.device, dtype=torch.float32)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    program_rows = cfg["program_rows"]
    if not 1 <= program_rows <= cfg["block_m"]:
        raise ValueError(f"program_rows={program_rows} must be in [1, block_m={cfg['block_m']}]")
    narrow_groups, wide_groups = triton.cdiv(rows, program_rows), triton.cdiv(rows, cfg["block_m"])
    programs = narrow_groups + (num_splits - 1) * wide_groups
    if programs > 65535:
        raise ValueError(f"{m} rows over {num_splits} key splits need {programs} programs per KV head, over the "
                         f"grid's 65535: verify fewer nodes at a time or raise config['program_rows']")
    # axis 0 the (batch, KV head) pairs, so every head's programs of one split are dispatched together: the split
    # that holds L first, then the others last split first (module docstring)
    grid = (b * hkv, programs)
    _decode_attention_kernel[grid](
        q, k, v, o_part, l_part, plen, anc, depth,
        *q.stride(), *k.stride(), *v.stride(),
        anc.stride(0), anc.stride(1), depth.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        l_part.stride(0), l_part.stride(1),
        scale * LOG2E, hkv, m, num_splits, narrow_groups, wide_groups,
        GROUP=group, HEAD_DIM=d,
        BLOCK_M=cfg["block_m"], NARROW=program_rows, BLOCK_N=cfg["block_n"], BLOCK_D=block_d,
        IS_FP32=q.dtype == torch.float32, UPCAST=q.dtype != torch.float32 and q.device.type == "cpu",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        enable_fp_fusion=False,   # one rounding per op on both tile paths (module docstring, "No FMA contraction")
    )
    return merge_partials(o_part, l_part, out, hkv, group)
