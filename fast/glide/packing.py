"""The integers of a round on the host, sent in ONE int32 host-to-device copy per round.

:func:`catch_up_segments` computes a causal catch-up's tokens, positions, cache rows and key
ranges; :func:`pack_ints` concatenates named int lists (16-byte aligned segments) into one flat
list, :func:`unpack_ints` views the segments of the device copy, and :func:`catch_up_glide_bounds`
turns a catch-up's views into :class:`~specdec.fast.glide.cache.GlideBounds`. The device-driven
rounds build the same flat layout on the device (:func:`specdec.fast.kernels.round_pack`).
"""

from __future__ import annotations

import torch
from specdec.fast.glide.cache import GlideBounds

__all__ = ["catch_up_segments", "catch_up_glide_bounds", "level_window_lo", "pack_ints", "unpack_ints"]


def catch_up_segments(tokens: list[int], first: int, base: int, window: int) -> dict[str, list[int]]:
    """Host-side integers of a causal catch-up of ``tokens`` at positions ``first, first + 1, ...`` (cache
    row = position - base), as :func:`pack_ints` segments read back by :func:`catch_up_glide_bounds`.

    Query at position t sees draft rows ``(t - window, t]`` (as rows) and target rows ``[0, t)`` -- the
    masks :func:`specdec.ref.glide.glide_layer` is given while decoding. ``self_hi`` is the prefix row
    count after the catch-up and ``cross_hi`` the last position.
    """
    positions = list(range(first, first + len(tokens)))
    rows = [p - base for p in positions]
    lo = [max(r - window + 1, 0) for r in rows]
    hi = [r + 1 for r in rows]
    return dict(tokens=list(tokens), rows=rows, row_lo=lo, row_hi=hi, pos=positions, zeros=[0] * len(rows),
                self_lo=[min(lo)], self_hi=[max(hi)], cross_hi=[max(positions)])


def level_window_lo(n: int, levels: int, window: int) -> list[int]:
    """The first prefix row each tree level's window reaches: level l (depth l + 1, query row n + l, after ``n``
    prefix rows) sees prefix rows ``(n + l - window, n)`` (and the tree rows of its ancestors)."""
    return [max(n + lv - window + 1, 0) for lv in range(levels)]


def catch_up_glide_bounds(u: dict[str, torch.Tensor], cross_span: int) -> GlideBounds:
    """The :class:`GlideBounds` of a catch-up from the device views of :func:`catch_up_segments`: one
    sequence's ([T] per-query views, [1] ranges) or a batch's ([B, T] and [B]:
    :func:`specdec.fast.glide.batch.propose_batch`)."""
    per_query = (lambda t: t[None]) if u["pos"].dim() == 1 else (lambda t: t)
    return GlideBounds(self_lo=u["self_lo"], self_hi=u["self_hi"], cross_hi=u["cross_hi"], cross_span=cross_span,
                       self_row_lo=per_query(u["row_lo"]), self_row_hi=per_query(u["row_hi"]),
                       cross_row_lo=per_query(u["zeros"]), cross_row_hi=per_query(u["pos"]))


def pack_ints(segments: dict[str, list[int]]) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """Concatenate named int lists for one host-to-device copy, each segment starting at a multiple of
    4 int32 (16 bytes): Triton specialises kernels on pointer alignment, so unaligned views would
    compile new kernel variants whenever a length changes. Returns (flat list, name -> (offset, length))."""
    flat: list[int] = []
    layout = {}
    for name, values in segments.items():
        layout[name] = (len(flat), len(values))
        flat += values + [0] * (-len(values) % 4)
    return flat, layout


def unpack_ints(p: torch.Tensor, layout: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Views of the segments of :func:`pack_ints` in the device tensor ``p``."""
    return {name: p[o : o + n] for name, (o, n) in layout.items()}
