"""The integers of a device-driven GLIDE round, computed on the device from the cache length.

A fused greedy GLIDE round (``FastGlideDrafter``) reads every integer it needs -- catch-up tokens,
positions, cache rows, key ranges, tree rows, the deepest level it may accept -- from ONE int32
"pack" (layout of :func:`specdec.fast.glide.pack_ints`). Normally the host builds it
(``FastGlideDrafter._pack``) after reading the previous round's result. To launch the next round
BEFORE that read (so the GPU never waits for the host), :func:`round_pack` builds the same pack on
the device. Every entry ``i`` follows a recipe row (built once per tree shape on the host by
``FastGlideDrafter._ahead_recipe``)::

    recipe [5, N] int32 = (kind, a, b, c, lo) per entry
    kind 0:  out = max(a * L + b * base + c, lo)              (affine; constants have a = b = 0)
    kind 1:  out = seq[L + c]                                 (a token of the sequence, by position)
    kind 2:  out = min(max(end - L - 1, 0), c)                (levels still acceptable; c = all levels)

with ``L = length_t[0]`` (the target cache length: the round's root sits at position ``L``),
``ctl = [base, end]`` (the draft window's first position; the cache length at which the call's
token budget is spent, so ``end - L`` tokens are still to be emitted: the round may accept that many
minus the bonus token) and ``seq`` the sequence by position (written by
:func:`specdec.fast.kernels.greedy_accept`).

Shapes: recipe [5, N] int32 (row stride ``stride_f``), seq [capacity] int32, length_t [>= 1]
int32, ctl [>= 2] int32, out [N] int32 (N <= 1024). One program, no host synchronisation
(graph-capturable).

Reference (must match): ``FastGlideDrafter._pack`` evaluated on the host for the same ``L``,
``base`` and budget (``tests/fast/test_round_pack.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, next_pow2

__all__ = ["round_pack", "round_pack_ref", "AFFINE", "TOKEN", "DEPTH", "NO_CLAMP"]

AFFINE, TOKEN, DEPTH = 0, 1, 2
NO_CLAMP = -(2**31)
MAX_ENTRIES = 1024


@triton.jit(do_not_specialize=["N", "stride_f"])
def _round_pack_kernel(Recipe, stride_f, Seq, LenT, Ctl, Out, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < N
    kind = tl.load(Recipe + i, mask=ok, other=0)
    a = tl.load(Recipe + stride_f + i, mask=ok, other=0)
    b = tl.load(Recipe + 2 * stride_f + i, mask=ok, other=0)
    c = tl.load(Recipe + 3 * stride_f + i, mask=ok, other=0)
    lo = tl.load(Recipe + 4 * stride_f + i, mask=ok, other=0)
    L = tl.load(LenT)
    base = tl.load(Ctl)
    end = tl.load(Ctl + 1)
    # kind 0: affine in (L, base), clamped from below
    value = tl.maximum(a * L + b * base + c, lo)
    # kind 1: the token at position L + c
    tok = tl.load(Seq + L + c, mask=ok & (kind == 1), other=0)
    value = tl.where(kind == 1, tok, value)
    # kind 2: how many levels may still be accepted: tokens left to emit minus the bonus token
    left = tl.minimum(tl.maximum(end - L - 1, 0), c)
    value = tl.where(kind == 2, left, value)
    tl.store(Out + i, value, mask=ok)


def _check(recipe: torch.Tensor, seq: torch.Tensor, length_t: torch.Tensor, ctl: torch.Tensor, out: torch.Tensor) -> int:
    for name, t in (("recipe", recipe), ("seq", seq), ("length_t", length_t), ("ctl", ctl), ("out", out)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if recipe.dim() != 2 or recipe.shape[0] != 5 or recipe.stride(1) != 1:
        raise ValueError(f"recipe must be [5, N] with unit column stride, got {tuple(recipe.shape)}")
    n = recipe.shape[1]
    if not 1 <= n <= MAX_ENTRIES:
        raise ValueError(f"recipe must have 1..{MAX_ENTRIES} entries, got {n}")
    if out.dim() != 1 or out.shape[0] != n or out.stride(0) != 1:
        raise ValueError(f"out must be a contiguous [{n}] tensor, got {tuple(out.shape)}")
    if ctl.dim() != 1 or ctl.shape[0] < 2 or length_t.dim() != 1 or length_t.numel() < 1 or seq.dim() != 1 or seq.stride(0) != 1:
        raise ValueError("ctl must be [>= 2] (base, end), length_t [>= 1], seq a contiguous [capacity] tensor")
    check_device(("recipe", recipe), ("seq", seq), ("length_t", length_t), ("ctl", ctl), ("out", out))
    return n


def round_pack(recipe: torch.Tensor, seq: torch.Tensor, length_t: torch.Tensor, ctl: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` [N] from the recipe (module docstring) in one launch; returns ``out``.

    The token entries read ``seq[L + c]``: the caller guarantees those positions are written and
    inside ``seq`` (the round launches only when ``L + 1 - levels - 1 >= base >= 0``).
    """
    n = _check(recipe, seq, length_t, ctl, out)
    _round_pack_kernel[(1,)](recipe, recipe.stride(0), seq, length_t, ctl, out, n, BLOCK=max(next_pow2(n), 16), num_warps=4)
    return out


def round_pack_ref(recipe: torch.Tensor, seq: torch.Tensor, length_t: torch.Tensor, ctl: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`round_pack` in torch ops (returns a new tensor)."""
    kind, a, b, c, lo = (r.long() for r in recipe)
    L, base, end = int(length_t[0]), int(ctl[0]), int(ctl[1])
    value = torch.maximum(a * L + b * base + c, lo)
    tok_pos = torch.where(kind == TOKEN, L + c, torch.zeros_like(c))
    value = torch.where(kind == TOKEN, seq.long()[tok_pos], value)
    left = torch.clamp(torch.full_like(c, end - L - 1), min=0)
    value = torch.where(kind == DEPTH, torch.minimum(left, c), value)
    return value.to(torch.int32)
