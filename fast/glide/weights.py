"""The GLIDE draft layer's weights on the fast path: :class:`FastGlide` (fused once), :func:`as_fast_glide`
(from a :class:`specdec.shared.glide.Glide`) and :func:`load_glide` (from disk, for a fast target).

The fusion: ``wqkv``/``bqkv`` for the self-attention's q|k|v projection, ``w13`` for the MLP's
gate|up projection; the cross-attention keeps its own query and output projections (its keys and
values are the target's last-layer cache).

Tensor parallelism (:mod:`specdec.fast.tp`, docs/design.md §13): on a target split over W ranks, the draft
layer is split the same way -- :func:`shard_glide` keeps rank r's query / KV heads of both attentions and its
slice of the MLP (:func:`specdec.fast.tp.shard_weights`) -- so its cross-attention reads only the KV heads the
rank caches for the target. :func:`as_fast_glide` with ``tp`` and :func:`load_glide` on a tensor-parallel
target return that rank's :class:`FastGlide` (``tp`` set).

A truncated draft vocabulary (:attr:`specdec.shared.glide.Glide.vocab_map`, N sorted target ids) travels
along as :attr:`FastGlide.vocab_map`; the draft's output layer is then the sliced copy
``lm_head_target[vocab_map]`` [N, H] (:meth:`FastGlide.lm_head_for`), the rule of
:func:`specdec.ref.glide.draft_lm_head`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from specdec.fast.model import as_fast_model
from specdec.fast.tp import TensorParallel, TPShard, shard_weights
from specdec.shared.glide import Glide, GlideConfig, draft_vocab_size, glide_summary, load_glide_weights
from specdec.shared.weights import one_line_repr

if TYPE_CHECKING:
    from specdec.fast.glide.state import GlideRuntime

__all__ = ["FastGlide", "as_fast_glide", "load_glide", "shard_glide"]


@dataclass
class FastGlide(TPShard):
    """The GLIDE draft layer prepared for the fast path (see :func:`as_fast_glide`)."""

    config: GlideConfig
    w: dict[str, torch.Tensor] = field(repr=False)
    source: str = ""
    vocab_map: torch.Tensor | None = field(default=None, repr=False, compare=False)
    """The truncated draft vocabulary: int64 [N] target ids, sorted ascending, on the weights' device (draft
    id i proposes target token ``vocab_map[i]``); None = the full vocabulary."""
    sliced_heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)
    """``id(target lm_head) -> (that lm_head, its rows vocab_map [N, H])``: the sliced copies
    :meth:`lm_head_for` made; kept alive, since captured graphs read them by address."""
    runtime: GlideRuntime | None = field(default=None, repr=False, compare=False)
    """What the fast drafter keeps across generate calls on these weights -- the sliding cache and the
    captured CUDA graphs of its rounds (:class:`~specdec.fast.glide.state.GlideRuntime`), so a second
    call replays the first call's graphs. None until the first
    :class:`~specdec.fast.glide.drafter.FastGlideDrafter` on it."""
    row_runtimes: dict[int, GlideRuntime] = field(default_factory=dict, repr=False, compare=False)
    """The runtimes of batch rows 1, 2, ... (row 0 uses :attr:`runtime`): each row of a batched call drafts
    with its own sliding cache and graphs, kept across calls like :attr:`runtime`."""
    tp: TensorParallel | None = field(default=None, compare=False)
    """Tensor parallelism: these are rank ``tp.rank``'s slices of the layer (:func:`shard_glide`); None: the whole layer."""
    shards: dict[tuple[int, int, int], FastGlide] = field(default_factory=dict, repr=False, compare=False)
    """``(rank, world, id(group)) -> the sharded FastGlide`` made from these (whole) weights by :func:`shard_glide`."""

    @property
    def window(self) -> int:
        return self.config.window

    @property
    def device(self) -> torch.device:
        return self.w["wqkv"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.w["wqkv"].dtype


    @property
    def draft_vocab_size(self) -> int:
        """N, the tokens the draft can propose (the target's V without a truncated vocabulary)."""
        return draft_vocab_size(self)

    def lm_head_for(self, fm) -> torch.Tensor:
        """The draft's output layer for the fast target ``fm``: ``fm.w["lm_head"]`` [V, H], or with a
        truncated vocabulary its rows ``vocab_map`` [N, H] -- a sliced copy made once per target lm_head and
        kept in :attr:`sliced_heads`, before any graph reads it. Must match
        :func:`specdec.ref.glide.draft_lm_head`. On a tensor-parallel target always its own vocabulary slice
        [V', H] (the rows of ``vocab_map`` are spread over the ranks: the drafter gathers the logits and picks
        them, :meth:`specdec.fast.glide.FastGlideDrafter._scores`)."""
        lm_head = fm.w["lm_head"]
        if self.vocab_map is None or fm.tp is not None:
            return lm_head
        entry = self.sliced_heads.get(id(lm_head))
        if entry is None or entry[0] is not lm_head:
            entry = self.sliced_heads[id(lm_head)] = (lm_head, lm_head[self.vocab_map.to(lm_head.device)].contiguous())
        return entry[1]

    def __repr__(self) -> str:  # one line: never print tensors
        return one_line_repr(self, "FastGlide", glide_summary(self.config, self.vocab_map))


def as_fast_glide(glide, tp: TensorParallel | None = None) -> FastGlide:
    """Fuse a :class:`~specdec.shared.glide.Glide`'s weights (a FastGlide passes through).

    ``tp``: the rank's slices for a tensor-parallel target (:func:`shard_glide`; a world of 1 is no TP). A
    FastGlide already sharded must have been sharded for this rank and world (ValueError otherwise)."""
    if tp is not None and tp.world == 1:
        tp = None
    if isinstance(glide, FastGlide):
        if glide.tp is not None:
            if tp is None or (glide.tp.rank, glide.tp.world) != (tp.rank, tp.world):
                raise ValueError(f"this GLIDE draft is rank {glide.tp.rank}'s slice of a {glide.tp.world}-way split; the "
                                 f"target is {'not split' if tp is None else f'rank {tp.rank} of {tp.world}'}: load the "
                                 "draft for this target (load_glide(path, target)) or pass the unsplit one")
            return glide
        return glide if tp is None else shard_glide(glide, tp)
    if not isinstance(glide, Glide):
        raise TypeError(f"expected a GLIDE draft (specdec load_glide), got {type(glide).__name__}")
    cached = glide.extras.get("fast_glide")  # converted once per weights dict (keeps its graphs across calls)
    if cached is not None and cached[0] is glide.weights and cached[1].vocab_map is glide.vocab_map:
        return cached[1] if tp is None else shard_glide(cached[1], tp)
    w = glide.weights
    fw = {
        "wqkv": torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]]),
        "bqkv": torch.cat([w["self_attn.q_proj.bias"], w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"]]),
        "wo": w["self_attn.o_proj.weight"],
        "wq_x": w["cross_attn.q_proj.weight"],
        "bq_x": w["cross_attn.q_proj.bias"],
        "wo_x": w["cross_attn.o_proj.weight"],
        "w13": torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]),
        "w2": w["mlp.down_proj.weight"],
        "norm1": w["input_layernorm.weight"],
        "norm2": w["post_self_attention_layernorm.weight"],
        "norm3": w["post_cross_attention_layernorm.weight"],
    }
    fg = FastGlide(glide.config, fw, glide.source, vocab_map=glide.vocab_map)
    glide.extras["fast_glide"] = (glide.weights, fg)
    return fg if tp is None else shard_glide(fg, tp)


