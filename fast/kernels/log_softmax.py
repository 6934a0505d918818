"""Row-wise fp32 log-softmax of 16-bit logits in one launch.

What it computes -- for ``x`` [P, V] bf16 / fp16 (unit stride along V)::

    y[p, v] = (x[p, v] - m[p]) - log(sum_u exp(x[p, u] - m[p]))      fp32, m[p] = max_u x[p, u]

which is ``torch.log_softmax(x, dim=-1, dtype=torch.float32)`` up to fp32 rounding (the sum's order differs;
the tests bound the difference). PyTorch runs that as two launches for bf16 -- a cast of ``x`` to fp32, then
the softmax -- because its fused 16-bit-in / fp32-out path takes fp16 only. The GLIDE beam ranks its draft's
children by these values once per level (:meth:`specdec.fast.glide.FastGlideDrafter._scores`).

How: one program per row. Pass 1 walks the row in BLOCK-wide tiles keeping a running maximum and the sum of
``exp(x - max)`` rescaled at each new maximum; pass 2 writes ``(x - m) - log(s)``. A row's values depend on
that row alone (nothing is reduced across rows, the tile walk is fixed by V), so a row's bits do not depend
on how many rows the call holds -- batched and single drafts rank alike.

Reference (must match within fp32 rounding): ``torch.log_softmax(x.float(), dim=-1)``, what the reference
drafter's :meth:`specdec.ref.glide.GlideDrafter._scores` computes on its fp32 logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, next_pow2

__all__ = ["log_softmax_f32", "logprobs_f32", "LOG_SOFTMAX_BLOCK", "KERNEL_MAX_V", "uses_log_softmax_kernel"]

LOG_SOFTMAX_BLOCK = 4096
"""The widest tile a program reads at once (a power of two). A row of V <= this many entries is read once per
pass in one tile."""

KERNEL_MAX_V = 32768
"""The widest vocabulary :func:`logprobs_f32` sends to the kernel. One program walks a whole row, so a long row
is read by one SM: on an H100 the kernel takes 2.2-2.4 us for 1-16 rows of 4096 columns (PyTorch's cast +
softmax: 5.2-5.5 us), 10.6 us for 16 rows of 32768 (10.9), but 43-44 us for 1-16 rows of 128256 (PyTorch:
32-37 us), BENCHMARKS "Session 39: the draft's log-softmax in one launch". Wider rows keep PyTorch's two
launches."""


def uses_log_softmax_kernel(v: int, dtype: torch.dtype, is_cuda: bool) -> bool:
    """Whether :func:`logprobs_f32` runs :func:`log_softmax_f32` for logits of ``v`` columns: 16-bit logits on
    CUDA with ``1 <= v <=`` :data:`KERNEL_MAX_V`."""
    return is_cuda and dtype in (torch.bfloat16, torch.float16) and 1 <= v <= KERNEL_MAX_V


@triton.jit(do_not_specialize=["stride_x", "stride_y", "V"])
def _log_softmax_kernel(X, Y, stride_x, stride_y, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    offs = tl.arange(0, BLOCK)
    # pass 1: the row's maximum and sum of exp(x - max), rescaled whenever the maximum grows
    x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    s = tl.sum(tl.exp(x - m), axis=0)
    for start in range(BLOCK, V, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    log_s = tl.log(s)
    # pass 2: y = (x - m) - log(s), the order torch's log-softmax uses
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x - m) - log_s, mask=cols < V)


def log_softmax_f32(x: torch.Tensor, out: torch.Tensor | None = None, block: int | None = None) -> torch.Tensor:
    """fp32 log-softmax over the last dim of bf16 / fp16 ``x`` [P, V] (module docstring); one launch,
    graph-capturable.

    Args:
        x: [P, V] bfloat16 or float16, unit stride along V (rows may be strided), V >= 1.
        out: optional [P, V] float32 destination with unit stride along V (default: a new tensor).
        block: tile width override (a power of two >= 16; tests use it to force the multi-tile walk).
    Returns ``out``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a [P, V] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bfloat16 or float16 (fp32 logits: use torch.log_softmax), got {x.dtype}")
    p, v = x.shape
    if v < 1:
        raise ValueError(f"x must have V >= 1 columns, got shape {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"x must have unit stride along V, got strides {x.stride()}")
    if out is None:
        out = torch.empty(p, v, dtype=torch.float32, device=x.device)
    elif (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or tuple(out.shape) != (p, v)
          or out.stride(1) != 1):
        raise ValueError(f"out must be a float32 [{p}, {v}] tensor with unit stride along V, got "
                         f"{getattr(out, 'dtype', None)} {tuple(getattr(out, 'shape', ()))}")
    check_device(("x", x), ("out", out))
    if block is None:
        block = min(next_pow2(v), LOG_SOFTMAX_BLOCK)
    elif block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if p:
        _log_softmax_kernel[(p,)](x, out, x.stride(0), out.stride(0), v, BLOCK=block,
                                  num_warps=4 if block <= 2048 else 8)
    return out


def logprobs_f32(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities over the last dim of ``logits`` [..., V]: :func:`log_softmax_f32` (one launch) for
    bf16 / fp16 logits on CUDA up to :data:`KERNEL_MAX_V` columns, else ``torch.log_softmax(logits, dim=-1,
    dtype=torch.float32)`` -- so fp32 logits (the reference's dtype) and the CPU keep PyTorch's values bit for bit."""
    if logits.dim() >= 1 and uses_log_softmax_kernel(logits.shape[-1], logits.dtype, logits.is_cuda):
        flat = logits.reshape(-1, logits.shape[-1])
        if flat.stride(-1) == 1:
            return log_softmax_f32(flat).view(logits.shape)
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)
