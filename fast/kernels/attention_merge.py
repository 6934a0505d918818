"""Fold one more disjoint key block into a running softmax-attention result: the blocked prefill's merge.

The blocked prefill (:func:`specdec.fast.model._prefill_attention_blocks`) attends a chunk's queries to a few
disjoint key blocks, each giving a block-normalised output and its natural log-sum-exp, and merges them.
:func:`merge_attention` does one such merge in ONE launch, for every row ``r = (b, h, i)`` of ``B x H x n``
and every column ``d < D``::

    L[r]          = logaddexp(acc_lse[r], lse[r])
    dst[r, d]     = exp(acc_lse[r] - L[r]) * acc[r, d] + exp(lse[r] - L[r]) * out[r, d]     (in fp32)
    dst_lse[r]    = L[r]

``dst`` is then normalised over both key sets and ``dst_lse`` is their joint log-sum-exp -- the rule of
:func:`specdec.ref.attention.merge_attention`, which it must match up to fp32 rounding. It replaces six eager
ops per merge (logaddexp, two exps, mul_, addcmul_, copy_) plus the fp32 copy of the first block and the final
cast back (BENCHMARKS "Session 18": ~0.115 s of a 32k prefill of the Llama-3-8B shape on an H100).

Shapes: ``acc``, ``out``, ``dst`` [B, H, n, D], any strides, each fp16 / bf16 / fp32 (read and computed in
fp32, ``dst`` stored in its own dtype: fp32 for a running result, the model's dtype for the last merge);
``acc_lse``, ``lse``, ``dst_lse`` [B, H, n] fp32, any strides. ``dst`` may BE ``acc`` (and ``dst_lse`` BE
``acc_lse``): a program loads a tile before it stores the same tile, so the merge runs in place; any other
overlap between an output and an input is refused. Every log-sum-exp must be finite (each block has at least
one visible key per row; the prefill's blocks always do) -- the kernel has no -inf case.

Grid ``(B * H, cdiv(n, BLOCK_N))``: a program owns ``BLOCK_N`` rows of one (batch, head) and all ``D``
columns (padded to a power of two, masked), so it reads its rows' two log-sum-exps once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_tensor, next_pow2

__all__ = ["merge_attention", "merge_attention_ref"]

_BLOCK_N = 16


@triton.jit(do_not_specialize=["N"])
def _merge_attention_kernel(
    Acc, AccLse, Out, Lse, Dst, DstLse,
    s_ab, s_ah, s_an, s_ad,
    s_lab, s_lah, s_lan,
    s_ob, s_oh, s_on, s_od,
    s_lb, s_lh, s_ln,
    s_db, s_dh, s_dn, s_dd,
    s_ldb, s_ldh, s_ldn,
    H, N, D,
    HEAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # -- which rows: BLOCK_N query rows of one (batch, head) -----------------------------------------
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, HEAD)
    row_ok = rows < N
    tile_ok = row_ok[:, None] & (cols < D)[None, :]

    # -- the two log-sum-exps and their weights: exp(x - logaddexp(a, l)) ----------------------------
    a = tl.load(AccLse + b * s_lab + h * s_lah + rows * s_lan, mask=row_ok, other=0.0)
    l = tl.load(Lse + b * s_lb + h * s_lh + rows * s_ln, mask=row_ok, other=0.0)
    joint = tl.maximum(a, l) + tl.log(1.0 + tl.exp(-tl.abs(a - l)))
    w_acc = tl.exp(a - joint)
    w_out = tl.exp(l - joint)

    # -- the weighted sum of the two tiles, in fp32, stored in dst's dtype -----------------------------
    x = tl.load(Acc + b * s_ab + h * s_ah + rows[:, None] * s_an + cols[None, :] * s_ad, mask=tile_ok, other=0.0)
    y = tl.load(Out + b * s_ob + h * s_oh + rows[:, None] * s_on + cols[None, :] * s_od, mask=tile_ok, other=0.0)
    merged = w_acc[:, None] * x.to(tl.float32) + w_out[:, None] * y.to(tl.float32)
    tl.store(Dst + b * s_db + h * s_dh + rows[:, None] * s_dn + cols[None, :] * s_dd,
             merged.to(Dst.dtype.element_ty), mask=tile_ok)
    tl.store(DstLse + b * s_ldb + h * s_ldh + rows * s_ldn, joint, mask=row_ok)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[lo, hi)`` a strided tensor touches (non-negative strides)."""
    lo = t.data_ptr()
    return lo, lo + (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _overlap(x: torch.Tensor, y: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(x), _span(y)
    return x.numel() > 0 and y.numel() > 0 and a0 < b1 and b0 < a1


def _same_view(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype


def merge_attention(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    dst: torch.Tensor | None = None, dst_lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the partial attention ``(out, lse)`` of one more disjoint key block into ``(acc, acc_lse)``.

    Writes ``dst`` (default: ``acc`` itself, in place) and ``dst_lse`` (default: ``acc_lse``) as the module
    docstring says and returns them. Shapes: ``acc``, ``out``, ``dst`` [B, H, n, D] (fp16 / bf16 / fp32, any
    strides); ``acc_lse``, ``lse``, ``dst_lse`` [B, H, n] fp32, finite. Matches :func:`merge_attention_ref`."""
    dst = acc if dst is None else dst
    dst_lse = acc_lse if dst_lse is None else dst_lse
    for name, t in (("acc", acc), ("out", out), ("dst", dst)):
        check_tensor(name, t, 4)
    for name, t in (("acc_lse", acc_lse), ("lse", lse), ("dst_lse", dst_lse)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (a natural log-sum-exp per row), got {t.dtype}")
    b, h, n, d = acc.shape
    if out.shape != acc.shape or dst.shape != acc.shape:
        raise ValueError(f"acc, out and dst must have one shape [B, H, n, D]; got {tuple(acc.shape)}, "
                         f"{tuple(out.shape)}, {tuple(dst.shape)}")
    for name, t in (("acc_lse", acc_lse), ("lse", lse), ("dst_lse", dst_lse)):
        if t.shape != (b, h, n):
            raise ValueError(f"{name} must be [B, H, n] = {(b, h, n)}, got {tuple(t.shape)}")
    if not 1 <= d <= 256:
        raise ValueError(f"head dim D must be in [1, 256], got {d}")
    for t in (acc, acc_lse, out, lse, dst, dst_lse):
        if any(s < 0 for s in t.stride()):
            raise ValueError("merge_attention takes tensors with non-negative strides")
    # an output may be its own running input exactly (in place) and must not touch any other tensor
    named = {"acc": acc, "acc_lse": acc_lse, "out": out, "lse": lse, "dst": dst, "dst_lse": dst_lse}
    for oname, in_place in (("dst", "acc"), ("dst_lse", "acc_lse")):
        for iname, t in named.items():
            if iname == oname or (oname, iname) == ("dst_lse", "dst") or not _overlap(named[oname], t):
                continue
            if iname == in_place:
                if not _same_view(named[oname], t):
                    raise ValueError(f"{oname} overlaps {iname}; it may only be {iname} itself (in place)")
            else:
                raise ValueError(f"{oname} must not overlap {iname}")
    check_device(("acc", acc), ("acc_lse", acc_lse), ("out", out), ("lse", lse), ("dst", dst), ("dst_lse", dst_lse))
    if acc.numel() == 0:
        return dst, dst_lse
    grid = (b * h, triton.cdiv(n, _BLOCK_N))
    _merge_attention_kernel[grid](
        acc, acc_lse, out, lse, dst, dst_lse,
        *acc.stride(), *acc_lse.stride(), *out.stride(), *lse.stride(), *dst.stride(), *dst_lse.stride(),
        h, n, d, HEAD=next_pow2(d), BLOCK_N=_BLOCK_N, num_warps=4,
    )
    return dst, dst_lse


def merge_attention_ref(acc: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge in eager torch, fp32 result: ``(dst, dst_lse)`` of the module docstring (what the kernel
    must match; :func:`specdec.ref.attention.merge_attention` computes the same in sigmoid form)."""
    joint = torch.logaddexp(acc_lse, lse)
    merged = torch.exp(acc_lse - joint)[..., None] * acc.float() + torch.exp(lse - joint)[..., None] * out.float()
    return merged, joint