def shard_glide(fg: FastGlide, tp: TensorParallel, device: torch.device | str | None = None) -> FastGlide:
    """Rank ``tp.rank``'s slice of the whole draft layer ``fg`` (:func:`specdec.fast.tp.shard_weights`: query
    and KV heads of the self-attention, query heads of the cross-attention, the MLP's columns / rows), on
    ``device`` (default: ``fg``'s). Made once per (rank, world, group) and kept in ``fg.shards``, so the
    sliding caches and graphs of its runtime persist across calls. Head counts and the MLP width must be
    multiples of ``tp.world`` (ValueError otherwise: the target's own split needs the same)."""
    if fg.tp is not None:
        raise ValueError(f"shard_glide needs the whole draft layer, got rank {fg.tp.rank}'s slice")
    key = (tp.rank, tp.world, id(tp.group))
    sharded = fg.shards.get(key)
    if sharded is None:
        w = shard_weights(fg.w, fg.config, tp)
        if device is not None:
            w = {k: v.to(device) for k, v in w.items()}
        vmap = fg.vocab_map if fg.vocab_map is None or device is None else fg.vocab_map.to(device)
        sharded = fg.shards[key] = FastGlide(fg.config, w, fg.source, vocab_map=vmap, tp=tp)
    return sharded


def load_glide(path: str | os.PathLike, target, window: int | None = None, dtype=None) -> FastGlide:
    """Load a GLIDE draft for a fast ``target`` (HF-format dir or LongSpec ``.pth``); same formats as
    :func:`specdec.ref.load_glide`, a stored truncated draft vocabulary included (its lm_head rows sliced
    here, :meth:`FastGlide.lm_head_for`)."""
    from specdec.shared.assets import resolve_model_path

    fm = as_fast_model(target)
    if fm.tp is not None:   # the whole layer in host memory, only this rank's slice on its device (as load_model)
        g = load_glide_weights(resolve_model_path(path), fm.config, dtype=dtype or fm.dtype, device="cpu", window=window)
        return shard_glide(as_fast_glide(g), fm.tp, device=fm.device)
    g = load_glide_weights(resolve_model_path(path), fm.config, dtype=dtype or fm.dtype, device=fm.device, window=window)
    fg = as_fast_glide(g)
    fg.lm_head_for(fm)
    return fg
