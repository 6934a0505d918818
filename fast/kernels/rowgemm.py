"""Row-invariant GEMMs for the decode phase: every output row is computed bit for bit the same whatever M.

A verification pass scores M tokens at once while a decode step scores one; for speculation to be
exact in bf16 the row of a token must come out of both with the same bits (docs/design.md §8).
cuBLAS picks its kernel, tiles and split-K from M, and the one-row GEMV (:mod:`.gemv`) reduces
on CUDA cores in a different order than any tensor-core GEMM -- so neither can serve both. These
kernels use ONE tile configuration per weight shape (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, warps,
stages and the K split chosen from ``N``, ``K`` and the dtype, never from M) and the K loop in one
fixed order; a K split (for weights with few output tiles) stores fp32 partials that the last
program to arrive sums in split order, so the split never changes with M either. Rows are padded up to ``BLOCK_M`` with masked loads instead of switching kernels, and
tensor-core MMAs never mix rows, so a row's result depends only on that row's inputs.

Grid ``(cdiv(M, BLOCK_M), programs over N)``, the M tiles varying fastest so the programs sharing
a weight tile run together and read it from L2 once it has been streamed from memory. On Hopper the
operand tiles arrive through TMA tensor descriptors (:func:`_tma_ok`): zero-filled past M and K, the
values the masked pointer loads give, so the load path is not part of a row's arithmetic. With a TAIL
(65-80 rows on the GPU) a program takes BLOCK_M + TAIL rows as two MMA tiles that share each weight tile
(each row's K loop the same), so a 69-row verification multiplies 80 columns instead of 128.

* :func:`row_linear` ``(x [..., K], w [N, K], bias [N] | None) -> [..., N]`` -- ``F.linear``;
  fp32 accumulation, bias added in fp32, one rounding to x's dtype. With ``norm_weight`` (+ ``eps``)
  the product runs on ``rms_norm_ref(x, norm_weight, eps)``, recomputed per tile from the row's
  fp32 statistics (``_row_rstd_kernel``: one program per row, once per call) exactly as the eager
  two ops round it; with
  ``residual`` it returns ``residual + F.linear(...)`` (the product rounded first, the add in fp32
  rounded once, as the eager add). ``silu=True`` takes ``w13 [2F, K]`` and returns
  ``silu(gate) * up`` [..., F] with the eager ops' roundings.

Must match: :func:`specdec.fast.kernels.gemv_ref` / :func:`specdec.fast.kernels.gemv_silu_ref` up to
the fp32 summation order of the product -- and itself, bitwise, for any M from 1 to
:data:`MAX_ROWS` (``tests/fast/test_rowgemm.py`` checks both, on the CPU under the Triton interpreter and
on the GPU). fp32 inputs use IEEE fp32 products (no TF32), so fp32 results stay within the
reference's rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreter_active, next_pow2
from .fused import _DTYPE_CODE, _round_to
from .gemv import linear_operands

try:   # Hopper tensor descriptors (Triton >= 3.4); without them every load goes through pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

__all__ = ["MAX_ROWS", "ROW_TILES", "row_linear", "row_linear_config", "row_tile_limits"]

MAX_ROWS = 8192
"""The most rows one call may take: a decode-phase pass of B x M rows (M up to the fast path's tree limit
of 128 per sequence). Rows are independent, so this bounds only the fp32 split-K workspace."""

ROW_TILES = ((16, 16, 0), (32, 32, 0), (64, 64, 0), (80, 64, 16))
"""The GPU rule's row tiles for 16-bit weights: ``(most rows, BLOCK_M, TAIL)``, the first tier that holds the
rows wins; more rows than the last take 128-row tiles. A verification just past a tier's limit pays for the next
tile on every weight, so its cost steps up there (BENCHMARKS "Session 36: the GLIDE tree's frontier": a
calibration interpolated between 32 and 64 rows priced a 33-node round 10 % low); the fast GLIDE calibration times
both sides of each limit (:func:`row_tile_limits`)."""


def row_tile_limits() -> tuple[int, ...]:
    """Row counts after which the GPU rule's 16-bit row tile grows (16, 32, 64, 80): a verification of
    ``limit + 1`` rows costs a step more than one of ``limit`` rows."""
    return tuple(most for most, _, _ in ROW_TILES)


@triton.jit
def _row_rstd_kernel(X, R, K, stride_xm, eps, BLOCK_K: tl.constexpr):
    """``R[m] = rsqrt(mean(x[m]^2) + eps)`` in fp32, one program per row: the RMSNorm statistics of
    the rows, computed ONCE per call (not per output tile) and in an order fixed by K alone."""
    m = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    ssq = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xk = tl.load(X + m * stride_xm + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
        ssq += xk * xk
    tl.store(R + m, 1.0 / tl.sqrt(tl.sum(ssq, 0) / K + eps))


@triton.jit
def _mma(x, w, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + x @ w^T`` (fp32 accumulator): tensor cores for fp16/bf16, IEEE fp32 products for fp32.
    UPCAST (the CPU interpreter only, whose bf16 ``tl.dot`` is wrong): the same exact products of
    the 16-bit values, taken in fp32."""
    if IEEE:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    elif UPCAST:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _mma_tile(x, w, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr, SWAP: tl.constexpr):
    """One K step of the product: ``acc [BLOCK_M, BLOCK_N] + x @ w^T``, or with SWAP (the weight tile as
    the MMA's row operand, the rows of x as its columns: a wide weight tile per instruction when there
    are few rows) ``acc [BLOCK_N, BLOCK_M] + w @ x^T``. Either way no MMA mixes two rows of x."""
    if SWAP:
        if IEEE:
            return tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        elif UPCAST:
            return tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
        else:
            return tl.dot(w, tl.trans(x), acc)
    else:
        return _mma(x, w, acc, IEEE, UPCAST)


