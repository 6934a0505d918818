"""Tree attention for speculative verification, as Triton kernels (split-KV, GQA-packed).

Computes exactly what :func:`specdec.ref.attention.tree_attention` computes (docs/design.md §6)::

    q     [B, Hq,  M, D]   the M tree nodes' queries
    k, v  [B, Hkv, N, D]   rows [0, prefix_len) = verified prefix,
                           rows [prefix_len, prefix_len + M) = the M tree nodes
    tree_mask [B, M, M]    bool, True = node i may attend to node j (ancestor or self)
    prefix_len             int, or [B] integer tensor (ragged batch)
    ->    [B, Hq, M, D]    in q's dtype

Every node sees the whole prefix plus the tree rows its mask row allows. ``k``/``v`` may be views
into a larger preallocated cache ``[B, Hkv, capacity, D]``: all strides are honoured and no row at
or beyond ``prefix_len + M`` (nor any padded head-dim column) is ever loaded.

How it runs (two launches):

1. ``_split_attention_kernel``, grid ``(row_blocks, num_splits + 1, B * Hkv)``.
   * Rows: the ``G = Hq // Hkv`` query heads of one KV group times the M nodes are packed into one
     row space, ``row = node * G + g``; a program owns ``BLOCK_M`` of those rows, so each K/V tile
     it loads serves all of them (and the row blocks of one split, being adjacent in launch
     order, share tiles through L2).
   * Splits ``0 .. num_splits - 1`` (flash-decoding): the prefix ``[0, prefix_len[b])`` is cut into
     ``num_splits`` equal chunks (multiples of ``BLOCK_N``) so that a single sequence fills the
     GPU. Full ``BLOCK_N`` tiles run without masks; only the last tile of a chunk is masked.
   * Split ``num_splits``: the tree block, keys ``prefix_len[b] + j`` for ``j < M``, with
     ``tree_mask[b, node, j]`` applied to the scores.
   * Each program runs an online softmax in fp32 and writes a partial ``(o, lse)`` in fp32:
     ``o`` already normalised, ``lse`` the log-sum-exp of its scores.
2. ``_merge_kernel``, grid ``(row blocks, B * Hkv, D blocks)``: ``o = sum_p 2^(lse_p - max) o_p /
   sum_p 2^(lse_p - max)``, written in q's dtype into ``[B, Hq, M, D]``. Partial ``p`` goes to lane
   ``p % 16``; each lane keeps a running max over its partials (16 loaded per iteration, software-
   pipelined), then one fixed-shape reduction combines the lanes. The order is fixed by the partial
   index alone, and trailing empty partials change no bit.

Log base: EVERY lse stored or combined here is base 2. Scores are scaled by
``sm_scale * log2(e)`` once (so ``exp(s * sm_scale) = exp2(s * qk_scale)``) and all exponentials
are ``exp2``. (The natural-log lse of the reference is ``lse_2 * ln 2``.)

Masking guards: a chunk or tree block in which a row sees no key (empty split, ragged
``prefix_len`` shorter than the split, a fully masked tree row) stores ``o = 0, lse = -inf``; the
running max uses 0 in place of ``-inf`` so ``-inf - -inf`` never appears, and the merge gives such
partials weight ``exp2(-inf) = 0``. A row that sees no key at all returns zeros (as the reference).

The same kernel serves the GLIDE draft (see :mod:`.glide_attention`): optional per-row key bounds
``[row_lo, row_hi)`` inside the split range, and a tree block at any row offset with any width.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    SUPPORTED_HEAD_DIMS,
    check_device,
    check_int_tensor,
    check_tensor,
    graph_capturing,
    interpreter_active,
    next_pow2,
    sm_count,
)

__all__ = ["tree_attention", "split_attention", "pick_config", "pick_num_splits"]

LOG2E = 1.4426950408889634
# Integer kernel arguments that change with the call's sizes (M, T, splits, prompt length): not
# specialised (Triton would otherwise compile a new variant whenever one becomes 1 or a multiple of
# 16 -- a stall of a second or more in the middle of decoding). K/V strides stay specialised.
_VARYING = ["stride_lz", "stride_lp"]
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q,
    k_base, v_base, offs_n, offs_d, d_ok, key_ok, keep,
    stride_kn, stride_kd, stride_vn, stride_vd,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    LOAD_MASK: tl.constexpr, SCORE_MASK: tl.constexpr, IS_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One online-softmax step over the key rows ``offs_n`` (base 2, fp32 statistics).

    ``key_ok`` [BLOCK_N] masks the loads (LOAD_MASK); ``keep`` [BLOCK_M, BLOCK_N] masks the scores
    (SCORE_MASK). Padded head-dim columns (BLOCK_D > HEAD_DIM) are never loaded.
    """
    # -- load K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D]; masked lanes read nothing --------
    kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if LOAD_MASK:
        if BLOCK_D == HEAD_DIM:
            kT = tl.load(kT_ptrs, mask=key_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        else:
            kT = tl.load(kT_ptrs, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    # -- scores in base-2 units: s * sm_scale * log2(e) --------------------------------------------
    if IS_FP32:
        qk = tl.dot(q, kT, input_precision="ieee")
    elif UPCAST_DOT:  # interpreter only: its bf16 tl.dot is wrong, so multiply in fp32
        qk = tl.dot(q.to(tl.float32), kT.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, kT)
    qk = qk * qk_scale
    if SCORE_MASK:
        qk = tl.where(keep, qk, float("-inf"))
    # -- online softmax: new running max; use 0 where a row has seen nothing yet (no -inf - -inf) --
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # -- accumulate P @ V in fp32 ------------------------------------------------------------------
    if IS_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    elif UPCAST_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_VARYING + ["stride_rb", "stride_tb", "stride_ti", "M", "T", "NUM_SPLITS"])
def _split_attention_kernel(
    Q, K, V, O_part, L_part,
    SpanLo, SpanHi, RowLo, RowHi, TreeStart, TreeMask,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rm,
    stride_tb, stride_ti, stride_tj,
    stride_pz, stride_pp, stride_pr,
    stride_lz, stride_lp,
    qk_scale, H_KV, M, T, NUM_SPLITS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SPAN_LO: tl.constexpr, ROW_BOUNDS: tl.constexpr, IS_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # -- which rows, which part, which (batch, kv head) ----------------------------------------------
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)          # 0 .. NUM_SPLITS-1: prefix chunks; NUM_SPLITS: tree block
    pid_z = tl.program_id(2)          # b * H_KV + kv head
    b = pid_z // H_KV
    hkv = pid_z % H_KV
    b64 = b.to(tl.int64)

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # packed rows: row = node * GROUP + g
    row_ok = offs_r < M * GROUP
    node = offs_r // GROUP
    head = hkv * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # -- the queries of all GROUP heads x BLOCK_M/GROUP nodes: loaded once, kept in registers ------
    q_ptrs = (Q + b64 * stride_qb + head.to(tl.int64)[:, None] * stride_qh
              + node[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = K + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hkv.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    arange_n = tl.arange(0, BLOCK_N)

    if pid_s == NUM_SPLITS:
        # ================= tree block: keys tree_start[b] + j, j < T, masked by tree_mask ==========
        t0 = tl.load(TreeStart + b)
        for j0 in range(0, T, BLOCK_N):
            offs_j = j0 + arange_n
            j_ok = offs_j < T
            allowed = tl.load(TreeMask + b64 * stride_tb + node[:, None] * stride_ti + offs_j[None, :] * stride_tj,
                              mask=row_ok[:, None] & j_ok[None, :], other=0)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, t0 + offs_j, offs_d, d_ok, j_ok, allowed != 0,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, True, True, IS_FP32, UPCAST_DOT)
    else:
        # ================= prefix chunk: keys [n_start, n_end) of [span_lo, span_hi) ===============
        span_hi = tl.load(SpanHi + b)
        if HAS_SPAN_LO:
            span_lo = tl.load(SpanLo + b)
        else:
            span_lo = 0
        span = tl.maximum(span_hi - span_lo, 0)
        chunk = tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_N) * BLOCK_N
        n_start = span_lo + pid_s * chunk
        n_end = tl.minimum(n_start + chunk, span_hi)
        if ROW_BOUNDS:
            # per-row window [lo, hi): narrow the chunk to what this row block can see
            r_ptrs = b64 * stride_rb + node * stride_rm
            lo_r = tl.load(RowLo + r_ptrs, mask=row_ok, other=2147483647)
            hi_r = tl.load(RowHi + r_ptrs, mask=row_ok, other=0)
            n_start = tl.maximum(n_start, tl.min(lo_r, 0))
            n_end = tl.minimum(n_end, tl.max(hi_r, 0))
        else:
            lo_r = offs_r
            hi_r = offs_r
        n_full = n_start + tl.maximum(n_end - n_start, 0) // BLOCK_N * BLOCK_N
        # -- full tiles: no load masks (every key row exists and is < span_hi) -----------------------
        for n0 in range(n_start, n_full, BLOCK_N):
            offs_n = n0 + arange_n
            keep = (offs_n[None, :] >= lo_r[:, None]) & (offs_n[None, :] < hi_r[:, None])
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, offs_n, offs_d, d_ok, offs_n < n_end, keep,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, False, ROW_BOUNDS, IS_FP32, UPCAST_DOT)
        # -- last partial tile: loads masked to the chunk end ------------------------------------------
        if n_full < n_end:
            offs_n = n_full + arange_n
            key_ok = offs_n < n_end
            if ROW_BOUNDS:
                keep = key_ok[None, :] & (offs_n[None, :] >= lo_r[:, None]) & (offs_n[None, :] < hi_r[:, None])
            else:
                keep = key_ok[None, :] & row_ok[:, None]
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, k_base, v_base, offs_n, offs_d, d_ok, key_ok, keep,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale,
                HEAD_DIM, BLOCK_D, True, True, IS_FP32, UPCAST_DOT)

    # -- partial result: normalised o and base-2 lse; a row that saw nothing -> (0, -inf) ------------
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    p_ptrs = O_part + pid_z.to(tl.int64) * stride_pz + pid_s * stride_pp + offs_r[:, None] * stride_pr + offs_d[None, :]
    tl.store(p_ptrs, o, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(L_part + pid_z.to(tl.int64) * stride_lz + pid_s * stride_lp + offs_r, lse, mask=row_ok)


@triton.jit(do_not_specialize=_VARYING + ["ROWS", "NUM_PARTS"])
def _merge_kernel(
    O_part, L_part, Out,
    stride_pz, stride_pp, stride_pr,
    stride_lz, stride_lp,
    stride_ob, stride_oh, stride_om, stride_od,
    H_KV, ROWS, NUM_PARTS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, LANES: tl.constexpr, STAGES: tl.constexpr,
):
    # A program merges BLOCK_R packed rows x BLOCK_D columns. Partial p goes to lane p % LANES;
    # each lane runs the online-softmax rule (a running base-2 max) over its own partials, LANES
    # partials loaded per iteration, so the dependent chain is ceil(parts / LANES) steps long, not
    # parts (the merge is latency-bound: a 32k step merges 45 partials of 4 rows). Then the lanes'
    # states are combined by one reduction over a [LANES, BLOCK_R, BLOCK_D] tile. Every constexpr and
    # the warp count are the same for every launch, so the tile's layout -- and with it the order in
    # which a row's partials are added -- depends on nothing but the partial index: a row's bits do
    # not change with M, the batch or the other rows. A partial that is empty for a row (o = 0,
    # lse = -inf) leaves its lane exactly as it was (alpha = 1, weight 0), and a lane that saw
    # nothing adds exact zeros, so trailing empty partials (a deeper tree's extra splits) change no
    # bit. The loads of an iteration do not depend on the previous one: the loop is
    # software-pipelined (STAGES iterations in flight; the depth never changes the arithmetic).
    pid_r = tl.program_id(0)
    pid_z = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = pid_z // H_KV
    hkv = pid_z % H_KV
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < ROWS
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_w = tl.arange(0, LANES)
    l_base = L_part + pid_z.to(tl.int64) * stride_lz + offs_r[None, :]                                   # [1, R]
    o_base = (O_part + pid_z.to(tl.int64) * stride_pz + offs_r[None, :, None] * stride_pr
              + offs_d[None, None, :])                                                                    # [1, R, D]

    m = tl.full([LANES, BLOCK_R], float("-inf"), dtype=tl.float32)   # each lane's running max of its lse
    wsum = tl.zeros([LANES, BLOCK_R], dtype=tl.float32)              # sum of 2^(lse_p - m) over the lane
    acc = tl.zeros([LANES, BLOCK_R, BLOCK_D], dtype=tl.float32)      # sum of 2^(lse_p - m) * o_p over the lane
    for p0 in tl.range(0, NUM_PARTS, LANES, num_stages=STAGES):
        p = p0 + offs_w
        ok = (p < NUM_PARTS)[:, None] & r_ok[None, :]                                                    # [W, R]
        lse = tl.load(l_base + p[:, None] * stride_lp, mask=ok, other=float("-inf"))
        o_p = tl.load(o_base + p[:, None, None] * stride_pp, mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # nothing seen yet: no -inf - -inf
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)                           # an empty partial (lse = -inf) weighs 0
        acc = acc * alpha[:, :, None] + w[:, :, None] * o_p
        wsum = wsum * alpha + w
        m = m_new
    # -- combine the lanes: the max is exact in any order; the sums follow the fixed tile -----------
    mx = tl.max(m, 0)                                                                                     # [R]
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    scale = tl.math.exp2(m - mx_safe[None, :])                      # [W, R]; a lane that saw nothing: 0
    num = tl.sum(acc * scale[:, :, None], 0)
    den = tl.sum(wsum * scale, 0)
    out = num / tl.where(den > 0.0, den, 1.0)[:, None]              # a row that saw no key at all -> 0

    # -- write rows r = node * GROUP + g of [B, Hq, M, D] in the output dtype ---------------------
    node = offs_r // GROUP
    head = hkv * GROUP + offs_r % GROUP
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh
              + node[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launch heuristics
# ---------------------------------------------------------------------------------------------


def pick_config(rows: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes for ``rows = M * G`` packed query rows (measured on H100, see BENCHMARKS)."""
    block_m = min(max(16, next_pow2(rows)), 128 if dtype != torch.float32 else 64)
    if head_dim > 128:   # a [BLOCK_M, 256] fp32 accumulator: half the rows per program
        block_m = min(block_m, 64)
    if block_m >= 128:
        return dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        return dict(block_m=block_m, block_n=32, num_warps=4, num_stages=2)
    return dict(block_m=block_m, block_n=64, num_warps=4, num_stages=3)


def pick_num_splits(max_span: int, programs_per_split: int, sms: int, block_n: int, block_m: int = 16) -> int:
    """Prefix chunks per (batch, kv head, row block) so one launch fills ``sms`` SMs.

    Measured on H100 (scripts/bench_kernels.py --tune; BENCHMARKS "Session 6"): small row blocks
    (decode-like, memory bound, several programs per SM) do best with about one program per SM.
    128-row blocks (tensor-core bound, one program per SM) pay a fixed cost per program (the query
    tile, a 64 KiB partial write, one more partial to merge), so they use ONE full wave of ``sms``
    programs, never a second, partial one (Vicuna-7B shape, M = 69, 32k: 4 splits 219 us against 9
    splits 255 us; Llama-3-8B shape at 16k: 5 splits 76 us against 11 splits 86 us). Only when two
    full waves fill the SMs clearly better (> 5 points) and every chunk still holds >= 8192 keys do
    they take two waves (Llama-3-8B shape at 128k: 24 programs per split -> 11 splits, 416 us,
    against 5 splits, 445 us). Every chunk keeps at least ``4 * block_n`` keys (less work than that
    does not pay for its partial write and merge).
    """
    if max_span <= 0:
        return 1
    pps = max(1, programs_per_split)
    if block_m >= 128:
        def fill(s: int) -> float:  # share of the SMs busy over the launch's waves
            return s * pps / (triton.cdiv(s * pps, sms) * sms)

        one, two = max(1, sms // pps), max(1, 2 * sms // pps)
        want = two if fill(two) > fill(one) + 0.05 and max_span // two >= 8192 else one
    else:
        want = triton.cdiv(sms, pps)
    most = triton.cdiv(max_span, 4 * block_n)
    return int(max(1, min(want, most, 4096)))


# ---------------------------------------------------------------------------------------------
# Generic launcher (used by tree_attention and the GLIDE variants)
# ---------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, m, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)}: need [B={b}, Hkv, N, D={d}]")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv} (grouped-query attention)")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={d} is not supported: it must be a multiple of 16 in [16, 256]")
    if m < 1:
        raise ValueError(f"q must hold at least one query row (M >= 1), got M={m}")
    check_device(("q", q), ("k", k), ("v", v))
    n = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        reach = (max(n, 1) - 1) * abs(t.stride(2)) + (d - 1) * abs(t.stride(3))
        if reach > _INT32_MAX:
            raise ValueError(f"{name}: one head spans more than 2^31 elements (N={n}, strides {t.stride()}); "
                             "use a layout with the sequence dimension inside [B, Hkv, N, D]")


def split_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    span_hi: torch.Tensor,
    max_span: int,
    span_lo: torch.Tensor | None = None,
    row_lo: torch.Tensor | None = None,
    row_hi: torch.Tensor | None = None,
    tree_start: torch.Tensor | None = None,
    tree_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the split-KV kernel and the merge. Inputs must already be validated.

    Query ``i`` of batch ``b`` sees the key rows ``n`` with ``span_lo[b] <= n < span_hi[b]`` (and,
    when given, ``row_lo[b, i] <= n < row_hi[b, i]``), plus the tree rows ``tree_start[b] + j``
    with ``tree_mask[b, i, j]``. ``span_*``/``row_*``/``tree_start`` are int32 tensors on q's
    device (row bounds may be expanded views); ``max_span`` (a host int bounding
    ``span_hi - span_lo``) only steers the number of splits. Returns [B, Hq, M, D] as a view of a
    [B, M, Hq, D]-contiguous tensor (so "b h t d -> b t (h d)" needs no copy).
    """
    b, hq, m, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    rows = m * group
    # the output is a [B, Hq, M, D] view of [B, M, Hq, D] memory: the o-projection's input
    # "b h t d -> b t (h d)" is then a free reshape instead of a copy kernel
    out = torch.empty((b, m, hq, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    if b == 0:
        return out
    cfg = dict(pick_config(rows, d, q.dtype))
    if config:
        cfg.update(config)
    block_m, block_n = cfg["block_m"], cfg["block_n"]
    block_d = next_pow2(d)
    row_blocks = triton.cdiv(rows, block_m)
    if num_splits is None:
        num_splits = pick_num_splits(max_span, b * hkv * row_blocks, sm_count(q.device), block_n, block_m)
    has_tree = tree_mask is not None
    num_parts = num_splits + (1 if has_tree else 0)

    # partial results: o [B*Hkv, parts, rows, D] and base-2 lse [B*Hkv, parts, rows], fp32
    o_part = torch.empty((b * hkv, num_parts, rows, d), device=q.device, dtype=torch.float32)
    l_part = torch.empty((b * hkv, num_parts, rows), device=q.device, dtype=torch.float32)

    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    row_bounds = row_lo is not None
    if row_bounds:
        assert row_hi is not None and row_lo.stride() == row_hi.stride()
        rs = row_lo.stride()
    else:
        row_lo = row_hi = span_hi
        rs = (0, 0)
    if has_tree:
        tm = tree_mask.view(torch.uint8)
        ts = tm.stride()
        t_len = tree_mask.shape[2]
    else:
        tm, ts, t_len, tree_start = span_hi, (0, 0, 0), 0, span_hi
    grid = (row_blocks, num_parts, b * hkv)
    _split_attention_kernel[grid](
        q, k, v, o_part, l_part,
        span_lo if span_lo is not None else span_hi, span_hi, row_lo, row_hi, tree_start, tm,
        *q.stride(), *k.stride(), *v.stride(),
        rs[0], rs[1], ts[0], ts[1], ts[2],
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        l_part.stride(0), l_part.stride(1),
        scale * LOG2E, hkv, m, t_len, num_splits,
        GROUP=group, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_SPAN_LO=span_lo is not None, ROW_BOUNDS=row_bounds, IS_FP32=q.dtype == torch.float32,
        UPCAST_DOT=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return merge_partials(o_part, l_part, out, hkv, group)


# The merge's one tile configuration (LANES, BLOCK_R, BLOCK_D, warps): fixed for every launch -- it decides a row's
# summation order, so it may not follow M, the batch or the part count. Chosen on an H100 (BENCHMARKS "Session 34:
# the merge in lanes"): 16 lanes x 4 rows x 32 columns, 2 warps was the fastest of eleven tiles over the 32k / 128k
# step and 69-row merges taken together.
MERGE_LANES, MERGE_BLOCK_R, MERGE_BLOCK_D, MERGE_WARPS = 16, 4, 32, 2
# Under the Triton interpreter (CPU) a launch costs per program, not per byte, so it takes one tile of 32 rows and
# the whole head dim (the same lanes: the same algorithm, and again one fixed tile per head dim for every launch,
# so the CPU tests check the same invariances); 2-4x fewer interpreted programs than the GPU tile on test shapes.
MERGE_INTERPRETER_BLOCK_R = 32


def merge_partials(o_part: torch.Tensor, l_part: torch.Tensor, out: torch.Tensor, hkv: int, group: int,
                   stages: int = 2) -> torch.Tensor:
    """Launch :func:`_merge_kernel`: the partials ``o_part`` [B*Hkv, parts, rows, D] / ``l_part`` [B*Hkv, parts,
    rows] (fp32, base-2 lse) merged into ``out`` [B, Hq, M, D] (``rows = M * group``, row ``node * group + g``);
    returns ``out``. Matches folding the partials one by one through the reference's log-sum-exp merge
    (:func:`specdec.ref.attention.merge_attention`, natural-log lse = base-2 lse x ln 2) within fp32 rounding; its
    own order is fixed by the partial index alone (see the kernel). Grid ``(row blocks, B*Hkv, D blocks)``;
    ``stages`` iterations of LANES partials in flight (the depth changes when loads are issued, never the
    arithmetic: the same bits at any depth)."""
    rows, d = o_part.shape[2], o_part.shape[3]
    block_r, block_d = ((MERGE_INTERPRETER_BLOCK_R, next_pow2(d)) if interpreter_active()
                        else (MERGE_BLOCK_R, MERGE_BLOCK_D))
    _merge_kernel[(triton.cdiv(rows, block_r), o_part.shape[0], triton.cdiv(d, block_d))](
        o_part, l_part, out,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        l_part.stride(0), l_part.stride(1),
        *out.stride(),
        hkv, rows, o_part.shape[1],
        GROUP=group, HEAD_DIM=d, BLOCK_R=block_r, BLOCK_D=block_d, LANES=MERGE_LANES, STAGES=stages,
        num_warps=MERGE_WARPS, enable_fp_fusion=False,   # as measured; one rounding per multiply and add
    )
    return out


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    *,
    num_splits: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Masked tree attention; matches :func:`specdec.ref.attention.tree_attention`.

    Args:
        q: [B, Hq, M, D] fp16/bf16/fp32, D a multiple of 16 up to 256, M >= 1.
        k, v: [B, Hkv, N, D], same dtype/device, Hq a multiple of Hkv; any strides (cache views).
        prefix_len: int or [B] integer tensor, each in [0, N - M].
        tree_mask: [B, M, M] bool, True = may attend.
        sm_scale: softmax scale, default 1/sqrt(D).
        num_splits: prefix chunks per (batch, kv head); default from SM count and prefix length.
        config: override tile sizes (block_m, block_n, num_warps, num_stages) -- for tuning.

    Returns [B, Hq, M, D] in q's dtype (a view of [B, M, Hq, D] memory). Internally every lse is base 2 (see module docstring).
    Under CUDA graph capture the value range of a tensor ``prefix_len`` is not checked (no host
    sync) and the split count is sized for ``N``.
    """
    _check_qkv(q, k, v)
    b, hq, m, d = q.shape
    n = k.shape[2]
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
        raise TypeError("tree_mask must be a bool tensor [B, M, M]")
    if tuple(tree_mask.shape) != (b, m, m):
        raise ValueError(f"tree_mask must have shape [B, M, M] = {[b, m, m]}, got {list(tree_mask.shape)}")
    check_device(("q", q), ("tree_mask", tree_mask))
    if isinstance(prefix_len, torch.Tensor):
        check_int_tensor("prefix_len", prefix_len, (b,))
        plen = prefix_len.to(device=q.device, dtype=torch.int32)
        if graph_capturing(q.device):
            max_span = n - m
        else:
            lo, hi = (int(x) for x in torch.stack([prefix_len.min(), prefix_len.max()]).tolist()) if b else (0, 0)
            if lo < 0 or hi > n - m:
                raise ValueError(f"prefix_len must be in [0, N - M] = [0, {n - m}] so the M={m} tree rows fit "
                                 f"in k/v (N={n}); got range [{lo}, {hi}]")
            max_span = hi
    else:
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
            raise TypeError(f"prefix_len must be an int or a [B] integer tensor, got {type(prefix_len).__name__}")
        if prefix_len < 0 or prefix_len > n - m:
            raise ValueError(f"prefix_len must be in [0, N - M] = [0, {n - m}] so the M={m} tree rows fit "
                             f"in k/v (N={n}); got {prefix_len}")
        plen = torch.full((b,), prefix_len, dtype=torch.int32, device=q.device)
        max_span = prefix_len
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1, got {num_splits!r}")
    return split_attention(
        q, k, v, span_hi=plen, max_span=max_span, tree_start=plen, tree_mask=tree_mask,
        sm_scale=sm_scale, num_splits=num_splits, config=config,
    )
