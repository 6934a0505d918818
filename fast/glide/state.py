"""The fast GLIDE drafter's state, as small typed records.

* :class:`RoundBuffers` -- the tensors one round reads and writes (static under graph capture);
* :class:`Verify` -- what a fused round verifies its tree against (the target cache, ...);
* :class:`GraphKey` -- names one captured round (target cache allocation, RoPE table, catch-up
  length, shape, keyed sampling constants, and for fused rounds the tensors they read by address);
* :class:`CapturedRound` -- a captured round (its graph, buffers and what it must keep alive), or
  the eager buffers of a device-driven round where there are no graphs;
* :class:`GlideRuntime` -- what a :class:`~specdec.fast.glide.weights.FastGlide` keeps across
  generate calls (:attr:`FastGlide.runtime <specdec.fast.glide.weights.FastGlide.runtime>`): the
  sliding cache and the captured rounds, so the second call replays the first call's graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from specdec.fast.glide.cache import SlidingCache
from specdec.fast.model import StaticKVCache

__all__ = ["AHEAD", "CapturedRound", "GlideRuntime", "GraphKey", "RoundBuffers", "Verify"]


@dataclass
class RoundBuffers:
    """The tensors of one round of :meth:`FastGlideDrafter._round_body <specdec.fast.glide.drafter.FastGlideDrafter._round_body>`.

    A captured graph reads the inputs and writes the outputs by address: a graph's buffers are
    allocated once, the pack is refilled before every replay and the outputs are read after it.
    """

    pack: torch.Tensor
    """int32 [N]: every integer of the round (:func:`~specdec.fast.glide.packing.pack_ints` layout)."""
    layout: dict[str, tuple[int, int]]
    """Segment name -> (offset, length) in :attr:`pack`."""
    target_k: torch.Tensor
    """The target's last-layer keys [1, Hkv, capacity, D] (the cross-attention's keys, as stored)."""
    target_v: torch.Tensor
    """The target's last-layer values, as :attr:`target_k`."""
    cross_span: int
    """Bound on the cross-attention's key count, steering its split count (the capacity under capture)."""
    recipe: torch.Tensor | None = None
    """Device-driven rounds: the :func:`specdec.fast.kernels.round_pack` recipe [5, N] that fills :attr:`pack`."""
    keyed: tuple[float, int, float] | None = None
    """Keyed sampling's ``(temperature, top_k, top_p)``: the beam ranks processed draft log-probs plus the keyed
    noise (the key and positions come from :attr:`pack`); None: plain draft log-probs."""
    out_tokens: torch.Tensor | None = None
    """Output: the drafted tree's tokens [M] (long, root first)."""
    out_parents: torch.Tensor | None = None
    """Output: the tree's parents [M] (long, root -1)."""
    out_anc: torch.Tensor | None = None
    """Output: the tree's ancestor-or-self mask [M, M] (bool)."""
    logits: torch.Tensor | None = None
    """Fused rounds' output: the verification's logits [M, V]."""
    packed: torch.Tensor | None = None
    """Fused rounds' output: the acceptance read-back (:func:`specdec.fast.engine.verify_and_accept`)."""


class Verify(NamedTuple):
    """What a fused round verifies and accepts its tree against (:func:`specdec.fast.engine.verify_and_accept`)."""

    target_cache: StaticKVCache
    """The target's cache (its rows and ``length_t`` are read and advanced on the device)."""
    depth: torch.Tensor
    """Depth of every node of the padded tree [M] (long)."""
    seq: torch.Tensor
    """The sequence by position on the device (int32), written by the acceptance."""


AHEAD = "ahead"
"""The :attr:`GraphKey.k` of the device-driven round (its catch-up length is always ``levels + 1``)."""


class GraphKey(NamedTuple):
    """Names one captured round in :attr:`GlideRuntime.graphs`.

    A graph reads the target cache and the RoPE table by address, so they are part of the key; a
    fused round also reads the cache's ``length_t`` and ``seq``. Keys of the other catch-up lengths
    (and of the device-driven round) are this key ``._replace(k=...)``.
    """

    target_k_ptr: int
    """``data_ptr()`` of the target's last-layer keys."""
    target_k_shape: tuple[int, ...]
    """Their shape (capacity included)."""
    rope_table_ptr: int
    """``data_ptr()`` of the target's RoPE cos table (0 without one)."""
    k: int | str
    """The catch-up length, or :data:`AHEAD` for the device-driven round."""
    shape: tuple[int, ...]
    """The tree shape drafted."""
    fused: bool = False
    """A fused round (draft + verification + acceptance) rather than the draft alone."""
    length_ptr: int = 0
    """Fused rounds: ``data_ptr()`` of the target cache's ``length_t``."""
    seq_ptr: int = 0
    """Fused rounds: ``data_ptr()`` of :attr:`GlideRuntime.seq`."""
    sampling: tuple[float, int, float] | None = None
    """Keyed rounds: ``(temperature, top_k, top_p)``, constants the graph's noise step bakes in (the seed is
    not: it travels in the pack); None: the beam ranks plain draft log-probabilities."""


@dataclass
class CapturedRound:
    """A round captured as a CUDA graph, or (``graph`` None) the eager buffers of a device-driven round."""

    buf: RoundBuffers
    """The graph's static buffers."""
    inputs: Verify | None
    """What a fused round was captured with, kept alive (the graph reads it by address)."""
    graph: torch.cuda.CUDAGraph | None = None
    """The captured round; None: run the body eagerly on :attr:`buf` (no graphs: CPU)."""
    host: torch.Tensor | None = None
    """Pinned int32 staging buffer of the host pack (one ``non_blocking`` copy per replay)."""


@dataclass
class GlideRuntime:
    """What the drafter keeps on a :class:`~specdec.fast.glide.weights.FastGlide` across generate calls.

    One per FastGlide (created by the first :class:`~specdec.fast.glide.drafter.FastGlideDrafter`
    on it): the graphs read the sliding cache by address, so both persist together.
    """

    cache: SlidingCache
    """The draft's sliding K/V cache (emptied by each new drafter)."""
    graphs: dict[GraphKey, CapturedRound] = field(default_factory=dict)
    """The captured rounds, reused across calls."""
    depth: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    """Node depths [M] (long) per tree shape (:meth:`FastGlideDrafter._depth_tensor`)."""
    ctl: torch.Tensor | None = None
    """int32 [4] ``[base, end, 0, 0]`` for :func:`specdec.fast.kernels.round_pack`; allocated once
    (every device-driven graph reads it by address)."""
    ctl_value: tuple[int, int] | None = None
    """The ``(base, end)`` last written to :attr:`ctl` (skips a copy when unchanged)."""
    seq: torch.Tensor | None = None
    """int32 [capacity + 8]: the sequence by position on the device (greedy fused rounds)."""
    batch_graphs: dict = field(default_factory=dict)
    """Batched rounds of every row at once captured as CUDA graphs (:mod:`specdec.fast.glide.batch`; kept on row
    0's runtime), keyed by the target cache, RoPE table, batch size, catch-up length, shape, pack layout and the
    rows' sliding caches -- everything they read by address or bake in."""
    seq_key: tuple[int, int] | None = None
    """The target cache :attr:`seq` was sized for: ``(k.data_ptr(), capacity)``."""
