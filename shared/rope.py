"""Rotary position embeddings with every scaling type we support (one source of truth).

``rope_cos_sin(config, positions)`` returns cos/sin tables ``[..., head_dim]`` for integer
positions; :func:`apply_rope` rotates q or k with them (the "rotate half" convention that
Llama and Qwen2 checkpoints in Hugging Face format use).

Scaling types (``config.rope_scaling['rope_type']``):

* ``default``  -- inv_freq = 1 / theta^(2i/d)
* ``linear``   -- inv_freq / factor
* ``dynamic``  -- NTK-aware: theta grows with the current sequence length when it exceeds
  ``max_position_embeddings``; the length is ``max(positions) + 1`` of the call (as in transformers)
* ``llama3``   -- Llama 3.1 frequency-dependent smoothing between 1 and 1/factor
* ``yarn``     -- NTK-by-parts interpolation plus an attention scaling (mscale) on cos/sin
"""

from __future__ import annotations

import math

import torch

from specdec.shared.config import ModelConfig

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope"]


def rope_inv_freq(config: ModelConfig, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim / 2] (fp32) and the attention scaling applied to cos/sin."""
    dim = config.head_dim
    base = config.rope_theta
    sc = config.rope_scaling or {}
    rt = config.rope_type
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    if rt == "dynamic":
        # NTK-aware: stretch theta once the sequence outgrows the trained context.
        max_pos = config.max_position_embeddings
        factor = float(sc["factor"])
        n = max(int(seq_len or max_pos), max_pos)
        base = base * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exponents)
    scale = 1.0
    if rt == "linear":
        inv_freq = inv_freq / float(sc["factor"])
    elif rt == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = float(sc["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are interpolated by `factor`, short ones kept, the middle band smoothed
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rt == "yarn":
        factor = sc.get("factor")
        orig = float(sc["original_max_position_embeddings"])
        if factor is None:
            factor = config.max_position_embeddings / orig
        factor = float(factor)

        def get_mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        attn_factor = sc.get("attention_factor")
        if attn_factor is None:
            ms, ms_all = sc.get("mscale"), sc.get("mscale_all_dim")
            attn_factor = get_mscale(factor, ms) / get_mscale(factor, ms_all) if (ms and ms_all) else get_mscale(factor)
        beta_fast = sc.get("beta_fast") or 32
        beta_slow = sc.get("beta_slow") or 1

        def correction_dim(num_rot: float) -> float:
            return (dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(config.rope_theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        pos_freqs = config.rope_theta ** exponents
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        scale = float(attn_factor)
    return inv_freq, scale


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``positions.shape + [head_dim]`` for integer ``positions``."""
    seq_len = int(positions.max()) + 1 if positions.numel() else 1
    inv_freq, scale = rope_inv_freq(config, seq_len=seq_len, device=positions.device)
    angles = positions.float()[..., None] * inv_freq  # [..., d/2]
    emb = torch.cat([angles, angles], dim=-1)  # [..., d]
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by cos/sin [B, T, D] (or [T, D]): x * cos + rotate_half(x) * sin."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
