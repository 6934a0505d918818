"""The GLIDE draft layer's weights on the fast path: :class:`FastGlide` (fused once), :func:`as_fast_glide`
(from a :class:`specdec.shared.glide.Glide`) and :func:`load_glide` (from disk, for a fast target).

The fusion: ``wqkv``/``bqkv`` for the self-attention's q|k|v projection, ``w13`` for the MLP's
gate|up projection; the cross-attention keeps its own query and output projections (its keys and
values are the target's last-layer cache).

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
from specdec.shared.glide import Glide, GlideConfig, draft_vocab_size, glide_summary, load_glide_weights
from specdec.shared.weights import one_line_repr

if TYPE_CHECKING:
    from specdec.fast.glide.state import GlideRuntime

__all__ = ["FastGlide", "as_fast_glide", "load_glide"]


@dataclass
class FastGlide:
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
        :func:`specdec.ref.glide.draft_lm_head`."""
        lm_head = fm.w["lm_head"]
        if self.vocab_map is None:
            return lm_head
        entry = self.sliced_heads.get(id(lm_head))
        if entry is None or entry[0] is not lm_head:
            entry = self.sliced_heads[id(lm_head)] = (lm_head, lm_head[self.vocab_map.to(lm_head.device)].contiguous())
        return entry[1]

    def __repr__(self) -> str:  # one line: never print tensors
        return one_line_repr(self, "FastGlide", glide_summary(self.config, self.vocab_map))


def as_fast_glide(glide) -> FastGlide:
    """Fuse a :class:`~specdec.shared.glide.Glide`'s weights (a FastGlide passes through)."""
    if isinstance(glide, FastGlide):
        return glide
    if not isinstance(glide, Glide):
        raise TypeError(f"expected a GLIDE draft (specdec load_glide), got {type(glide).__name__}")
    cached = glide.extras.get("fast_glide")  # converted once per weights dict (keeps its graphs across calls)
    if cached is not None and cached[0] is glide.weights and cached[1].vocab_map is glide.vocab_map:
        return cached[1]
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
    return fg


def load_glide(path: str | os.PathLike, target, window: int | None = None, dtype=None) -> FastGlide:
    """Load a GLIDE draft for a fast ``target`` (HF-format dir or LongSpec ``.pth``); same formats as
    :func:`specdec.ref.load_glide`, a stored truncated draft vocabulary included (its lm_head rows sliced
    here, :meth:`FastGlide.lm_head_for`)."""
    from specdec.shared.assets import resolve_model_path

    fm = as_fast_model(target)
    g = load_glide_weights(resolve_model_path(path), fm.config, dtype=dtype or fm.dtype, device=fm.device, window=window)
    fg = as_fast_glide(g)
    fg.lm_head_for(fm)
    return fg
