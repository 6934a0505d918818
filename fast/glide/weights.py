"""The GLIDE draft layer's weights on the fast path: :class:`FastGlide` (fused once), :func:`as_fast_glide`
(from a :class:`specdec.shared.glide.Glide`) and :func:`load_glide` (from disk, for a fast target).

The fusion: ``wqkv``/``bqkv`` for the self-attention's q|k|v projection, ``w13`` for the MLP's
gate|up projection; the cross-attention keeps its own query and output projections (its keys and
values are the target's last-layer cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from specdec.fast.model import as_fast_model
from specdec.shared.glide import Glide, GlideConfig, glide_summary, load_glide_weights
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
    runtime: GlideRuntime | None = field(default=None, repr=False, compare=False)
    """What the fast drafter keeps across generate calls on these weights -- the sliding cache and the
    captured CUDA graphs of its rounds (:class:`~specdec.fast.glide.state.GlideRuntime`), so a second
    call replays the first call's graphs. None until the first
    :class:`~specdec.fast.glide.drafter.FastGlideDrafter` on it."""

    @property
    def window(self) -> int:
        return self.config.window

    @property
    def device(self) -> torch.device:
        return self.w["wqkv"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.w["wqkv"].dtype

    def __repr__(self) -> str:  # one line: never print tensors
        return one_line_repr(self, "FastGlide", glide_summary(self.config))


def as_fast_glide(glide) -> FastGlide:
    """Fuse a :class:`~specdec.shared.glide.Glide`'s weights (a FastGlide passes through)."""
    if isinstance(glide, FastGlide):
        return glide
    if not isinstance(glide, Glide):
        raise TypeError(f"expected a GLIDE draft (specdec load_glide), got {type(glide).__name__}")
    cached = glide.extras.get("fast_glide")  # converted once per weights dict (keeps its graphs across calls)
    if cached is not None and cached[0] is glide.weights:
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
    fg = FastGlide(glide.config, fw, glide.source)
    glide.extras["fast_glide"] = (glide.weights, fg)
    return fg


def load_glide(path: str | os.PathLike, target, window: int | None = None, dtype=None) -> FastGlide:
    """Load a GLIDE draft for a fast ``target`` (HF-format dir or LongSpec ``.pth``); same formats as
    :func:`specdec.ref.load_glide`."""
    from specdec.shared.assets import resolve_model_path

    fm = as_fast_model(target)
    g = load_glide_weights(resolve_model_path(path), fm.config, dtype=dtype or fm.dtype, device=fm.device, window=window)
    return as_fast_glide(g)
