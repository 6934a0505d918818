"""Fused elementwise kernels of a decoder layer: RMSNorm (+ residual add), RoPE + KV write, SiLU * up.

Between the GEMMs of a layer the eager PyTorch path ran ~35 tiny kernels (RMSNorm in ~7 ops, RoPE
in ~5 ops each for q and k, per-batch ``index_copy_`` into the cache, residual adds, SiLU * up).
Under a CUDA graph each still costs ~2 us, so they are folded here into four launches per layer:

* :func:`rms_norm` ``(x [..., H], w [H], eps) -> [..., H]`` -- one program per row. Same
  arithmetic order as :func:`specdec.ref.model.rms_norm`::

      w * (x_f32 * rsqrt(mean(x_f32 ** 2) + eps)).to(x.dtype)

  (fp32 statistics; the normalised row is rounded to x's dtype *before* the weight multiply, which
  rounds again to ``promote(w.dtype, x.dtype)``, exactly like the two eager ops).
* :func:`add_rms_norm` ``(x, residual, w, eps) -> (normed, new_residual)`` -- one kernel for
  ``new_residual = residual + x`` (rounded to the residual stream's dtype, as the eager add) and
  ``normed = rms_norm(new_residual, w, eps)``.
* :func:`rope_qkv_write` ``(qkv [B, M, (Hq + 2 Hkv) D], cos, sin [B, M, D], k_cache, v_cache
  [B, Hkv, capacity, D], rows [B, M]) -> q [B, Hq, M, D]`` -- one launch, grid ``(B * M, head
  blocks)``: rotates the q and k heads (rotate-half convention) and writes rotated k and raw v
  straight into cache rows ``rows[b, m]``; rotated q is returned (contiguous). Same arithmetic as
  :func:`specdec.shared.rope.apply_rope`: ``x * cos + rotate_half(x) * sin`` where each product
  and the sum are rounded to ``promote(qkv.dtype, cos.dtype)`` like the eager ops, then cast to
  qkv's dtype. (fp32 results are bitwise-identical to the reference: FMA contraction is disabled
  for these kernels.)
* :func:`silu_mul` ``(gate_up [..., 2F]) -> [..., F]`` -- ``F.silu(gate) * up`` with
  ``gate, up = gate_up.chunk(2, -1)`` (the fused ``w13`` GEMM output); silu in fp32, rounded to
  the input dtype, then the product rounded again (as the eager ops). Matches
  :func:`specdec.ref.model.swiglu_mlp`'s activation to within an ulp of the fp32 exp.

All inputs may have any strides (2-D row views are used when the leading dims flatten without a
copy); outputs are new contiguous tensors. fp16, bf16 and fp32; head dims: multiples of 16 up to 256.
Every function is CUDA-graph capturable: shape/dtype checks are host-only, and the one value
check (:func:`rope_qkv_write`'s ``rows`` range, a host sync) is skipped under capture or with
``check_rows=False``.

* :func:`embed_rms_norm` ``(tokens, table [V, H], w, eps) -> (normed, x)`` -- the embedding lookup
  and the first RMSNorm of a layer in one kernel (the GLIDE draft layer starts every level with it).

References (the kernels must match them): :func:`rms_norm_ref`, :func:`add_rms_norm_ref`, :func:`embed_rms_norm_ref`,
:func:`rope_qkv_write_ref`, :func:`silu_mul_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    check_device,
    check_int_tensor,
    check_tensor,
    graph_capturing,
    interpreter_active,
    next_pow2,
)

__all__ = [
    "rms_norm",
    "add_rms_norm",
    "rope_qkv_write",
    "silu_mul",
    "rms_norm_ref",
    "add_rms_norm_ref",
    "rope_qkv_write_ref",
    "rope_q",
    "rope_q_ref",
    "silu_mul_ref",
]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}   # the rounding dtype, as a constexpr
_MAX_NORM_COLS = 65536


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_to(x, CODE: tl.constexpr):
    """fp32 ``x`` rounded to fp32 (CODE 0), fp16 (1) or bf16 (2), returned as fp32."""
    if CODE == 1:
        x = x.to(tl.float16).to(tl.float32)
    if CODE == 2:
        x = x.to(tl.bfloat16).to(tl.float32)
    return x


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    X, R, W, Out, ResOut, Idx,
    stride_xr, stride_xc, stride_rr, stride_rc, stride_w,
    stride_or, stride_oc, stride_sr, stride_sc,
    n_rows, n_cols, eps,
    HAS_RES: tl.constexpr, GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    ok = (rows < n_rows) & (cols < n_cols)
    if GATHER:
        # the embedding lookup: row `rows` of the output is row Idx[rows] of the table X, cast to the
        # residual stream's dtype (as `F.embedding(...).to(dtype)`) and stored as the residual stream
        idx = tl.load(Idx + rows, mask=rows < n_rows, other=0).to(tl.int64)
        x = tl.load(X + idx * stride_xr + cols * stride_xc, mask=ok, other=0.0).to(ResOut.dtype.element_ty)
        tl.store(ResOut + rows * stride_sr + cols * stride_sc, x, mask=ok)
    else:
        x = tl.load(X + rows * stride_xr + cols * stride_xc, mask=ok, other=0.0)
    if HAS_RES:
        # the eager residual add: fp32 sum rounded to the residual stream's dtype
        r = tl.load(R + rows * stride_rr + cols * stride_rc, mask=ok, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(ResOut.dtype.element_ty)
        tl.store(ResOut + rows * stride_sr + cols * stride_sc, s, mask=ok)
        x = s
    xf = x.to(tl.float32)
    ms = tl.sum(xf * xf, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(ms + eps)
    y = (xf * rstd[:, None]).to(x.dtype)             # rounded to x's dtype, as `.to(x.dtype)`
    w = tl.load(W + cols * stride_w, mask=cols < n_cols, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)        # `weight * y`, rounded once to the output dtype
    tl.store(Out + rows * stride_or + cols * stride_oc, out.to(Out.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["stride_rb", "M"])
def _rope_qkv_write_kernel(
    QKV, Cos, Sin, Q, KC, VC, Rows,
    stride_xb, stride_xm, stride_xc,
    stride_cb, stride_cm, stride_cd,
    stride_sb, stride_sm, stride_sd,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_rb, stride_rm,
    M, HQ, HKV,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    CDT: tl.constexpr,
):
    # -- which tokens (b, m) and which heads (q heads, then k heads, then v heads); tiles are
    #    [BLOCK_T tokens, BLOCK_H heads, BLOCK_HALF columns of one half] ------------------------------
    t_blocks = tl.cdiv(M, BLOCK_T)
    pid = tl.program_id(0)
    b = (pid // t_blocks).to(tl.int64)
    m = ((pid % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    n_heads = HQ + 2 * HKV
    m3 = m[:, None, None]
    h3 = heads[None, :, None]
    d3 = offs[None, None, :]
    t_ok = m3 < M
    ok = t_ok & (h3 < n_heads) & (d3 < HALF)
    cs_ok = t_ok & (d3 < HALF)

    # -- the two halves of every head, and cos/sin of these tokens --------------------------------
    x_ptr = QKV + b * stride_xb + m3 * stride_xm + (h3.to(tl.int64) * (2 * HALF) + d3) * stride_xc
    x1 = tl.load(x_ptr, mask=ok, other=0.0)
    x2 = tl.load(x_ptr + HALF * stride_xc, mask=ok, other=0.0)
    c_ptr = Cos + b * stride_cb + m3 * stride_cm + d3 * stride_cd
    s_ptr = Sin + b * stride_sb + m3 * stride_sm + d3 * stride_sd
    c1 = tl.load(c_ptr, mask=cs_ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + HALF * stride_cd, mask=cs_ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr, mask=cs_ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_ptr + HALF * stride_sd, mask=cs_ok, other=0.0).to(tl.float32)

    # -- x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; every op rounded to CDT -------
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    o1 = _round_to(_round_to(x1f * c1, CDT) - _round_to(x2f * s1, CDT), CDT).to(x1.dtype)
    o2 = _round_to(_round_to(x2f * c2, CDT) + _round_to(x1f * s2, CDT), CDT).to(x1.dtype)

    # -- q heads -> Q [B, Hq, M, D] ----------------------------------------------------------------
    is_q = h3 < HQ
    hq = tl.where(is_q, h3, 0).to(tl.int64)
    q_ptr = Q + b * stride_qb + m3 * stride_qm + hq * stride_qh + d3 * stride_qd
    q_ok = ok & is_q
    tl.store(q_ptr, o1, mask=q_ok)
    tl.store(q_ptr + HALF * stride_qd, o2, mask=q_ok)

    # -- k heads (rotated) and v heads (raw) -> cache rows rows[b, m] ------------------------------
    row = tl.load(Rows + b * stride_rb + m3 * stride_rm, mask=t_ok, other=0).to(tl.int64)
    is_k = (h3 >= HQ) & (h3 < HQ + HKV)
    hk = tl.where(is_k, h3 - HQ, 0).to(tl.int64)
    k_ptr = KC + b * stride_kb + row * stride_kn + hk * stride_kh + d3 * stride_kd
    k_ok = ok & is_k
    tl.store(k_ptr, o1.to(KC.dtype.element_ty), mask=k_ok)
    tl.store(k_ptr + HALF * stride_kd, o2.to(KC.dtype.element_ty), mask=k_ok)
    is_v = h3 >= HQ + HKV
    hv = tl.where(is_v, h3 - HQ - HKV, 0).to(tl.int64)
    v_ptr = VC + b * stride_vb + row * stride_vn + hv * stride_vh + d3 * stride_vd
    v_ok = ok & is_v
    tl.store(v_ptr, x1.to(VC.dtype.element_ty), mask=v_ok)
    tl.store(v_ptr + HALF * stride_vd, x2.to(VC.dtype.element_ty), mask=v_ok)


@triton.jit(do_not_specialize=["n_rows"])
def _silu_mul_kernel(
    GU, Out,
    stride_gr, stride_gc, stride_or, stride_oc,
    n_rows, n_cols,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[None, :]
    ok = (rows < n_rows) & (cols < n_cols)
    g = tl.load(GU + rows * stride_gr + cols * stride_gc, mask=ok, other=0.0)
    u = tl.load(GU + rows * stride_gr + (cols + n_cols) * stride_gc, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)     # F.silu in fp32, rounded to the input dtype
    out = act.to(tl.float32) * u.to(tl.float32)     # `* up`, rounded once
    tl.store(Out + rows * stride_or + cols * stride_oc, out.to(Out.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _launch_opts() -> dict:
    """No FMA contraction on the GPU (fp32 results bitwise like the eager ops); none under the interpreter."""
    return {} if interpreter_active() else {"enable_fp_fusion": False}


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., C] as a 2-D [rows, C] view (strides kept) when possible, else a contiguous copy."""
    if t.dim() == 2:
        return t
    if t.dim() == 1:
        return t[None]
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim, got a scalar")