@triton.jit
def _epilogue(y, u, Bias, Res, Y, offs_m, m_ok, offs_n, n_ok, N, stride_ym, stride_rm,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr, RESID: tl.constexpr, CODE: tl.constexpr):
    """Bias in fp32, the eager ops' roundings, one store per output (y: the product, u: the up half)."""
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SILU:
        if HAS_BIAS:
            u += tl.load(Bias + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        gate = _round_to(y, CODE)                            # the w13 GEMM's output rounding
        up = _round_to(u, CODE)
        act = _round_to(gate / (1.0 + tl.exp(-gate)), CODE)  # F.silu in fp32, rounded to the dtype
        y = act * up                                         # `* up`, rounded once by the store
    if RESID:
        res = tl.load(Res + offs_m[:, None] * stride_rm + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        y = _round_to(y, CODE) + res.to(tl.float32)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _x_tile(x_ptr, ok, DX, G, rstd, row0, k0, k_hi, offs_k, NORM: tl.constexpr, CODE: tl.constexpr,
            TMA: tl.constexpr, EVEN: tl.constexpr):
    """The x tile of the rows at ``x_ptr`` (pointers to their first BLOCK_K columns; ``ok``: the rows below M,
    starting at ``row0``) and columns [k0, k0 + BLOCK_K): zeros past M and past the split's K end ``k_hi``;
    with NORM, rms_norm_ref's arithmetic on it -- (x_f32 * rstd) rounded to the dtype, times the norm weight,
    rounded (``rstd``: the rows' scales)."""
    k_ok = k0 + offs_k < k_hi
    # TMA (Hopper): the tile comes through a tensor descriptor; rows past M and columns past K arrive as
    # zeros, the values the masked loads give, so the load path changes no bit of the arithmetic.
    # EVEN (every split a whole number of full K tiles): no K mask -- the same values.
    if TMA:
        xk = DX.load([row0, k0])
    elif EVEN:
        xk = tl.load(x_ptr + k0, mask=ok[:, None], other=0.0)
    else:
        xk = tl.load(x_ptr + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
    if NORM:
        g = tl.load(G + k0 + offs_k, mask=k_ok, other=0.0)
        xn = _round_to(xk.to(tl.float32) * rstd[:, None], CODE)
        xk = (g.to(tl.float32) * xn).to(xk.dtype)
    return xk


@triton.jit
def _store_partials(WS, acc, acc_u, pid_s, rows_pad, offs_m, m_ok, offs_n, n_ws, n_pad, SILU: tl.constexpr):
    """This split's fp32 partials of rows ``offs_m`` into the workspace (only the real rows)."""
    tile = WS + (pid_s * rows_pad + offs_m)[:, None] * n_ws + offs_n[None, :]
    tl.store(tile, acc, mask=m_ok[:, None])
    if SILU:
        tl.store(tile + n_pad, acc_u, mask=m_ok[:, None])


@triton.jit
def _sum_partials(WS, rows_pad, offs_m, m_ok, offs_n, n_ws, n_pad, SPLIT: tl.constexpr, SILU: tl.constexpr,
                  R: tl.constexpr, BLOCK_N: tl.constexpr):
    """The partials of rows ``offs_m`` summed in split order 0, 1, ..., SPLIT - 1 (gate / plain, and up)."""
    base = WS + offs_m[:, None] * n_ws + offs_n[None, :]
    y = tl.load(base, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
    u = tl.zeros([R, BLOCK_N], dtype=tl.float32)
    if SILU:
        u = tl.load(base + n_pad, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT):
        y += tl.load(base + s * rows_pad * n_ws, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
        if SILU:
            u += tl.load(base + s * rows_pad * n_ws + n_pad, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")
    return y, u


@triton.jit(do_not_specialize=["M", "stride_xm", "stride_rm"])
def _row_linear_kernel(
    X, W, DX, DXT, DW, Bias, Y, G, Rstd, Res, WS, Count,
    M, N, K, stride_xm, stride_wn, stride_ym, stride_rm, eps, rows_pad, n_pad, k_split,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr, RESID: tl.constexpr, CODE: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, SWAP: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, TAIL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    # A program takes BLOCK_M + TAIL rows: a BLOCK_M tile and (TAIL > 0) a second, smaller tile of TAIL rows
    # that shares every weight tile -- 69 rows as 64 + 16 MMA columns instead of one 128-row tile. Each row
    # is in exactly one MMA and an MMA never mixes rows, so a row's bits do not depend on which tile it is in.
    pid_m = tl.program_id(0)   # fastest: the M tiles of one weight tile run side by side
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)   # the K split (a fixed number per weight shape)
    TR: tl.constexpr = TAIL if TAIL > 0 else 16    # (the tail's shapes when there is none: never used)
    row0 = pid_m * (BLOCK_M + TAIL)
    offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    if TAIL > 0:
        offs_t = (row0 + BLOCK_M + tl.arange(0, TR)).to(tl.int64)
        t_ok = offs_t < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    rstd = Rstd      # (a placeholder without NORM: never read)
    rstd_t = Rstd
    if NORM:   # the rows' RMSNorm scales, from _row_rstd_kernel
        rstd = tl.load(Rstd + offs_m, mask=m_ok, other=0.0)
        if TAIL > 0:
            rstd_t = tl.load(Rstd + offs_t, mask=t_ok, other=0.0)

    # -- the weight stream over this split's K range [k_lo, k_hi), k in one fixed order -------------
    #    acc[m, n] += x[m, k-tile] @ w[n, k-tile]^T
    k_lo = pid_s * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    x_ptr = X + offs_m[:, None] * stride_xm + offs_k[None, :]
    if TAIL > 0:
        xt_ptr = X + offs_t[:, None] * stride_xm + offs_k[None, :]
    w_g = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]          # gate (or plain) rows
    w_u = W + (offs_n + N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]    # up rows (SILU)
    if SWAP:   # accumulate the transposed tiles: acc[n, m]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if TAIL > 0:
            acc_t = tl.zeros([BLOCK_N, TR], dtype=tl.float32)
            acc_ut = tl.zeros([BLOCK_N, TR], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if TAIL > 0:
            acc_t = tl.zeros([TR, BLOCK_N], dtype=tl.float32)
            acc_ut = tl.zeros([TR, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        # EVEN (N a multiple of BLOCK_N, every split a whole number of full K tiles): no K / N masks
        # on the weight stream -- the same values as the masked loads, so the same arithmetic.
        k_ok = k0 + offs_k < k_hi
        # the main tile: _x_tile's code written out (the CPU interpreter charges every helper call, and this
        # one runs at every K step of every call); the tail tile calls _x_tile itself
        if TMA:
            xk = DX.load([row0, k0])
        elif EVEN:
            xk = tl.load(x_ptr + k0, mask=m_ok[:, None], other=0.0)
        else:
            xk = tl.load(x_ptr + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            g = tl.load(G + k0 + offs_k, mask=k_ok, other=0.0)
            xn = _round_to(xk.to(tl.float32) * rstd[:, None], CODE)
            xk = (g.to(tl.float32) * xn).to(xk.dtype)
        if TAIL > 0:
            xt = _x_tile(xt_ptr, t_ok, DXT, G, rstd_t, row0 + BLOCK_M, k0, k_hi, offs_k, NORM, CODE, TMA, EVEN)
        if TMA:
            wk = DW.load([pid_n * BLOCK_N, k0])
        elif EVEN:
            wk = tl.load(w_g + k0)
        else:
            wk = tl.load(w_g + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma_tile(xk, wk, acc, IEEE, UPCAST, SWAP)
        if TAIL > 0:
            acc_t = _mma_tile(xt, wk, acc_t, IEEE, UPCAST, SWAP)
        if SILU:
            if TMA:   # (SILU with TMA only when N is a multiple of BLOCK_N: no gate tile runs into the up rows)
                uk = DW.load([pid_n * BLOCK_N + N, k0])
            elif EVEN:
                uk = tl.load(w_u + k0)
            else:
                uk = tl.load(w_u + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc_u = _mma_tile(xk, uk, acc_u, IEEE, UPCAST, SWAP)
            if TAIL > 0:
                acc_ut = _mma_tile(xt, uk, acc_ut, IEEE, UPCAST, SWAP)
    if SWAP:
        acc = tl.trans(acc)
        acc_u = tl.trans(acc_u)
        if TAIL > 0:
            acc_t = tl.trans(acc_t)
            acc_ut = tl.trans(acc_ut)

    if SPLIT == 1:
        _epilogue(acc, acc_u, Bias, Res, Y, offs_m, m_ok, offs_n, n_ok, N, stride_ym, stride_rm,
                  HAS_BIAS, SILU, RESID, CODE)
        if TAIL > 0:
            _epilogue(acc_t, acc_ut, Bias, Res, Y, offs_t, t_ok, offs_n, n_ok, N, stride_ym, stride_rm,
                      HAS_BIAS, SILU, RESID, CODE)
    else:
        # -- fixed-order split-K: every split stores its fp32 partials; the LAST program to arrive at
        #    this output tile (an atomic count) sums the partials in split order 0, 1, ..., SPLIT - 1
        #    -- the same order whichever program that is -- then runs the epilogue and resets the count.
        #    WS is [SPLIT, rows_pad, n_pad] (twice n_pad with SILU: gate partials, then up partials);
        #    only the real rows travel through it (rows past M are masked out, not written as zeros).
        n_ws = 2 * n_pad if SILU else n_pad
        _store_partials(WS, acc, acc_u, pid_s, rows_pad, offs_m, m_ok, offs_n, n_ws, n_pad, SILU)
        if TAIL > 0:
            _store_partials(WS, acc_t, acc_ut, pid_s, rows_pad, offs_t, t_ok, offs_n, n_ws, n_pad, SILU)
        count_ptr = Count + pid_n * tl.num_programs(0) + pid_m
        arrived = tl.atomic_add(count_ptr, 1)          # acq_rel: this split's stores are visible first
        if arrived == SPLIT - 1:
            y, u = _sum_partials(WS, rows_pad, offs_m, m_ok, offs_n, n_ws, n_pad, SPLIT, SILU, BLOCK_M, BLOCK_N)
            if TAIL > 0:
                yt, ut = _sum_partials(WS, rows_pad, offs_t, t_ok, offs_n, n_ws, n_pad, SPLIT, SILU, TR, BLOCK_N)
            tl.store(count_ptr, 0)                        # ready for the next call (and graph replays)
            _epilogue(y, u, Bias, Res, Y, offs_m, m_ok, offs_n, n_ok, N, stride_ym, stride_rm,
                      HAS_BIAS, SILU, RESID, CODE)
            if TAIL > 0:
                _epilogue(yt, ut, Bias, Res, Y, offs_t, t_ok, offs_n, n_ok, N, stride_ym, stride_rm,
                          HAS_BIAS, SILU, RESID, CODE)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, needed: int) -> torch.Tensor:
    """The split-K arrival counts of ``device`` (zeros; every call leaves them at zero again). One
    buffer per device, grown when a larger grid needs it; reused across calls and graph replays."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < needed:
        buf = _COUNTERS[device] = torch.zeros(max(needed, 1 << 16), dtype=torch.int32, device=device)
    return buf


def row_linear_config(n: int, k: int, dtype: torch.dtype, rows: int = 1, silu: bool = False) -> tuple[int, ...]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT, SWAP, TMA, TAIL)`` for a weight of N output rows
    and K columns. What a row's arithmetic depends on -- the K split, the operand order (SWAP), the tile's
    K extent and the instruction type -- is a function of the weight's shape and dtype only, NEVER of the
    number of rows; ``SPLIT`` K splits are reduced in a fixed order, so they too are part of that fixed
    arithmetic. Only BLOCK_M and TAIL (how many rows share one MMA, which never mixes rows) follow ``rows`` so
    that a verification reads each weight tile few times (bitwise-checked at M = 1..128 on the GPU:
    ``tests/fast/test_decode_phase.py``, ``tests/fast/test_rowgemm.py``). ``TMA = 1`` loads the operand tiles
    through tensor descriptors where the device and the operands allow it (:func:`_tma_ok`); it changes how
    the tiles arrive, never their values.

    16-bit weights run SWAPPED: the weight tile is the MMA's row operand and the x rows its columns, so up
    to 128 rows share one weight tile. Short weights (N < 8192: wqkv, wo, w2) take 128 x 64 tiles with
    K splits giving ~128 programs at one row (session 28's TMA sweep, BENCHMARKS "a TMA row GEMM": as fast
    as the GEMV at one row and ~2x the pointer-load tiles at 69 rows); tall weights (w13, lm_head) 64 x 64
    tiles (N < 32768) or 128 x 64 tiles (vocabulary heads), without a K split (session 28: through TMA the
    unsplit w13 is faster than 4 splits at both 1 and 69 rows). With ``silu`` (two weight tiles and two
    accumulators per program) short weights take 64-wide tiles too. 65-80 rows (a 69-node tree's verification)
    run as a 64-row tile plus a 16-row TAIL tile that share each weight tile (session 29: 80 MMA columns instead
    of 128; every row's bits the same as in one tile, CPU- and GPU-tested). fp32 (the IEEE products) keeps session
    8's unswapped pointer-load tiles: 64 x 64 with K splits for ~512 programs, or 32 x 64 unsplit from
    N = 8192."""
    if interpreter_active():   # programs run one by one: few, big tiles (still fixed per shape)
        return 16, min(64, max(16, next_pow2(n))), 32, 4, 1, 2, 0, 1, 0   # two K splits: CI checks the split path
    return _gpu_config(n, k, dtype, rows, silu)


def _gpu_config(n: int, k: int, dtype: torch.dtype, rows: int, silu: bool) -> tuple[int, ...]:
    """The GPU rule of :func:`row_linear_config` (a pure function of its arguments, so the CPU tests check
    that it depends on ``rows`` only through BLOCK_M and TAIL)."""
    if dtype != torch.float32:
        # 65-80 rows (the 69-node verification): a 64-row tile plus a 16-row tail sharing each weight tile --
        # 80 MMA columns instead of 128 (BENCHMARKS "Session 29: a 16-row tail tile": 7-19 % faster per weight)
        bm, tail = 128, 0
        for most, tier_bm, tier_tail in ROW_TILES:
            if rows <= most:
                bm, tail = tier_bm, tier_tail
                break
        bk = min(64, max(16, next_pow2(k)))
        if n >= 32768:
            bn, split = 128, 1
        elif n >= 8192:
            bn, split = 64, 1
        else:   # (SwiGLU: 64-wide tiles, as w13's -- two weight tiles and two accumulators per program)
            bn = min(64 if silu else 128, max(16, next_pow2(n)))
            split = max(1, min(8, round(128 / triton.cdiv(n, bn)), triton.cdiv(k, 2 * bk)))
        return bm, bn, bk, 4, 4, split, 1, 1, tail
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64
    if n >= 8192:
        bn, bk, split = 32, 64, 1
    else:
        bn, bk = 64, 64
        split = max(1, min(8, 512 // triton.cdiv(n, bn), triton.cdiv(k, 2 * bk)))
    return bm, min(bn, max(16, next_pow2(n))), min(bk, max(16, next_pow2(k))), 4, 4, split, 0, 0, 0


def _tma_ok(x2: torch.Tensor, w: torch.Tensor, n: int, bn: int, silu: bool) -> bool:
    """Whether the operand tiles may come through TMA tensor descriptors: a Hopper-or-newer GPU (or the
    interpreter, which emulates them), the descriptor class importable, 16-byte aligned bases and row
    strides, and with ``silu`` N a multiple of BLOCK_N (a gate tile must not run into the up rows). When
    False the kernel loads the same values through pointers: the same arithmetic, bit for bit."""
    if TensorDescriptor is None:
        return False
    if x2.is_cuda:
        if torch.cuda.get_device_capability(x2.device)[0] < 9:
            return False
    elif not interpreter_active():
        return False
    size = x2.element_size()
    aligned = all(t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0 for t in (x2, w))
    return aligned and (not silu or n % bn == 0)


def row_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
               residual: torch.Tensor | None = None, silu: bool = False,
               config: tuple[int, ...] | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` with every row computed the same whatever the number of rows.

    Args:
        x: [..., K] fp16/bf16/fp32 with at most :data:`MAX_ROWS` rows (the product of the leading dims).
        w: [N, K] in x's dtype and device (with ``silu``: [2F, K], gate rows then up rows); bias [N] or None.
        norm_weight, eps: the RMSNorm before the projection, folded in (see the module docstring).
        residual: [..., N] in x's dtype, added after the projection (not with ``silu``).
        silu: return ``silu(gate) * up`` [..., F] of the two halves of the product.
        config: a tile configuration to use instead of :func:`row_linear_config` (probes and sweeps):
            ``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT[, SWAP[, TMA[, TAIL]]]])``; SWAP = 1
            runs the weight tile as the MMA's row operand (``w @ x^T``), TMA = 1 loads the tiles through
            tensor descriptors where :func:`_tma_ok` allows (the same values either way), TAIL = 16/32/64
            gives every program a second x tile of that many rows sharing its weight tiles (BLOCK_M + TAIL
            rows per program; the GPU rule uses 64 + 16 for 65-80 rows of 16-bit weights).
    Returns [..., N] (or [..., F]) in x's dtype. CUDA-graph capturable (host-only checks).
    """
    x2, w, bias, norm_weight, r2, out, y2, n, k, rows = linear_operands(
        x, w, bias, silu, norm_weight, eps, residual, max_rows=MAX_ROWS, who="row_linear (a decode-phase pass, MAX_ROWS)")
    if rows == 0:
        return out
    cfg = tuple(config) if config is not None else row_linear_config(n, k, x.dtype, rows, silu)
    bm, bn, bk, warps, stages = cfg[:5]
    split = cfg[5] if len(cfg) > 5 else 1
    swap = bool(cfg[6]) if len(cfg) > 6 else False
    tma = bool(cfg[7]) if len(cfg) > 7 else False
    tail = int(cfg[8]) if len(cfg) > 8 else 0
    if tail not in (0, 16, 32, 64) or (tail and tail >= bm):
        raise ValueError(f"config's TAIL must be 0, 16, 32 or 64 and below BLOCK_M = {bm}, got {tail}")
    # K splits of a whole number of K tiles each; fewer splits if K is short (still fixed per shape)
    k_split = triton.cdiv(triton.cdiv(k, bk), split) * bk
    split = triton.cdiv(k, k_split)
    m_tiles, n_tiles = triton.cdiv(rows, bm + tail), triton.cdiv(n, bn)
    rows_pad, n_pad = m_tiles * (bm + tail), n_tiles * bn
    if split > 1:
        ws = torch.empty((split, rows_pad, 2 * n_pad if silu else n_pad), dtype=torch.float32, device=x.device)
        count = _counters(x.device, m_tiles * n_tiles)
    else:
        ws = count = y2
    rstd = y2
    if norm_weight is not None:   # the rows' RMSNorm scales, once per call (one program per row)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        _row_rstd_kernel[(rows,)](x2, rstd, k, x2.stride(0), float(eps), BLOCK_K=min(4096, next_pow2(k)), num_warps=4)
    tma = tma and _tma_ok(x2, w, n, bn, silu)
    dx = TensorDescriptor.from_tensor(x2, [bm, bk]) if tma else x2
    dxt = TensorDescriptor.from_tensor(x2, [tail, bk]) if tma and tail else dx
    dw = TensorDescriptor.from_tensor(w, [bn, bk]) if tma else w
    _row_linear_kernel[(m_tiles, n_tiles, split)](
        x2, w, dx, dxt, dw, bias if bias is not None else w, y2,
        norm_weight if norm_weight is not None else w, rstd, r2 if r2 is not None else y2, ws, count,
        rows, n, k, x2.stride(0), w.stride(0), y2.stride(0), r2.stride(0) if r2 is not None else 0, float(eps),
        rows_pad, n_pad, k_split,
        HAS_BIAS=bias is not None, SILU=silu, NORM=norm_weight is not None, RESID=residual is not None,
        CODE=_DTYPE_CODE[x.dtype], IEEE=x.dtype == torch.float32,
        UPCAST=interpreter_active() and x.dtype != torch.float32, SPLIT=split,
        EVEN=(n % bn == 0 and k % k_split == 0), SWAP=swap, TMA=tma,
        BLOCK_M=bm, TAIL=tail, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=warps,
    )
    return out
