"""The fast GLIDE drafter's prompt catch-up writes only draft K/V (``glide_kv_write``), and only the window.

The positions before a round's own catch-up matter to later queries only through their draft K/V, which
are projections of the tokens' normed embeddings. So ``FastGlideDrafter._catch_up_prefix`` writes exactly
the K/V :func:`~specdec.fast.glide.layer.glide_layer` would write for them, for the last ``window``
positions only, as :meth:`specdec.ref.glide.GlideDrafter._catch_up` does. CPU runs under the Triton
interpreter; ``-m gpu`` on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kernel_device
from lossless import tiny_model

import specdec.fast as fast
from specdec import ref
from specdec.fast.glide import FastGlideDrafter, as_fast_glide
from specdec.fast.glide.cache import SlidingCache
from specdec.fast.glide.layer import glide_kv_write, glide_layer
from specdec.fast.glide.packing import catch_up_glide_bounds, catch_up_segments, pack_ints, unpack_ints
from specdec.ref.glide import glide_kv
from specdec.shared.glide import init_glide_weights

DEV = kernel_device()


@pytest.fixture(scope="module")
def pair():
    m = tiny_model("llama", vocab=64, layers=1, hidden=128, heads=2, kv_heads=1, seed=0, init_std=0.3, max_pos=512)
    if DEV != "cpu":
        m.weights = {k: v.to(DEV) for k, v in m.weights.items()}
    glide = init_glide_weights(m.config, seed=1, std=0.3, window=8, device=DEV)
    return m, glide


def _layer_kv(fm, g, tokens: list[int], first: int):
    """K/V rows the whole layer writes for ``tokens`` at positions first.. into a fresh cache (base = first)."""
    cache = SlidingCache(g)
    cache.base = first
    flat, layout = pack_ints(catch_up_segments(tokens, first, cache.base, g.window))
    u = unpack_ints(torch.tensor(flat, dtype=torch.int32).to(DEV), layout)
    target_k = torch.zeros(1, fm.config.num_kv_heads, first + len(tokens), fm.config.head_dim, dtype=g.dtype, device=DEV)
    glide_layer(fm, g, cache, u["tokens"][None], u["pos"], u["rows"][None], target_k, target_k.clone(),
                catch_up_glide_bounds(u, cross_span=first + len(tokens)))
    return cache.k[:, :, : len(tokens)], cache.v[:, :, : len(tokens)]


@pytest.mark.parametrize("count", [1, 5])   # one row (the GEMV path on the GPU) and several
def test_glide_kv_write_equals_the_layers_kv(pair, count):
    m, glide = pair
    fm, g = fast.as_fast_model(m), as_fast_glide(glide)
    tokens, first = [int(t) for t in torch.randint(3, 64, (count,), generator=torch.Generator().manual_seed(count))], 40
    k_layer, v_layer = _layer_kv(fm, g, tokens, first)
    cache = SlidingCache(g)
    rows = torch.arange(count, dtype=torch.int32, device=DEV)[None]
    glide_kv_write(fm, g, cache, torch.tensor([tokens], device=DEV), torch.arange(first, first + count, device=DEV), rows)
    assert torch.equal(cache.k[:, :, :count], k_layer) and torch.equal(cache.v[:, :, :count], v_layer)
    # untouched rows stay zero (the write covers exactly `rows`)
    assert not cache.k[:, :, count:].any() and not cache.v[:, :, count:].any()
    # and they are the reference's K/V (up to the kernels' rounding)
    k_ref, v_ref = glide_kv(m, glide, torch.tensor([tokens], device=DEV), torch.arange(first, first + count, device=DEV))
    torch.testing.assert_close(cache.k[:, :, :count], k_ref.to(cache.k.dtype), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.v[:, :, :count], v_ref.to(cache.v.dtype), atol=1e-4, rtol=1e-4)


def test_prompt_catch_up_writes_only_the_window(pair):
    m, glide = pair
    fm, g = fast.as_fast_model(m), as_fast_glide(glide)
    d = FastGlideDrafter(fm, g, (2, 2))
    tokens = [int(t) for t in torch.randint(3, 64, (40,), generator=torch.Generator().manual_seed(7))]
    d._catch_up_prefix(tokens, 37)          # positions [0, 37): only [29, 37) can still be read
    assert (d.processed, d.cache.base, d.cache.n) == (37, 29, 8)
    k_ref, v_ref = glide_kv(m, glide, torch.tensor([tokens[29:37]], device=DEV), torch.arange(29, 37, device=DEV))
    torch.testing.assert_close(d.cache.k[:, :, :8], k_ref.to(d.cache.k.dtype), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.cache.v[:, :, :8], v_ref.to(d.cache.v.dtype), atol=1e-4, rtol=1e-4)
    # a later, contiguous catch-up appends after them
    d._catch_up_prefix(tokens, 39)
    assert (d.processed, d.cache.base, d.cache.n) == (39, 29, 10)
    # one that is already done writes nothing
    d._catch_up_prefix(tokens, 38)
    assert (d.processed, d.cache.n) == (39, 10)


@pytest.mark.parametrize("shape", [(2, 2, 1), (1, 1, 1)])
def test_long_prompt_tree_and_chain_equal_vanilla_and_ref(pair, shape):
    """A prompt of five windows: the fast GLIDE decoders == fast vanilla == the reference's tree, token for token."""
    m, glide = pair
    fm = fast.as_fast_model(m)
    prompt = torch.randint(3, 64, (1, 45), generator=torch.Generator().manual_seed(3)).to(DEV)
    van = fast.vanilla_generate(fm, prompt, prompt_length=45, max_gen_len=24, eos_id=[])
    got = fast.tree_spec_generate(fm, as_fast_glide(glide), prompt, prompt_length=45, tree_shape=shape, max_gen_len=24, eos_id=[])
    want = ref.tree_spec_generate(m, glide, prompt, prompt_length=45, tree_shape=shape, max_gen_len=24, eos_id=[])
    assert torch.equal(got.output_ids.cpu(), van.output_ids.cpu())
    assert torch.equal(got.output_ids.cpu(), want.output_ids.cpu())
