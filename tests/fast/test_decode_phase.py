"""The decode-phase contract of the fast target model (docs/design.md §8), end to end through
:func:`specdec.fast.model.step_forward`: a row's logits -- and the K/V it writes -- depend only on
its token, its position and the cache rows it may see, bit for bit, whatever M, the tree, the other
rows of the batch. So a tree node's verification logits equal the logits of one-token steps over its
ancestors and itself, and speculation cannot change a greedy output in any dtype.

CPU (CI): tiny models under the Triton interpreter in fp32 and bf16. GPU (``-m gpu``): random
Llama-3-8B- and Qwen2-7B-shaped models (2 layers, real head counts) at a 32k-token prefix.
"""

from __future__ import annotations

import pytest
import torch

from lossless import tiny_model
from specdec.fast.model import StaticKVCache, as_fast_model, prefill, step_forward
from test_decode_attention import random_tree, tree_mask_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _fast(family, dtype, device, seed=0, **kw):
    m = tiny_model(family, seed=seed, init_std=0.3, **kw)
    m.weights = {k: v.to(device=device, dtype=dtype) for k, v in m.weights.items()}
    return as_fast_model(m)


def _copy(cache: StaticKVCache) -> StaticKVCache:
    return StaticKVCache(cache.k.clone(), cache.v.clone(), cache.length, cache.length_t.clone())


def _verify(fm, cache, tokens, parents):
    """Logits [M, V] of a tree of ``tokens`` with ``parents`` on top of ``cache`` (not committed)."""
    dev = fm.device
    mask = tree_mask_of(parents).to(dev)
    depth = mask.sum(-1) - 1
    pos = (cache.length + depth)[None]
    return step_forward(fm, cache, torch.tensor([tokens], device=dev), pos, mask[None], cache.length_t)[0]


def _stepwise(fm, cache, tokens, parents, i):
    """Logits [V] of node i by one-token steps: its ancestors then itself, each committed."""
    c = _copy(cache)
    path = [j for j in range(i + 1) if tree_mask_of(parents)[i, j]]
    one = torch.ones(1, 1, 1, dtype=torch.bool, device=fm.device)
    for j in path:
        logits = step_forward(fm, c, torch.tensor([[tokens[j]]], device=fm.device),
                              torch.tensor([[c.length]], device=fm.device), one, c.length_t)[0, 0]
        c.set_length(c.length + 1)
    return logits, c


def _check_tree(fm, prompt, parents, tokens, nodes):
    cache = fm.ensure_cache(1, len(prompt) + len(parents) + 8, name="t")
    prefill(fm, cache, torch.tensor([prompt], device=fm.device))
    tree = _verify(fm, cache, tokens, parents)
    L = cache.length
    for i in nodes:
        logits, stepped = _stepwise(fm, cache, tokens, parents, i)
        assert torch.equal(tree[i], logits), f"node {i}: verification row != one-token step"
        # the K/V the steps wrote equal the verification's rows of the same tokens (moved into place)
        path = [j for j in range(i + 1) if tree_mask_of(parents)[i, j]]
        for depth, j in enumerate(path):
            assert torch.equal(stepped.k[:, :, :, L + depth], cache.k[:, :, :, L + j]), (i, j)
            assert torch.equal(stepped.v[:, :, :, L + depth], cache.v[:, :, :, L + j]), (i, j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tree_rows_equal_one_token_steps(family, dtype):
    fm = _fast(family, dtype, "cpu", vocab=64, layers=2, hidden=128, heads=4, kv_heads=2, max_pos=512)
    gen = torch.Generator().manual_seed(1)
    parents = random_tree(7, gen)
    tokens = torch.randint(0, 64, (7,), generator=gen).tolist()
    prompt = torch.randint(0, 64, (29,), generator=gen).tolist()   # the tree straddles a 32-key tile
    depths = tree_mask_of(parents).sum(-1) - 1
    deepest = int(depths.argmax())
    # the root, the deepest node (its path crosses the tile boundary) and the last node; every row of
    # the attention alone is checked in test_decode_attention.py
    _check_tree(fm, prompt, parents, tokens, nodes=sorted({0, deepest, 6}))


@pytest.mark.gpu
def test_gpu_tree_across_the_first_split_boundary():
    """A chain and a tree whose prefix ends just below the first 256-key attention split and whose nodes
    reach past it (the case that differed on the H100 until decode_attention lost FMA contraction, session
    23): every node's row == its one-token steps, bf16, the whole model. (GPU only: the interpreter never
    contracts, and on it this test took 60 s.)"""
    from specdec.fast.kernels.decode_attention import SPLIT_KEYS

    fm = _fast("llama", torch.bfloat16, "cuda", vocab=64, layers=2, hidden=128, heads=4, kv_heads=2, max_pos=512)
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 64, (SPLIT_KEYS - 4,), generator=gen).tolist()
    for parents in ([-1, 0, 1, 2, 3, 4, 5, 6], random_tree(8, gen)):
        tokens = torch.randint(0, 64, (8,), generator=gen).tolist()
        _check_tree(fm, prompt, parents, tokens, nodes=range(8))


