"""``round_pack`` (the integers of a device-driven GLIDE round, built on the device) against the host's
``FastGlideDrafter._pack`` for the same cache length, window base and budget.

A device-driven round catches up on the last ``levels + 1`` positions; its pack must be exactly the
host pack of a round with that catch-up length, for any length, base (window shifts) and budget (the
last rounds accept fewer levels). CPU runs under the Triton interpreter; ``-m gpu`` on CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import kernel_device
from lossless import tiny_model

import specdec.fast as fast
from specdec.fast import kernels as K
from specdec.fast.glide import FastGlideDrafter, as_fast_glide
from specdec.shared.glide import init_glide_weights

DEV = kernel_device()


@pytest.fixture(scope="module")
def drafter_factory():
    m = tiny_model("llama", vocab=64, layers=1, hidden=128, heads=2, kv_heads=1, seed=0, init_std=0.3, max_pos=4096)
    if DEV != "cpu":
        m.weights = {k: v.to(DEV) for k, v in m.weights.items()}
    fm = fast.as_fast_model(m)

    def make(shape, window):
        g = as_fast_glide(init_glide_weights(m.config, seed=1, std=0.3, window=window, device=DEV))
        return FastGlideDrafter(fm, g, shape)

    return make


@pytest.mark.parametrize("shape,window", [((4, 16, 16, 16, 16), 512), ((2, 3, 3), 16), ((1,), 8), ((3, 1, 4), 64)])
def test_round_pack_equals_host_pack(drafter_factory, shape, window):
    d = drafter_factory(shape, window)
    levels, k = len(shape), len(shape) + 1
    fields, layout = d._ahead_recipe(shape)
    recipe = torch.tensor(fields, dtype=torch.int32, device=DEV)
    rng = random.Random(sum(shape) * 7 + window)
    cases = [(k - 1, 0, k + 40), (window + 3, 4, window + 5)]  # the shortest sequence; a budget ending soon
    for _ in range(12):
        L = rng.randrange(k - 1, 3 * window + 50)
        base = rng.randrange(0, L + 2 - k + 1)
        cases.append((L, base, L + rng.randrange(-2, 3 * levels)))
    for L, base, end in cases:
        tokens = [rng.randrange(64) for _ in range(L + 1)]
        seq = torch.full((L + 20,), -7, dtype=torch.int32)
        seq[: L + 1] = torch.tensor(tokens, dtype=torch.int32)
        seq = seq.to(DEV)
        length_t = torch.tensor([L], dtype=torch.int32, device=DEV)
        ctl = torch.tensor([base, end, 0, 0], dtype=torch.int32, device=DEV)
        out = torch.full((recipe.shape[1],), 99, dtype=torch.int32, device=DEV)
        K.round_pack(recipe, seq, length_t, ctl, out)
        d.cache.base = base
        flat, want_layout = d._pack(tokens, L, k, tuple(shape), depth_limit=min(levels, max(end - L - 1, 0)))
        assert want_layout == layout
        assert out.tolist() == flat, (L, base, end)
        assert K.round_pack_ref(recipe.cpu(), seq.cpu(), length_t.cpu(), ctl.cpu()).tolist() == flat


def test_round_pack_bad_input():
    recipe = torch.zeros(5, 8, dtype=torch.int32, device=DEV)
    seq = torch.zeros(16, dtype=torch.int32, device=DEV)
    length_t = torch.zeros(1, dtype=torch.int32, device=DEV)
    ctl = torch.zeros(2, dtype=torch.int32, device=DEV)
    out = torch.zeros(8, dtype=torch.int32, device=DEV)
    with pytest.raises(TypeError, match="recipe"):
        K.round_pack(recipe.long(), seq, length_t, ctl, out)
    with pytest.raises(ValueError, match=r"\[5, N\]"):
        K.round_pack(recipe[:4], seq, length_t, ctl, out)
    with pytest.raises(ValueError, match="out"):
        K.round_pack(recipe, seq, length_t, ctl, out[:7])
    with pytest.raises(ValueError, match="ctl"):
        K.round_pack(recipe, seq, length_t, ctl[:1], out)
