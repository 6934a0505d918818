"""The draft's own attention state: :class:`SlidingCache`, its constant-size K/V buffer, and
:class:`GlideBounds`, which keys each query of one :func:`specdec.fast.glide.glide_layer` call sees.

The buffer has ``2 * window + MAX_TREE_NODES`` rows whatever the context length: row ``r`` holds
position ``base + r``; when the prefix would overflow ``2 * window`` rows, the last ``window`` rows
are moved to the front (one copy every ``window`` tokens) and ``base`` advances. Tree nodes of the
current round sit right after the prefix rows and are simply overwritten next round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from specdec.fast.glide.weights import FastGlide
from specdec.fast.model import MAX_TREE_NODES

__all__ = ["SlidingCache", "GlideBounds"]


class SlidingCache:
    """The draft's constant-size K/V buffer: ``[1, Hkv, 2 * window + MAX_TREE_NODES, D]`` (``Hkv``: the rank's
    KV heads, :attr:`FastGlide.local_kv_heads`).

    Rows ``[0, n)`` hold positions ``[base, base + n)`` of the verified sequence (the last ones the
    window can still reach); the rows after them are scratch for the current tree.
    """

    def __init__(self, glide: FastGlide):
        c = glide.config
        self.window = glide.window
        rows = 2 * self.window + MAX_TREE_NODES
        # this rank's KV heads under tensor parallelism (all of them without)
        self.k = torch.zeros(1, glide.local_kv_heads, rows, c.head_dim, dtype=glide.dtype, device=glide.device)
        self.v = torch.zeros_like(self.k)
        self.n = 0
        self.base = 0

    @classmethod
    def from_buffers(cls, k: torch.Tensor, v: torch.Tensor, window: int) -> "SlidingCache":
        """A cache over given K/V buffers [B, Hkv, rows, D] (a batched round's stacked row caches), empty."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.window, cache.n, cache.base = k, v, window, 0, 0
        return cache

    def make_room(self, count: int) -> None:
        """Ensure ``count`` more prefix rows fit in ``2 * window`` rows by dropping unreachable ones."""
        if self.n + count <= 2 * self.window:
            return
        keep = min(self.n, self.window)  # the next query can only see the last `window` positions
        drop = self.n - keep
        self.k[:, :, :keep] = self.k[:, :, drop : self.n].clone()
        self.v[:, :, :keep] = self.v[:, :, drop : self.n].clone()
        self.n, self.base = keep, self.base + drop


@dataclass
class GlideBounds:
    """Which keys each query of one :func:`glide_layer` call sees (int32 device tensors).

    Self-attention (the sliding cache): keys in rows ``[self_lo, self_hi)`` ([1] each), narrowed per
    query by ``self_row_lo``/``self_row_hi`` [1, T] when given (the causal catch-up), plus the tree
    block at ``tree_start`` [1] when the call passes a tree mask. Cross-attention (the target's last
    layer): rows ``[0, cross_hi)`` ([1]), narrowed per query by ``cross_row_hi`` [1, T] when given
    (``cross_row_lo`` is then a [1, T] tensor of zeros). ``cross_span`` (host int) bounds
    ``cross_hi`` and only steers the kernel's split count (the cache capacity under graph capture).
    """

    self_lo: torch.Tensor
    self_hi: torch.Tensor
    cross_hi: torch.Tensor
    cross_span: int
    self_row_lo: torch.Tensor | None = None
    self_row_hi: torch.Tensor | None = None
    cross_row_lo: torch.Tensor | None = None
    cross_row_hi: torch.Tensor | None = None
    tree_start: torch.Tensor | None = None
