"""Matrix-vector products for one-token decode steps (M = 1), with the neighbouring elementwise ops folded in.

A decode step multiplies ONE hidden row by every weight matrix, so each GEMM is a pure weight stream
(memory bound). cuBLAS serves these shapes with split-K kernels plus a separate reduction kernel;
this plain Triton GEMV streams the weight once with a few rows per program, needs no reduction
kernel, and on the 8B shapes moves 0-16% more bytes per second than cuBLAS when the calls run back
to back as in a decode step (H100, BENCHMARKS "Session 6"). The SwiGLU
variant also folds :func:`specdec.fast.kernels.silu_mul` into the ``w13`` product's epilogue.

* :func:`gemv` ``(x [..., K], w [N, K], bias [N] | None) -> [..., N]`` -- ``F.linear(x, w, bias)``:
  fp32 accumulation, bias added in fp32, one rounding to x's dtype. Grid ``(cdiv(N, BLOCK_N), R)``
  for the R rows of x; a program owns ``BLOCK_N`` output features and streams their weight rows in
  ``[BLOCK_N, BLOCK_K]`` tiles (full tiles unmasked along K, one masked tail tile).
* :func:`gemv_silu` ``(x [..., K], w13 [2F, K], bias [2F] | None) -> [..., F]`` --
  :func:`specdec.fast.kernels.silu_mul_ref` ``(F.linear(x, w13, bias))``: a program owns the gate
  rows ``n`` and the up rows ``F + n`` of the same features, rounds both products to x's dtype (the
  GEMM output), then ``silu`` in fp32 rounded to the dtype, times up, rounded once (as the eager ops).

* Both take ``norm_weight`` (+ ``eps``): the RMSNorm that precedes every projection of a decoder
  layer, folded in. Every program reads the whole input row anyway, so it gathers the row's sum of
  squares on the way, multiplies by ``x * norm_weight`` and scales its dot products by
  ``rsqrt(mean(x^2) + eps)`` in the epilogue -- no norm kernel, no extra pass over the row (the
  normed row is not rounded to the dtype, unlike the eager ops: agreement within output rounding).
* :func:`gemv` takes ``residual`` [..., N]: ``residual + F.linear(...)`` with the product rounded
  to the dtype first, then added in fp32 and rounded once (bitwise the eager add).
* :func:`gemv_qkv_rope` ``(x [B, M, K], wqkv, bqkv, cos, sin, k_cache, v_cache, rows) -> q`` -- the
  fused q|k|v projection (with the folded norm) and :func:`specdec.fast.kernels.rope_qkv_write` in
  one launch: a program owns column pairs ``(j, j + D/2)`` of the heads, the halves RoPE mixes, so
  the rotation runs in the epilogue and q, k, v go straight to the attention input and the cache.
  :func:`gemv_q_rope` ``(x, wq, bq, cos, sin) -> q`` is the same kernel with query heads only (the GLIDE
  draft's cross-attention query): :func:`specdec.fast.kernels.rope_q` in the GEMV's epilogue.

A decode step's layer is then four launches around attention: norm+wqkv+RoPE+KV write, wo+add,
norm+w13+SwiGLU, w2+add. All three share one weight stream (``_stream_rows``).

Must match: :func:`gemv_ref` (``F.linear`` with the optional ``rms_norm_ref`` before and residual
add after), :func:`gemv_silu_ref`, :func:`gemv_qkv_rope_ref` and :func:`gemv_q_rope_ref`, up to the summation order of the
fp32 accumulation. Meant for one row (each row re-reads the weight): the model uses these for
single-row steps, and for several rows only when the weights are small enough to re-read from L2
(``specdec.fast.model._gemv_rows_ok``); verification, prefill and beams of large models keep cuBLAS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_device, check_tensor, interpreter_active, next_pow2
from .fused import (_DTYPE_CODE, _check_cache_rows, _check_float, _check_rope_q, _check_rope_qkv, _round_to, rms_norm_ref,
                    rope_q_ref, rope_qkv_write_ref)

__all__ = ["embed_gemv_qkv_rope", "gemv", "gemv_q_rope", "gemv_q_rope_ref", "gemv_qkv_rope", "gemv_qkv_rope_ref", "gemv_ref", "gemv_silu",
           "gemv_silu_ref"]


@triton.jit
def _stream_rows(x_row, G, w_a, w_b, r_ok, K, eps,
                 TWO: tl.constexpr, NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STAGES: tl.constexpr):
    """The weight stream of every GEMV here: ``y_a[n] = sum_k w_a[n, k] * xn[k]`` in fp32 (and ``y_b``
    for a second set of rows when TWO), ``xn`` = the row ``x_row[0:K]``, or with NORM its RMSNorm
    with weight ``G`` folded in: the products run on ``x * g`` and are scaled by
    ``rsqrt(mean(x^2) + eps)`` at the end (the sum of squares is gathered on the way: every program
    reads the whole row anyway). ``w_a``/``w_b`` are [BLOCK_N, BLOCK_K] pointer tiles at k = 0;
    ``r_ok`` [BLOCK_N] masks the rows. Full K tiles are unmasked along K with the next STAGES tiles
    in flight; one masked tail tile."""
    offs_k = tl.arange(0, BLOCK_K)
    acc_a = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_K], dtype=tl.float32)
    k_full = K // BLOCK_K * BLOCK_K
    for k0 in tl.range(0, k_full, BLOCK_K, num_stages=STAGES):
        xk = tl.load(x_row + k0 + offs_k).to(tl.float32)
        if NORM:
            ssq += xk * xk
            xk = xk * tl.load(G + k0 + offs_k).to(tl.float32)
        acc_a += tl.load(w_a + k0, mask=r_ok[:, None], other=0.0).to(tl.float32) * xk[None, :]
        if TWO:
            acc_b += tl.load(w_b + k0, mask=r_ok[:, None], other=0.0).to(tl.float32) * xk[None, :]
    if k_full < K:
        k_ok = k_full + offs_k < K
        xk = tl.load(x_row + k_full + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            ssq += xk * xk
            xk = xk * tl.load(G + k_full + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        wmask = r_ok[:, None] & k_ok[None, :]
        acc_a += tl.load(w_a + k_full, mask=wmask, other=0.0).to(tl.float32) * xk[None, :]
        if TWO:
            acc_b += tl.load(w_b + k_full, mask=wmask, other=0.0).to(tl.float32) * xk[None, :]
    y_a = tl.sum(acc_a, 1)
    y_b = tl.sum(acc_b, 1)
    if NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(ssq, 0) / K + eps)
        y_a = y_a * rstd
        y_b = y_b * rstd
    return y_a, y_b


@triton.jit(do_not_specialize=["N", "K", "stride_xr", "stride_yr", "stride_rr"])
def _gemv_kernel(
    X, W, Bias, Y, G, Res,
    N, K, stride_xr, stride_wn, stride_yr, stride_rr, eps,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr, RESID: tl.constexpr, CODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_row = X + pid_r.to(tl.int64) * stride_xr
    # gate (or plain) weight rows n; with SILU also the up rows N + n
    w_g = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    w_u = W + (offs_n + N).to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # -- the weight stream (with NORM: the RMSNorm folded in) ---------------------------------------
    y, u = _stream_rows(x_row, G, w_g, w_u, n_ok, K, eps, SILU, NORM, BLOCK_N, BLOCK_K, STAGES)

    # -- epilogue: bias in fp32, one rounding to the output dtype (as F.linear) ---------------------
    if HAS_BIAS:
        y += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SILU:
        if HAS_BIAS:
            u += tl.load(Bias + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        g = _round_to(y, CODE)                           # the w13 GEMM's output rounding
        u = _round_to(u, CODE)
        act = _round_to(g / (1.0 + tl.exp(-g)), CODE)    # F.silu in fp32, rounded to the dtype
        y = act * u                                   # `* up`, rounded once by the store
    if RESID:
        # the eager residual add: the GEMM output rounded to the dtype, plus the residual in fp32,
        # rounded once by the store (exactly `residual + F.linear(...)`)
        y = _round_to(y, CODE) + tl.load(Res + pid_r.to(tl.int64) * stride_rr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + pid_r.to(tl.int64) * stride_yr + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)


@triton.jit(do_not_specialize=["N2", "K", "stride_xr", "M", "stride_rb"])
def _gemv_qkv_rope_kernel(
    X, W, Bias, G, Cos, Sin, Q, KC, VC, Rows, Ids, XOut,
    N2, K, stride_xr, stride_wn, eps, M,
    stride_cb, stride_cm, stride_cd, stride_sb, stride_sm, stride_sd,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rm,
    HQ, HKV,
    HALF: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, CODE: tl.constexpr, CDT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, KV: tl.constexpr, GATHER: tl.constexpr,
):
    # A program owns BLOCK_N column PAIRS (j, j + HALF) of the fused q|k|v projection -- the two
    # halves RoPE's rotate_half mixes -- for one token row r = b * M + m. KV False: query heads only
    # (gemv_q_rope: no K/V heads, no cache rows read, nothing written to the cache).
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_p = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)   # pair index in [0, N / 2)
    p_ok = offs_p < N2
    head = offs_p // HALF                              # q heads, then k heads, then v heads
    j = offs_p % HALF
    row_a = head * (2 * HALF) + j
    row_b = row_a + HALF
    offs_k = tl.arange(0, BLOCK_K)
    if GATHER:   # X is an embedding table [V, K]: the row is token Ids[r]'s, and program 0 copies it to XOut[r]
        x_row = X + tl.load(Ids + pid_r).to(tl.int64) * stride_xr
        if pid_n == 0:
            for k0 in range(0, K, BLOCK_K):
                k_ok = k0 + offs_k < K
                tl.store(XOut + pid_r.to(tl.int64) * K + k0 + offs_k, tl.load(x_row + k0 + offs_k, mask=k_ok), mask=k_ok)
    else:
        x_row = X + pid_r.to(tl.int64) * stride_xr
    w_a = W + row_a.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    w_b = W + row_b.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    # -- the weight stream of both halves (with NORM: the RMSNorm folded in); bias; output rounding --
    ya, yb = _stream_rows(x_row, G, w_a, w_b, p_ok, K, eps, True, NORM, BLOCK_N, BLOCK_K, STAGES)
    if HAS_BIAS:
        ya += tl.load(Bias + row_a, mask=p_ok, other=0.0).to(tl.float32)
        yb += tl.load(Bias + row_b, mask=p_ok, other=0.0).to(tl.float32)
    ya = _round_to(ya, CODE)                           # the projection's output in x's dtype
    yb = _round_to(yb, CODE)

    # -- RoPE of q and k heads, as rope_qkv_write: x * cos + rotate_half(x) * sin, each op rounded ----
    b = (pid_r // M).to(tl.int64)
    m = (pid_r % M).to(tl.int64)
    c1 = tl.load(Cos + b * stride_cb + m * stride_cm + j * stride_cd, mask=p_ok, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + b * stride_cb + m * stride_cm + (j + HALF) * stride_cd, mask=p_ok, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + b * stride_sb + m * stride_sm + j * stride_sd, mask=p_ok, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + b * stride_sb + m * stride_sm + (j + HALF) * stride_sd, mask=p_ok, other=0.0).to(tl.float32)
    o1 = _round_to(_round_to(ya * c1, CDT) - _round_to(yb * s1, CDT), CDT)
    o2 = _round_to(_round_to(yb * c2, CDT) + _round_to(ya * s2, CDT), CDT)

    # -- q heads -> Q [B, Hq, M, D]; k (rotated), v (raw) -> cache row rows[b, m] ------------------
    is_q = p_ok & (head < HQ)
    hq = tl.where(is_q, head, 0).to(tl.int64)
    q_ptr = Q + b * stride_qb + hq * stride_qh + m * stride_qm + j * stride_qd
    tl.store(q_ptr, o1.to(Q.dtype.element_ty), mask=is_q)
    tl.store(q_ptr + HALF * stride_qd, o2.to(Q.dtype.element_ty), mask=is_q)
    if not KV:
        return
    row = tl.load(Rows + b * stride_rb + m * stride_rm).to(tl.int64)
    is_k = p_ok & (head >= HQ) & (head < HQ + HKV)
    hk = tl.where(is_k, head - HQ, 0).to(tl.int64)
    k_ptr = KC + b * stride_kb + hk * stride_kh + row * stride_kn + j * stride_kd
    tl.store(k_ptr, o1.to(KC.dtype.element_ty), mask=is_k)
    tl.store(k_ptr + HALF * stride_kd, o2.to(KC.dtype.element_ty), mask=is_k)
    is_v = p_ok & (head >= HQ + HKV)
    hv = tl.where(is_v, head - HQ - HKV, 0).to(tl.int64)
    v_ptr = VC + b * stride_vb + hv * stride_vh + row * stride_vn + j * stride_vd
    tl.store(v_ptr, ya.to(VC.dtype.element_ty), mask=is_v)
    tl.store(v_ptr + HALF * stride_vd, yb.to(VC.dtype.element_ty), mask=is_v)


def _config(rows_read: int, n: int, k: int, norm: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) from sweeps on H100 that time calls back to back
    over distinct weight copies, as inside a decode step (BENCHMARKS "Session 6", "Session 7"): long
    rows (K >= 8192, the down projection) 4 x 512 tiles; tall weights (more than 8192 rows read: w13,
    lm_head, MHA qkv) 2 x 2048 -- but 8 x 512 with the folded RMSNorm, whose ``x * norm_weight``
    tile is re-read per program (2 x 2048 then loses 6-35%, 8 x 512 stays within 1-2% of the plain
    GEMV); the rest 8 x 256. Rows shorter than the tile take more rows per program."""
    if interpreter_active():   # programs run one by one: few, big tiles
        return min(64, next_pow2(n)), min(1024, next_pow2(k)), 4, 1
    if k >= 8192:
        bn, bk, warps, stages = 4, 512, 4, 4
    elif rows_read > 8192:
        bn, bk, warps, stages = (8, 512, 4, 3) if norm else (2, 2048, 4, 3)
    else:
        bn, bk, warps, stages = 8, 256, 4, 4
    area = bn * bk
    bk = min(bk, max(16, next_pow2(k)))
    bn = max(bn, area // bk)   # short rows (small K): more rows per program, same tile area
    return min(bn, next_pow2(n)), bk, warps, stages


def _checked_bias(name: str, bias, rows: int) -> torch.Tensor | None:
    """``bias`` validated as a [rows] tensor (or None), contiguous."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (rows,):
        raise ValueError(f"{name} must be a tensor of shape [{rows}], got {tuple(bias.shape)}")
    return bias.contiguous()


def _checked_norm(norm_weight, eps, k: int) -> torch.Tensor | None:
    """``norm_weight`` validated as a float [K] tensor (or None) and ``eps`` as a finite number >= 0."""
    if norm_weight is None:
        return None
    _check_float("norm_weight", norm_weight)
    if tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must be a tensor of shape [K] = [{k}], got {tuple(norm_weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return norm_weight.contiguous()


class LinearOperands(NamedTuple):
    """The checked operands of a GEMV / row-invariant GEMM call, as 2-D row views with unit K strides."""

    x2: torch.Tensor                  # [R, K] the input rows
    w: torch.Tensor                   # [N_w, K] the weight (N_w = 2F with SwiGLU)
    bias: torch.Tensor | None         # [N_w]
    norm_weight: torch.Tensor | None  # [K]
    r2: torch.Tensor | None           # [R, N] the residual rows
    out: torch.Tensor                 # [..., N] the result (new, contiguous)
    y2: torch.Tensor                  # [R, N] a view of ``out``
    n: int
    k: int
    rows: int


def linear_operands(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                    norm_weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None,
                    max_rows: int | None = None, who: str = "this call") -> LinearOperands:
    """Validate ``F.linear``-style operands (x [..., K], w [N, K] or [2F, K] with ``silu``, bias,
    the folded RMSNorm's weight, the residual) and return them as row views. One set of checks and
    messages for :func:`gemv`, :func:`gemv_silu` and :func:`specdec.fast.kernels.rowgemm.row_linear`."""
    _check_float("x", x)
    _check_float("w", w)
    if w.dim() != 2:
        raise ValueError(f"need x [..., K] and w [N, K]; got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"x and w must share one dtype, got {x.dtype} and {w.dtype}")
    n_rows_w, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim {x.shape[-1]} must equal w's K = {k} (w is [N, K] = {tuple(w.shape)})")
    if silu and n_rows_w % 2:
        raise ValueError(f"w13 must stack gate and up rows ([2F, K]); got an odd row count {n_rows_w}")
    if silu and residual is not None:
        raise ValueError("residual is not supported with the SwiGLU epilogue")
    n = n_rows_w // 2 if silu else n_rows_w
    bias = _checked_bias("bias", bias, n_rows_w)
    norm_weight = _checked_norm(norm_weight, eps, k)
    lead = tuple(x.shape[:-1])
    rows = 1
    for size in lead:
        rows *= size
    if max_rows is not None and rows > max_rows:
        raise ValueError(f"x has {rows} rows; {who} takes at most {max_rows}")
    named = [("x", x), ("w", w)] + [(nm, t) for nm, t in (("bias", bias), ("norm_weight", norm_weight)) if t is not None]
    if residual is not None:
        _check_float("residual", residual)
        if tuple(residual.shape) != lead + (n,):
            raise ValueError(f"residual must have the output's shape {lead + (n,)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        named.append(("residual", residual))
    check_device(*named)
    out = torch.empty(lead + (n,), dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return LinearOperands(x, w, bias, norm_weight, None, out, out, n, k, 0)
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(1) != 1:
        w = w.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(rows, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    return LinearOperands(x2, w, bias, norm_weight, r2, out, out.view(rows, n), n, k, rows)


def _launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu: bool,
            norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    x2, w, bias, norm_weight, r2, out, y2, n, k, r = linear_operands(x, w, bias, silu, norm_weight, eps, residual)
    if r == 0:
        return out
    n_rows_w = w.shape[0]
    bn, bk, warps, stages = _config(n_rows_w, n, k, norm=norm_weight is not None)
    _gemv_kernel[(triton.cdiv(n, bn), r)](
        x2, w, bias if bias is not None else w, y2,
        norm_weight if norm_weight is not None else w, r2 if r2 is not None else y2,
        n, k, x2.stride(0), w.stride(0), y2.stride(0), r2.stride(0) if r2 is not None else 0, float(eps),
        HAS_BIAS=bias is not None, SILU=silu, NORM=norm_weight is not None, RESID=residual is not None,
        CODE=_DTYPE_CODE[x.dtype], BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=warps,
    )
    return out


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` as a weight-streaming GEMV (fp32 accumulation), optionally with the
    RMSNorm before it and the residual add after it folded in (see :func:`gemv_ref`).

    Args:
        x: [..., K] fp16/bf16/fp32; meant for a single row (each row re-reads ``w``).
        w: [N, K], x's dtype and device. bias: [N] or None.
        norm_weight: [K] or None. If given, the product runs on ``rms_norm(x, norm_weight, eps)``
            (computed as ``rsqrt(mean(x^2) + eps) * (w @ (x * norm_weight))`` in fp32, so the normed
            row is never rounded -- within an output rounding of the two kernels, not bitwise).
        eps: RMSNorm epsilon (>= 0), used with ``norm_weight``.
        residual: [..., N] in x's dtype or None. If given, returns ``residual + F.linear(...)`` with
            the product rounded to the dtype first (exactly the eager add).
    Returns [..., N] in x's dtype (new contiguous tensor). CUDA-graph capturable.
    """
    return _launch(x, w, bias, False, norm_weight, eps, residual)


def gemv_silu(x: torch.Tensor, w13: torch.Tensor, bias: torch.Tensor | None = None, *,
              norm_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate, up = F.linear(x, w13, bias).chunk(2, -1)`` in one launch.

    Args:
        x: [..., K]; w13: [2F, K] (gate rows, then up rows); bias: [2F] or None.
        norm_weight, eps: as :func:`gemv` (the RMSNorm before the projection, folded in).
    Returns [..., F] in x's dtype. Matches :func:`gemv_silu_ref` up to the fp32 summation order.
    """
    return _launch(x, w13, bias, True, norm_weight, eps)


def gemv_qkv_rope(x: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, *,
                  norm_weight: torch.Tensor | None = None, eps: float = 1e-6, check_rows: bool = True) -> torch.Tensor:
    """A layer's fused q|k|v projection, RoPE and KV-cache write in one launch (decode steps):
    :func:`specdec.fast.kernels.rope_qkv_write` ``(gemv(x, wqkv, bqkv, norm_weight=..., eps=...), cos,
    sin, k_cache, v_cache, rows)``.

    A program owns column pairs ``(j, j + D/2)`` of the projection (the halves RoPE mixes), so the
    rotation happens in the GEMV's epilogue and q goes straight out, k and v straight into the cache:
    no qkv tensor, no ``rope_qkv_write`` launch.

    Args:
        x: [B, M, K] (meant for B * M = 1: each row re-reads the weight); wqkv: [(Hq + 2 Hkv) * D, K]
            in x's dtype, heads laid out ``[q | k | v]``; bqkv: [(Hq + 2 Hkv) * D] or None.
        cos, sin, k_cache, v_cache, rows: as :func:`~specdec.fast.kernels.rope_qkv_write`.
        norm_weight, eps: the RMSNorm before the projection, folded in (see :func:`gemv`).
        check_rows: verify the rows range (a host sync; always skipped under graph capture).
    Returns q [B, Hq, M, D] (contiguous, x's dtype). Matches :func:`gemv_qkv_rope_ref` up to the
    GEMV's fp32 summation order (and one fp32 rounding of the rotation, which may use FMA here).
    """
    check_tensor("x", x, 3)
    hq, d, kv, bqkv, norm_weight = _checked_qkv_rope(x, wqkv, bqkv, cos, sin, k_cache, v_cache, rows, norm_weight, eps,
                                                     check_rows)
    return _launch_rope_gemv(x, wqkv, bqkv, cos, sin, hq, d, norm_weight, eps, kv)


def _check_rope_weight(name: str, w: torch.Tensor, x: torch.Tensor, rows_what: str) -> int:
    """A rope GEMV's weight ``w``: a float [rows, K] tensor with x's K and dtype (``rows_what`` names the rows in
    the message). Returns its row count."""
    _check_float(name, w)
    k = x.shape[-1]
    if w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"{name} must be [{rows_what}, K] with K = {k}, got {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"x and {name} must share one dtype, got {x.dtype} and {w.dtype}")
    return w.shape[0]


def _checked_qkv_rope(x, wqkv, bqkv, cos, sin, k_cache, v_cache, rows, norm_weight, eps, check_rows):
    """The checks of :func:`gemv_qkv_rope` on x [B, M, K] (a tensor, or an embedding lookup's [B, M, K] view) ->
    ``(Hq, D, (k_cache, v_cache, rows, Hkv), bias, norm_weight)``."""
    width = _check_rope_weight("wqkv", wqkv, x, "(Hq + 2 Hkv) * D")
    b, m, hq, hkv, cap, d = _check_rope_qkv("x", x, width, "wqkv's rows", cos, sin, k_cache, v_cache, rows)
    bqkv = _checked_bias("bqkv", bqkv, width)
    norm_weight = _checked_norm(norm_weight, eps, x.shape[-1])
    named = [("x", x), ("wqkv", wqkv), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache), ("rows", rows)]
    named += [(nm, t) for nm, t in (("bqkv", bqkv), ("norm_weight", norm_weight)) if t is not None]
    check_device(*named)
    if check_rows:
        _check_cache_rows(rows, cap, x.device)
    return hq, d, (k_cache, v_cache, rows, hkv), bqkv, norm_weight


def embed_gemv_qkv_rope(tokens: torch.Tensor, embed: torch.Tensor, wqkv: torch.Tensor, bqkv: torch.Tensor | None,
                        cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        rows: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                        check_rows: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gemv_qkv_rope` on the embeddings of ``tokens`` [B, M] (int), gathered from ``embed`` [V, K] inside
    the same launch: ``(q, x)`` with ``x = F.embedding(tokens, embed)`` [B, M, K] (written by the launch too: the
    layer's residual stream) -- no embedding-lookup kernel. The ids are trusted (they come from the round's own
    buffers; ``F.embedding`` checks them on the device, this kernel does not). Matches
    ``(gemv_qkv_rope_ref(F.embedding(tokens, embed), ...), F.embedding(tokens, embed))``."""
    check_tensor("embed", embed, 2)
    if isinstance(wqkv, torch.Tensor) and embed.dtype != wqkv.dtype:
        raise TypeError(f"embed and wqkv must share one dtype, got {embed.dtype} and {wqkv.dtype}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError("tokens must be an int32/int64 tensor [B, M]")
    b, m = tokens.shape
    x = torch.empty((b, m, embed.shape[1]), dtype=embed.dtype, device=embed.device)
    hq, d, kv, bqkv, norm_weight = _checked_qkv_rope(x, wqkv, bqkv, cos, sin, k_cache, v_cache, rows, norm_weight, eps,
                                                     check_rows)
    check_device(("tokens", tokens), ("embed", embed))
    ids = tokens if tokens.is_contiguous() else tokens.contiguous()
    return _launch_rope_gemv(embed, wqkv, bqkv, cos, sin, hq, d, norm_weight, eps, kv, gather=(ids, x)), x


def _launch_rope_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
                      sin: torch.Tensor, hq: int, d: int, norm_weight: torch.Tensor | None, eps: float,
                      kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None,
                      gather: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One launch of ``_gemv_qkv_rope_kernel`` on checked operands -> q [B, Hq, M, D]; ``kv`` =
    ``(k_cache, v_cache, rows, Hkv)`` for :func:`gemv_qkv_rope`, None for :func:`gemv_q_rope` (no cache);
    ``gather`` = ``(ids [B, M], x_out [B, M, K])`` when ``x`` is an embedding table [V, K] whose rows ``ids``
    are the input (copied to ``x_out``: :func:`embed_gemv_qkv_rope`)."""
    if gather is None:
        b, m, k = x.shape
    else:
        (b, m), k = gather[0].shape, x.shape[-1]
    q = torch.empty((b, hq, m, d), dtype=x.dtype, device=x.device)
    if b == 0 or m == 0:
        return q
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    ids, x_out = gather if gather is not None else (q, q)   # GATHER=False never touches them
    if w.stride(1) != 1:
        w = w.contiguous()
    k_cache, v_cache, rows, hkv = kv if kv is not None else (q, q, q, 0)   # KV=False never touches them
    rows_stride = rows.stride() if kv is not None else (0, 0)
    width = w.shape[0]
    n2 = width // 2
    cdt = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    bn, bk, warps, stages = _config(width, n2, k, norm=norm_weight is not None)
    _gemv_qkv_rope_kernel[(triton.cdiv(n2, bn), b * m)](
        x2, w, bias if bias is not None else w, norm_weight if norm_weight is not None else w,
        cos, sin, q, k_cache, v_cache, rows, ids, x_out,
        n2, k, x2.stride(0), w.stride(0), float(eps), m,
        *cos.stride(), *sin.stride(), *q.stride(), *k_cache.stride(), *v_cache.stride(), *rows_stride,
        hq, hkv,
        HALF=d // 2, HAS_BIAS=bias is not None, NORM=norm_weight is not None, CODE=_DTYPE_CODE[x.dtype],
        CDT=_DTYPE_CODE[cdt], BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, KV=kv is not None, GATHER=gather is not None,
        num_warps=warps,
    )
    return q


def gemv_q_rope(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, *,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """A query-only projection with RoPE in one launch (the GLIDE draft's cross-attention query):
    :func:`specdec.fast.kernels.rope_q` ``(gemv(x, wq, bq, norm_weight=..., eps=...), cos, sin)``.

    The kernel of :func:`gemv_qkv_rope` with no K/V heads: a program owns column pairs ``(j, j + D/2)`` of
    the query heads and rotates them in its epilogue; nothing is written to a cache.

    Args:
        x: [B, M, K] (meant for B * M = 1: each row re-reads the weight); wq: [Hq * D, K] in x's dtype;
            bq: [Hq * D] or None.
        cos, sin: [B, M, D] RoPE tables of the M tokens (any strides), D a multiple of 16 up to 256.
        norm_weight, eps: the RMSNorm before the projection, folded in (see :func:`gemv`).
    Returns q [B, Hq, M, D] (contiguous, x's dtype). Matches :func:`gemv_q_rope_ref` up to the GEMV's fp32
    summation order.
    """
    check_tensor("x", x, 3)
    width = _check_rope_weight("wq", wq, x, "Hq * D")
    hq, d = _check_rope_q(x.shape[0], x.shape[1], width, "wq's rows", cos, sin)
    bq = _checked_bias("bq", bq, width)
    norm_weight = _checked_norm(norm_weight, eps, x.shape[-1])
    named = [("x", x), ("wq", wq), ("cos", cos), ("sin", sin)]
    named += [(nm, t) for nm, t in (("bq", bq), ("norm_weight", norm_weight)) if t is not None]
    check_device(*named)
    return _launch_rope_gemv(x, wq, bq, cos, sin, hq, d, norm_weight, eps, None)


def gemv_q_rope_ref(x, wq, bq, cos, sin, *, norm_weight=None, eps: float = 1e-6) -> torch.Tensor:
    """Eager :func:`gemv_q_rope`: :func:`gemv_ref` then :func:`specdec.fast.kernels.rope_q_ref`."""
    return rope_q_ref(gemv_ref(x, wq, bq, norm_weight=norm_weight, eps=eps), cos, sin)


def gemv_qkv_rope_ref(x, wqkv, bqkv, cos, sin, k_cache, v_cache, rows, *, norm_weight=None, eps: float = 1e-6) -> torch.Tensor:
    """Reference for :func:`gemv_qkv_rope`: :func:`gemv_ref` then :func:`~specdec.fast.kernels.rope_qkv_write_ref`."""
    return rope_qkv_write_ref(gemv_ref(x, wqkv, bqkv, norm_weight=norm_weight, eps=eps), cos, sin, k_cache, v_cache, rows)


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
             norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for :func:`gemv`: the eager ops (:func:`~specdec.fast.kernels.rms_norm_ref`, the
    GEMM, the residual add)."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    y = F.linear(x, w, bias)
    return y if residual is None else residual + y


def gemv_silu_ref(x: torch.Tensor, w13: torch.Tensor, bias: torch.Tensor | None = None, *,
                  norm_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Reference for :func:`gemv_silu`: the eager ops ([RMSNorm,] the GEMM, then ``silu(gate) * up``)."""
    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    gate, up = F.linear(x, w13, bias).chunk(2, dim=-1)
    return F.silu(gate) * up