# ---------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)
# ---------------------------------------------------------------------------------------------


def _given_out(name: str, t: torch.Tensor | None, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A kernel's output: ``t`` when given (checked: a tensor of this shape, dtype and device; any strides), else a
    new contiguous tensor. ``shape`` is printed as passed."""
    if t is None:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {device}; "
                         f"got {t.dtype} {list(t.shape)} on {t.device}")
    return t


def _out_rows(name: str, t: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A norm's output [..., H]: :func:`_given_out`, and a given one must also be viewable as [rows, H]."""
    out = _given_out(name, t, tuple(shape), dtype, device)
    if t is not None:
        try:
            out.view(-1, shape[-1])
        except RuntimeError:
            raise ValueError(f"{name} must be viewable as [rows, {shape[-1]}] (rows of one stride); got strides "
                             f"{out.stride()}") from None
    return out


def _norm(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float,
          out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    _check_float("x", x)
    _check_float("weight", w)
    if w.dim() != 1 or w.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [H] with H = x.shape[-1] = {x.shape[-1]}, got shape {tuple(w.shape)}")
    named = [("x", x), ("weight", w)]
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        named.append(("residual", residual))
    check_device(*named)
    h = x.shape[-1]
    if h > _MAX_NORM_COLS:
        raise ValueError(f"rms_norm supports rows of at most {_MAX_NORM_COLS} elements, got {h}")
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = _out_rows("out", out, x.shape, torch.promote_types(w.dtype, res_dtype), x.device)
    new_res = None if residual is None else _out_rows("residual_out", residual_out, x.shape, res_dtype, x.device)
    if x.numel() == 0:
        return out, new_res
    x2, o2 = _rows2d(x), out.view(-1, h)
    r2 = _rows2d(residual) if residual is not None else x2
    s2 = new_res.view(-1, h) if new_res is not None else o2
    _launch_norm(x2, r2, w, o2, s2, None, eps, has_res=residual is not None)
    return out, new_res


def _launch_norm(x2, r2, w, o2, s2, ids, eps: float, has_res: bool) -> None:
    """One :func:`_rms_norm_kernel` launch over the rows of the 2-D views (``ids``: gather x2's rows)."""
    n, h = o2.shape
    block = max(16, next_pow2(h))
    # one row per program on the GPU; the interpreter runs programs one by one, so give it big tiles
    block_r = min(next_pow2(n), max(1, 16384 // block)) if interpreter_active() else 1
    num_warps = 4 if block <= 1024 else (8 if block <= 8192 else 16)
    _rms_norm_kernel[(triton.cdiv(n, block_r),)](
        x2, r2, w, o2, s2, ids if ids is not None else x2,
        x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1), w.stride(0),
        o2.stride(0), o2.stride(1), s2.stride(0), s2.stride(1),
        n, h, float(eps),
        HAS_RES=has_res, GATHER=ids is not None, BLOCK_R=block_r, BLOCK=block,
        num_warps=num_warps, **_launch_opts(),
    )


def embed_rms_norm(tokens: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, eps: float,
                   dtype: torch.dtype | None = None, check_ids: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = F.embedding(tokens, table).to(dtype)``; ``normed = rms_norm(x, weight, eps)``, in one kernel.

    Args:
        tokens: [...] integer ids in ``[0, table.shape[0])``.
        table: [V, H] the embedding table (unit-stride rows not required).
        weight: [H]; eps: as :func:`rms_norm`.
        dtype: the residual stream's dtype (default the table's).
        check_ids: check the id range on the host first (a synchronisation; skipped under CUDA graph
            capture). Callers whose ids come from the device's own kernels pass False.
    Returns ``(normed, x)`` of shape ``[..., H]``; matches :func:`embed_rms_norm_ref`.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be an int32/int64 tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    _check_float("table", table)
    _check_float("weight", weight)
    if table.dim() != 2:
        raise ValueError(f"table must be [V, H], got shape {tuple(table.shape)}")
    v, h = table.shape
    if weight.dim() != 1 or weight.shape[0] != h:
        raise ValueError(f"weight must be [H] with H = {h}, got shape {tuple(weight.shape)}")
    if h > _MAX_NORM_COLS:
        raise ValueError(f"embed_rms_norm supports rows of at most {_MAX_NORM_COLS} elements, got {h}")
    check_device(("tokens", tokens), ("table", table), ("weight", weight))
    dtype = dtype or table.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported; supported: float16, bfloat16, float32")
    ids = tokens.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    capturing = ids.is_cuda and torch.cuda.is_current_stream_capturing()
    if check_ids and not capturing and ids.numel():
        lo, hi = (int(t) for t in torch.stack([ids.min(), ids.max()]).tolist())
        if lo < 0 or hi >= v:
            raise ValueError(f"token ids must be in [0, {v - 1}] (the table's rows), got range [{lo}, {hi}]")
    x = torch.empty((*tokens.shape, h), dtype=dtype, device=table.device)
    out = torch.empty((*tokens.shape, h), dtype=torch.promote_types(weight.dtype, dtype), device=table.device)
    if ids.numel() == 0:
        return out, x
    x2 = x.view(-1, h)
    _launch_norm(table, x2, weight, out.view(-1, h), x2, ids, eps, has_res=False)
    return out, x


def embed_rms_norm_ref(tokens: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, eps: float,
                       dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`embed_rms_norm`: the eager embedding, cast, and :func:`rms_norm_ref`."""
    x = F.embedding(tokens.long(), table).to(dtype or table.dtype)
    return rms_norm_ref(x, weight, eps), x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; matches :func:`rms_norm_ref` (= :func:`specdec.ref.model.rms_norm`).

    Args:
        x: [..., H] fp16/bf16/fp32, any strides.
        weight: [H].
        eps: added to the mean square.
    Returns [..., H] in ``promote(weight.dtype, x.dtype)`` (contiguous).
    """
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = residual + x``; ``normed = rms_norm(new_residual)``, in one kernel.

    Args:
        x: [..., H] the branch output (attention or MLP projection), any strides.
        residual: [..., H] the residual stream, same shape.
        weight: [H]; eps: as :func:`rms_norm`.
        out, residual_out: optional tensors of x's shape and the results' dtypes that receive ``normed`` and
            ``new_residual`` (e.g. row slices of whole-prompt buffers, so no copy follows). Each must be
            viewable as [rows, H] (any row and column strides). ``residual_out`` may be ``residual`` itself
            (an in-place update: a row is read whole before it is written); neither may overlap ``x``.
    Returns ``(normed, new_residual)`` (``out`` and ``residual_out`` when given); matches
    :func:`add_rms_norm_ref`.
    """
    if residual is None:
        raise TypeError("residual must be a tensor (use rms_norm without one)")
    return _norm(x, residual, weight, eps, out, residual_out)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference: :func:`specdec.ref.model.rms_norm`."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`add_rms_norm`: the eager add, then :func:`rms_norm_ref`."""
    new = residual + x
    return rms_norm_ref(new, weight, eps), new


# ---------------------------------------------------------------------------------------------
# RoPE + KV-cache write
# ---------------------------------------------------------------------------------------------


def _check_rope_qkv(src_name: str, src: torch.Tensor, width: int, width_what: str, cos, sin, k_cache, v_cache, rows):
    """Shape checks shared by :func:`rope_qkv_write` and :func:`~specdec.fast.kernels.gemv_qkv_rope`:
    ``src`` [B, M, ...] (checked by the caller) whose q|k|v width is ``width``. Returns (b, m, hq, hkv, capacity, d)."""
    check_tensor("cos", cos, 3)
    check_tensor("sin", sin, 3)
    check_tensor("k_cache", k_cache, 4)
    check_tensor("v_cache", v_cache, 4)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, m = src.shape[:2]
    cb, hkv, cap, d = k_cache.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported: it must be a multiple of 16 in [16, 256]")
    if cb != b:
        raise ValueError(f"the cache has batch {cb} but {src_name} has batch {b}")
    if width % d or width // d <= 2 * hkv:
        raise ValueError(f"{width_what} must be (Hq + 2 Hkv) * D with Hkv = {hkv}, D = {d}, Hq >= 1; got {width}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (b, m, d):
            raise ValueError(f"{name} must have shape [B, M, D] = {[b, m, d]}, got {list(t.shape)}")
    check_int_tensor("rows", rows, (b, m))
    return b, m, width // d - 2 * hkv, hkv, cap, d


def _check_rope_q(b: int, m: int, width: int, width_what: str, cos, sin) -> tuple[int, int]:
    """Shape checks shared by :func:`rope_q` and :func:`~specdec.fast.kernels.gemv_q_rope`: query heads of
    ``width`` = Hq * D columns for [B, M] tokens, D = cos's last dim. Returns (hq, d)."""
    check_tensor("cos", cos, 3)
    check_tensor("sin", sin, 3)
    d = cos.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported: it must be a multiple of 16 in [16, 256]")
    if width % d or width == 0:
        raise ValueError(f"{width_what} must be Hq * D with D = {d}, Hq >= 1; got {width}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (b, m, d):
            raise ValueError(f"{name} must have shape [B, M, D] = {[b, m, d]}, got {list(t.shape)}")
    return width // d, d


def _check_cache_rows(rows: torch.Tensor, capacity: int, device: torch.device) -> None:
    """Cache rows in [0, capacity) (a host sync; skipped under graph capture, where it cannot run)."""
    if rows.numel() and not graph_capturing(device):
        lo, hi = (int(x) for x in torch.stack([rows.min(), rows.max()]).tolist())
        if lo < 0 or hi >= capacity:
            raise ValueError(f"rows must be in [0, capacity) = [0, {capacity}); got range [{lo}, {hi}]")


def rope_qkv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    *,
    check_rows: bool = True,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k of a fused projection, write k (rotated) and v to the cache; return rotated q.

    Args:
        qkv: [B, M, (Hq + 2 Hkv) * D], heads laid out ``[q heads | k heads | v heads]``, each D wide;
            any strides.
        cos, sin: [B, M, D] RoPE tables of the M tokens (any strides, any supported dtype).
        k_cache, v_cache: [B, Hkv, capacity, D] one layer of the cache (views; any strides).
        rows: [B, M] integer cache rows, each in [0, capacity); rows of one batch entry distinct.
        check_rows: verify the rows range (a host sync; always skipped under graph capture).
        q_out: optional [B, Hq, M, D] tensor of qkv's dtype (any strides, e.g. a slice of a whole-prompt
            query buffer) that receives q instead of a new contiguous tensor.

    Returns q [B, Hq, M, D] (contiguous, qkv's dtype; ``q_out`` when given). In place: ``k_cache[b, :, rows[b, m]] =
    rope(k)[b, :, m]`` and ``v_cache[b, :, rows[b, m]] = v[b, :, m]``. Matches
    :func:`rope_qkv_write_ref`.
    """
    check_tensor("qkv", qkv, 3)
    b, m, hq, hkv, cap, d = _check_rope_qkv("qkv", qkv, qkv.shape[-1], "qkv's last dim", cos, sin, k_cache, v_cache, rows)
    dev = check_device(("qkv", qkv), ("cos", cos), ("sin", sin), ("k_cache", k_cache), ("v_cache", v_cache), ("rows", rows))
    q = _given_out("q_out", q_out, [b, hq, m, d], qkv.dtype, dev)
    if b == 0 or m == 0:
        return q
    if check_rows:
        _check_cache_rows(rows, cap, dev)
    cdt = torch.promote_types(torch.promote_types(qkv.dtype, cos.dtype), sin.dtype)
    half = d // 2
    block_half = next_pow2(half)
    n_heads = hq + 2 * hkv
    if interpreter_active():   # programs run one by one: few, big tiles
        block_h = next_pow2(n_heads)
        block_t = min(next_pow2(m), max(1, 16384 // (block_h * block_half)))
    else:
        block_h = min(next_pow2(n_heads), max(1, 1024 // block_half))
        block_t = 1
    grid = (b * triton.cdiv(m, block_t), triton.cdiv(n_heads, block_h))
    _rope_qkv_write_kernel[grid](
        qkv, cos, sin, q, k_cache, v_cache, rows,
        *qkv.stride(), *cos.stride(), *sin.stride(), *q.stride(),
        *k_cache.stride(), *v_cache.stride(), *rows.stride(),
        m, hq, hkv,
        HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t, BLOCK_H=block_h, CDT=_DTYPE_CODE[cdt],
        num_warps=4, **_launch_opts(),
    )
    return q


def rope_q(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate query heads only (the GLIDE cross-attention query): one launch of the
    :func:`rope_qkv_write` kernel with no K/V heads.

    Args:
        x: [B, M, Hq * D] projected queries, any strides.
        cos, sin: [B, M, D] RoPE tables of the M tokens.
    Returns q [B, Hq, M, D] (contiguous, x's dtype); matches :func:`rope_q_ref`.
    """
    check_tensor("x", x, 3)
    b, m, width = x.shape
    hq, d = _check_rope_q(b, m, width, "x's last dim", cos, sin)
    dev = check_device(("x", x), ("cos", cos), ("sin", sin))
    q = torch.empty((b, hq, m, d), dtype=x.dtype, device=dev)
    if b == 0 or m == 0:
        return q
    cdt = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    half = d // 2
    block_half = next_pow2(half)
    if interpreter_active():
        block_h = next_pow2(hq)
        block_t = min(next_pow2(m), max(1, 16384 // (block_h * block_half)))
    else:
        block_h = min(next_pow2(hq), max(1, 1024 // block_half))
        block_t = 1
    # no K/V heads: the cache and row arguments are never read or written (a 1-element stand-in)
    dummy = torch.empty((1, 1, 1, 1), dtype=x.dtype, device=dev)
    rows = torch.empty((1, 1), dtype=torch.int32, device=dev)
    grid = (b * triton.cdiv(m, block_t), triton.cdiv(hq, block_h))
    _rope_qkv_write_kernel[grid](
        x, cos, sin, q, dummy, dummy, rows,
        *x.stride(), *cos.stride(), *sin.stride(), *q.stride(),
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        m, hq, 0,
        HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t, BLOCK_H=block_h, CDT=_DTYPE_CODE[cdt],
        num_warps=4, **_launch_opts(),
    )
    return q


def rope_q_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`rope_q`: split heads, :func:`~specdec.shared.rope.apply_rope`."""
    from specdec.shared.rope import apply_rope

    b, m, width = x.shape
    d = cos.shape[-1]
    return apply_rope(x.reshape(b, m, width // d, d).transpose(1, 2), cos, sin).contiguous()


def rope_qkv_write_ref(qkv, cos, sin, k_cache, v_cache, rows) -> torch.Tensor:
    """Reference for :func:`rope_qkv_write`: split heads, :func:`~specdec.shared.rope.apply_rope`, ``index_copy_``."""
    from specdec.shared.rope import apply_rope

    b, m, width = qkv.shape
    _, hkv, _, d = k_cache.shape
    hq = width // d - 2 * hkv
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = (t.reshape(b, m, -1, d).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    for bi in range(b):
        k_cache[bi].index_copy_(1, rows[bi].long(), k[bi].to(k_cache.dtype))
        v_cache[bi].index_copy_(1, rows[bi].long(), v[bi].to(v_cache.dtype))
    return q.contiguous()


# ---------------------------------------------------------------------------------------------
# SiLU(gate) * up
# ---------------------------------------------------------------------------------------------


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for ``gate, up = gate_up.chunk(2, dim=-1)``; matches :func:`silu_mul_ref`.

    Args:
        gate_up: [..., 2F] fp16/bf16/fp32 (the fused ``w13`` projection), any strides.
    Returns [..., F] (contiguous, same dtype).
    """
    _check_float("gate_up", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (2F), got {gate_up.shape[-1]}")
    check_device(("gate_up", gate_up))
    f = gate_up.shape[-1] // 2
    out = torch.empty(gate_up.shape[:-1] + (f,), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    g2, o2 = _rows2d(gate_up), out.view(-1, f)
    n = g2.shape[0]
    if interpreter_active():   # programs run one by one: few, big tiles
        block = max(16, next_pow2(f))
        block_r = min(next_pow2(n), max(1, 16384 // block))
    else:
        block, block_r = min(1024, max(16, next_pow2(f))), 1
    _silu_mul_kernel[(triton.cdiv(n, block_r), triton.cdiv(f, block))](
        g2, o2, g2.stride(0), g2.stride(1), o2.stride(0), o2.stride(1), n, f,
        BLOCK_R=block_r, BLOCK=block, num_warps=4, **_launch_opts(),
    )
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`silu_mul` (the eager ops of :func:`specdec.ref.model.swiglu_mlp`)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