def test_batch_rows_do_not_depend_on_each_other():
    fm = _fast("llama", torch.bfloat16, "cpu", vocab=64, layers=2, hidden=128, heads=4, kv_heads=2, max_pos=512)
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, 64, (3, 21), generator=gen)
    toks = torch.randint(0, 64, (3, 4), generator=gen)
    mask = torch.stack([tree_mask_of(random_tree(4, gen)) for _ in range(3)])
    cache = fm.ensure_cache(3, 40, name="b")
    prefill(fm, cache, prompts)
    pos = cache.length + mask.sum(-1) - 1
    both = step_forward(fm, cache, toks, pos, mask, cache.length_t)
    for bi in range(3):
        c1 = fm.ensure_cache(1, 40, name=f"b{bi}")
        prefill(fm, c1, prompts[bi:bi + 1])
        alone = step_forward(fm, c1, toks[bi:bi + 1], pos[bi:bi + 1], mask[bi:bi + 1], c1.length_t)
        assert torch.equal(alone, both[bi:bi + 1]), bi


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["llama3-8b", "qwen2-7b"])
def test_gpu_8b_shaped_tree_rows_equal_steps_at_32k(shape, dtype):
    """Random 2-layer models with Llama-3-8B / Qwen2-7B widths and head counts, a 32k-token prefix,
    a 69-node tree: every checked node's verification logits == its one-token step's, bitwise."""
    if shape == "llama3-8b":
        kw = dict(vocab=128256, hidden=4096, heads=32, kv_heads=8, intermediate=14336)
    else:
        kw = dict(vocab=152064, hidden=3584, heads=28, kv_heads=4, intermediate=18944)
    fm = _fast("llama" if shape == "llama3-8b" else "qwen2", dtype, "cuda", layers=2, max_pos=40000, **kw)
    gen = torch.Generator().manual_seed(3)
    parents = random_tree(69, gen)
    tokens = torch.randint(0, kw["vocab"], (69,), generator=gen).tolist()
    prompt = torch.randint(0, kw["vocab"], (32768 + 29,), generator=gen).tolist()
    _check_tree(fm, prompt, parents, tokens, nodes=[0, 3, 30, 68])


@pytest.mark.gpu
def test_gpu_rows_alone_in_batch_of_8_and_any_m():
    fm = _fast("llama", torch.bfloat16, "cuda", vocab=32000, layers=2, hidden=2048, heads=16, kv_heads=4,
               intermediate=5632, max_pos=4096)
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, 32000, (8, 1500), generator=gen).cuda()
    toks = torch.randint(0, 32000, (8, 128), generator=gen).cuda()
    chain = torch.ones(128, 128, dtype=torch.bool).tril().cuda()
    cache = fm.ensure_cache(8, 1700, name="b8")
    prefill(fm, cache, prompts)
    pos = cache.length + torch.arange(128, device="cuda")[None].expand(8, 128)
    full = step_forward(fm, cache, toks, pos, chain[None].expand(8, 128, 128).contiguous(), cache.length_t)
    for m in (1, 5, 69, 128):
        c1 = fm.ensure_cache(1, 1700, name="one")
        prefill(fm, c1, prompts[3:4])
        got = step_forward(fm, c1, toks[3:4, :m], pos[3:4, :m], chain[None, :m, :m].contiguous(), c1.length_t)
        assert torch.equal(got[0], full[3, :m]), m


@pytest.mark.parametrize("hidden,heads", [(96, 2), (320, 2)])   # head dims 48 and 160
def test_head_dims_beyond_the_classic_four_match_ref(hidden, heads):
    """Any head dim that is a multiple of 16 up to 256 runs on the fast path, token-identical to ref."""
    import specdec.fast as fast
    import specdec.ref as ref

    m = tiny_model("llama", vocab=64, layers=1, hidden=hidden, heads=heads, kv_heads=1, seed=3, init_std=0.3, max_pos=256)
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=6, eos_id=[])
    want = ref.vanilla_generate(m, **kw).output_ids
    assert torch.equal(fast.vanilla_generate(m, **kw).output_ids, want)
    assert torch.equal(fast.pld_generate(m, num_pred_tokens=3, **kw).output_ids, want)


def test_head_dim_outside_the_supported_set_is_one_clear_error():
    m = tiny_model("llama", vocab=64, layers=1, hidden=80, heads=2, kv_heads=1, seed=3, max_pos=64)   # head dim 40
    with pytest.raises(ValueError, match="multiples of 16 in \\[16, 256\\].*head_dim=40"):
        as_fast_model(m)


def test_cache_memory_check_names_the_largest_batch_that_fits():
    from specdec.fast.model import check_cache_fits

    check_cache_fits(need=8 << 30, batch=8, capacity=4096, free=10 << 30)          # fits: no error
    with pytest.raises(ValueError, match="largest batch that fits at this length is 11"):
        check_cache_fits(need=32 << 30, batch=32, capacity=4096, free=13 << 30)    # 1 GiB a row, 11.7 GiB usable
    with pytest.raises(ValueError, match="not even one row fits"):
        check_cache_fits(need=4 << 30, batch=1, capacity=131072, free=2 << 30)


@pytest.mark.gpu
def test_gpu_memory_check_counts_blocks_the_allocator_holds_free():
    """A freed tensor stays reserved by PyTorch's caching allocator, which ``mem_get_info`` reports as used; the
    cache's memory check counts it as free (a bench that cleared a 64 GiB batch was once told only 15 rows fit)."""
    from specdec.fast.model import free_gpu_bytes

    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    before = free_gpu_bytes(dev)
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)     # 1 GiB
    assert free_gpu_bytes(dev) <= before - (1 << 30) + (64 << 20)
    del x                                                          # back to the allocator, not to the driver
    driver_free, _ = torch.cuda.mem_get_info(dev)
    assert free_gpu_bytes(dev) >= driver_free + (1 << 30)
    assert free_gpu_bytes(dev) >= before - (64 << 20)


@pytest.mark.gpu
def test_gpu_a_row_never_depends_on_its_batch_mates_prefill_included():
    """The embedded default model in bf16, a batch with prompts of EQUAL lengths and of other lengths (vanilla
    decodes all of them in one batch): every row of batched vanilla == that prompt decoded alone, and
    batched tree speculation and MagicDec == batched vanilla, bitwise. Equal-length rows once shared one
    prefill whose GEMMs rounded differently from a lone prompt's (BENCHMARKS "batched decoding": B = 32)."""
    import specdec.fast as fast

    target = fast.load_model("default", dtype=torch.bfloat16, device="cuda")
    glide = fast.load_glide("default-glide", target)
    gen = torch.Generator().manual_seed(5)
    lengths = [700, 700, 700, 131, 1024, 1024, 1024, 1024, 9]
    prompts = [torch.randint(0, target.config.vocab_size, (n,), generator=gen) for n in lengths]
    kw = dict(max_gen_len=48, eos_id=[])
    batch = fast.vanilla_generate(target, prompts, None, **kw).output_ids
    for i, p in enumerate(prompts):
        alone = fast.vanilla_generate(target, p[None], len(p), **kw).output_ids[0]
        assert torch.equal(batch[i], alone), f"row {i} (length {lengths[i]}) != the prompt alone"
    assert torch.equal(fast.tree_spec_generate(target, glide, prompts, None, **kw).output_ids, batch)
    assert torch.equal(fast.magicdec_generate(target, prompts, None, **kw).output_ids, batch)
