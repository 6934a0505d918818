"""Reference attention (ref/attention.py): masked attention, and tree attention written twice.

(a) ``tree_attention_full`` (one softmax, full mask) and (b) ``tree_attention_merged`` (prefix and
tree parts merged by LSE) must agree with each other and with a brute-force loop, on random trees,
GQA ratios 1/2/4 and ragged ``prefix_len``.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import make_hf_model
from specdec.ref import forward, forward_step, masked_attention, tree_attention, tree_attention_full, tree_attention_merged
from specdec.ref.attention import attention_with_lse, fused_masked_attention, merge_attention
from specdec.ref.model import new_cache
from specdec.shared.tree import Tree
from specdec.shared.weights import model_from_hf


def random_tree(m: int, rng: random.Random) -> Tree:
    return Tree.from_parents([-1] + [rng.randrange(i) for i in range(1, m)])


def make_inputs(b, hq, hkv, m, d, plens, n_extra=3, seed=0, dtype=torch.float32):
    """Random q/k/v and one random tree per batch row; k/v have N = max(plen) + M + n_extra rows."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n = max(plens) + m + n_extra
    q = torch.randn(b, hq, m, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    mask = torch.stack([random_tree(m, rng).ancestor_mask() for _ in range(b)])
    return q, k, v, mask


def brute_force(q, k, v, plens, tree_mask, sm_scale=None) -> torch.Tensor:
    """Loop over (batch, head, node): softmax over the visible keys, in float64."""
    b, hq, m, d = q.shape
    hkv = k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros(b, hq, m, d, dtype=torch.float64)
    for bi in range(b):
        p = int(plens[bi])
        for h in range(hq):
            kv_h = h // (hq // hkv)
            for i in range(m):
                cols = list(range(p)) + [p + j for j in range(m) if tree_mask[bi, i, j]]
                if not cols:
                    continue
                kk = k[bi, kv_h, cols].double()
                vv = v[bi, kv_h, cols].double()
                w = torch.softmax(kk @ q[bi, h, i].double() * scale, dim=0)
                out[bi, h, i] = w @ vv
    return out


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("ragged", [False, True])
def test_tree_attention_formulations_agree(hq, hkv, ragged):
    for seed in range(3):
        rng = random.Random(100 + seed)
        b, m, d = 3, rng.randint(1, 12), 16
        plens = [rng.randint(0, 20) for _ in range(b)] if ragged else [rng.randint(0, 20)] * b
        q, k, v, mask = make_inputs(b, hq, hkv, m, d, plens, seed=seed)
        prefix_len = torch.tensor(plens) if ragged else plens[0]
        a = tree_attention_full(q, k, v, prefix_len, mask)
        bb = tree_attention_merged(q, k, v, prefix_len, mask)
        ref = brute_force(q, k, v, plens, mask)
        assert a.shape == q.shape and bb.shape == q.shape
        assert torch.allclose(a.double(), ref, atol=1e-5)
        assert torch.allclose(bb.double(), ref, atol=1e-5)
        assert torch.allclose(a, bb, atol=1e-5)
        assert torch.equal(tree_attention(q, k, v, prefix_len, mask), bb)


def test_prefix_len_int_equals_uniform_tensor():
    q, k, v, mask = make_inputs(2, 4, 2, 5, 8, [6, 6])
    assert torch.allclose(tree_attention(q, k, v, 6, mask), tree_attention(q, k, v, torch.tensor([6, 6]), mask))


def test_rows_outside_prefix_and_tree_are_ignored():
    """Garbage in k/v rows after prefix_len + M (and NaN there) does not leak into the output."""
    plens = [3, 7]
    q, k, v, mask = make_inputs(2, 4, 2, 4, 8, plens, n_extra=5)
    out = tree_attention(q, k, v, torch.tensor(plens), mask)
    k2, v2 = k.clone(), v.clone()
    for bi, p in enumerate(plens):
        k2[bi, :, p + 4:] = 1e4
        v2[bi, :, p + 4:] = float("nan")
    assert torch.allclose(tree_attention(q, k2, v2, torch.tensor(plens), mask), out)
    assert torch.allclose(tree_attention_full(q, k2, v2, torch.tensor(plens), mask), out, atol=1e-5)


def test_custom_sm_scale():
    q, k, v, mask = make_inputs(1, 2, 1, 6, 8, [4])
    ref = brute_force(q, k, v, [4], mask, sm_scale=0.3)
    assert torch.allclose(tree_attention_full(q, k, v, 4, mask, sm_scale=0.3).double(), ref, atol=1e-5)
    assert torch.allclose(tree_attention_merged(q, k, v, 4, mask, sm_scale=0.3).double(), ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    plens = [5, 9]
    q, k, v, mask = make_inputs(2, 4, 2, 7, 16, plens, dtype=dtype)
    ref = brute_force(q, k, v, plens, mask)
    for fn in (tree_attention_full, tree_attention_merged):
        out = fn(q, k, v, torch.tensor(plens), mask)
        assert out.dtype == dtype
        assert torch.allclose(out.double(), ref, atol=2e-2)


def test_fully_masked_rows_give_zeros_not_nan():
    # prefix_len 0 and a node whose tree row is empty: nothing to attend to
    q, k, v, _ = make_inputs(1, 2, 2, 3, 8, [0])
    mask = torch.tensor([[[True, False, False], [False, False, False], [True, False, True]]])
    for fn in (tree_attention_full, tree_attention_merged):
        out = fn(q, k, v, 0, mask)
        assert not torch.isnan(out).any()
        assert torch.equal(out[0, :, 1], torch.zeros(2, 8))
    assert torch.allclose(tree_attention_full(q, k, v, 0, mask), tree_attention_merged(q, k, v, 0, mask), atol=1e-6)
    # everything masked
    none = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert torch.equal(tree_attention(q, k, v, 0, none), torch.zeros_like(q))
    # empty tree rows but a prefix: the node sees only the prefix
    q, k, v, _ = make_inputs(1, 2, 1, 2, 8, [4])
    only_prefix = torch.zeros(1, 2, 2, dtype=torch.bool)
    out = tree_attention(q, k, v, 4, only_prefix)
    assert torch.allclose(out.double(), brute_force(q, k, v, [4], only_prefix), atol=1e-5)


def test_attention_with_lse_and_merge_edge_cases():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out, lse = attention_with_lse(q, k, v, mask)
    assert torch.isneginf(lse[0, :, 1]).all() and torch.equal(out[0, :, 1], torch.zeros(2, 4))
    assert torch.isfinite(lse[0, :, 0]).all()
    # lse is the natural-log LSE of the scaled scores
    scores = torch.einsum("hd,sd->hs", q[0, :, 0], k[0, 0]) / 2.0
    assert torch.allclose(lse[0, :, 0], torch.logsumexp(scores, -1), atol=1e-5)
    # merging with an empty side returns the other side exactly; two empty sides give zeros
    o, l2 = merge_attention(out, lse, torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    assert torch.allclose(o, out) and torch.equal(torch.isneginf(l2), torch.isneginf(lse))
    o, _ = merge_attention(out[:, :, 1:2], lse[:, :, 1:2], out[:, :, 1:2], lse[:, :, 1:2])
    assert not torch.isnan(o).any() and torch.equal(o, torch.zeros_like(o))


def test_merge_of_split_keys_is_exact():
    """Attention over keys split anywhere and merged by LSE equals attention over all keys."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    cols = torch.arange(10)
    full, lse = attention_with_lse(q, k, v, torch.ones(3, 10, dtype=torch.bool))
    for split in (1, 4, 9):
        o1, l1 = attention_with_lse(q, k, v, (cols < split).expand(3, 10))
        o2, l2 = attention_with_lse(q, k, v, (cols >= split).expand(3, 10))
        o, l12 = merge_attention(o1, l1, o2, l2)
        assert torch.allclose(o, full, atol=1e-6) and torch.allclose(l12, lse, atol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
def test_masked_attention_matches_sdpa(hq, hkv):
    g = torch.Generator().manual_seed(hq + hkv)
    q, k, v = torch.randn(2, hq, 5, 8, generator=g), torch.randn(2, hkv, 9, 8, generator=g), torch.randn(2, hkv, 9, 8, generator=g)
    mask = torch.rand(2, 5, 9, generator=g) > 0.4
    mask[..., 0] = True  # no empty rows (SDPA would give NaN there)
    kr, vr = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask[:, None])
    assert torch.allclose(masked_attention(q, k, v, mask), expected, atol=1e-5)
    # a [T, S] mask broadcasts over the batch
    assert torch.allclose(masked_attention(q, k, v, mask[0]), masked_attention(q, k, v, mask[0].expand(2, 5, 9)))


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("kind", ["causal", "ragged", "random"])
def test_fused_masked_attention_is_masked_attention(hq, hkv, kind):
    """The prefill's fused evaluation computes the written-out function: causal masks (the kernel's own
    causal mode), a ragged batch's causal-and-real mask, and arbitrary masks with rows that see no key
    (zeros, as masked_attention) -- with inf/NaN poison in keys no row may see."""
    g = torch.Generator().manual_seed(hq * 7 + hkv)
    t = 12
    q, k, v = (torch.randn(3, h, t, 16, generator=g) for h in (hq, hkv, hkv))
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if kind == "causal":
        mask = causal.expand(3, t, t)
    elif kind == "ragged":
        real = torch.arange(t)[None, :] < torch.tensor([12, 7, 1])[:, None]
        mask = causal[None] & real[:, None, :]
    else:
        mask = torch.rand(3, t, t, generator=g) > 0.5
        mask[1, 4] = False                                   # a row that sees nothing
        mask[:, :, 9] = False                                # a key no row sees: poison it
        k[:, :, 9] = float("nan")
        v[:, :, 9] = float("inf")
    want = masked_attention(q, k, v, mask)
    got = fused_masked_attention(q, k, v, mask)
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5)
    if kind == "random":
        assert torch.equal(got[1, :, 4], torch.zeros_like(got[1, :, 4]))
    # a [T, S] mask broadcasts; 16-bit inputs come back in their dtype
    assert torch.allclose(fused_masked_attention(q, k, v, mask[0]), masked_attention(q, k, v, mask[0]), atol=1e-5)
    got16 = fused_masked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got16.dtype == torch.bfloat16 and torch.allclose(got16.float(), masked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).float(), atol=2e-2)


def test_prefill_uses_the_fused_attention_and_decode_passes_do_not(monkeypatch):
    """The rule of fused_masked_attention's docstring: the ref prefill (and a draft model's catch-up) take
    it, every decode-phase pass -- steps, verifications -- takes the written-out masked_attention."""
    import specdec.ref.model as ref_model
    from specdec.ref import vanilla_generate

    calls = []
    real_fused, real_plain = ref_model.fused_masked_attention, ref_model.masked_attention
    monkeypatch.setattr(ref_model, "fused_masked_attention", lambda q, *a: calls.append(("fused", q.shape[2])) or real_fused(q, *a))
    monkeypatch.setattr(ref_model, "masked_attention", lambda q, *a: calls.append(("plain", q.shape[2])) or real_plain(q, *a))
    model = model_from_hf(make_hf_model("llama", seed=3, vocab=64, kv_heads=1))
    layers = model.config.num_layers
    vanilla_generate(model, torch.tensor([[3, 4, 5, 6, 7]]), 5, max_gen_len=3, eos_id=[])
    assert calls == [("fused", 5)] * layers + [("plain", 1)] * (2 * layers)


def test_draft_model_passes_take_the_fused_attention_and_verifications_do_not(monkeypatch):
    """A draft model's passes (its catch-up and its draft steps) and MagicDec's draft steps are proposals:
    they take fused_masked_attention; the target's verification of their drafts takes masked_attention."""
    import specdec.ref.model as ref_model
    from specdec.ref import magicdec_generate, speculative_generate

    calls = []
    real_fused, real_plain = ref_model.fused_masked_attention, ref_model.masked_attention
    monkeypatch.setattr(ref_model, "fused_masked_attention", lambda q, *a: calls.append(("fused", q.shape[2])) or real_fused(q, *a))
    monkeypatch.setattr(ref_model, "masked_attention", lambda q, *a: calls.append(("plain", q.shape[2])) or real_plain(q, *a))
    target = model_from_hf(make_hf_model("llama", seed=3, vocab=64, kv_heads=1))
    draft = model_from_hf(make_hf_model("llama", seed=4, vocab=64, kv_heads=1))
    layers = target.config.num_layers
    prompt = torch.tensor([[3, 4, 5, 6, 7]])
    speculative_generate(target, draft, prompt, 5, gamma=3, max_gen_len=8, eos_id=[])
    # target prefill (5 rows); the draft's own prefill over the prompt (5); in the first round its catch-up
    # (the root, 1) and two draft steps (the third draft needs no forward), all fused; then the target
    # verifies root + 3 drafts, written out
    assert calls[: 5 * layers] == [("fused", 5)] * (2 * layers) + [("fused", 1)] * (3 * layers)
    assert calls[5 * layers : 6 * layers] == [("plain", 4)] * layers
    calls.clear()
    magicdec_generate(target, prompt, 5, gamma=2, sink_tokens=1, window=2, max_gen_len=8, eos_id=[])
    # target prefill; the two draft steps over the compressed cache; the verification of root + 2 drafts
    assert calls[: 4 * layers] == [("fused", 5)] * layers + [("fused", 1)] * (2 * layers) + [("plain", 3)] * layers


# ---------------------------------------------------------------------------------------------
# Tree verification through the model: every node's logits equal its root-to-node path run causally
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_model_tree_step_equals_path_runs(family):
    model = model_from_hf(make_hf_model(family, seed=2, vocab=64, kv_heads=1))
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 64, (1, 6), generator=g)
    tree = random_tree(9, rng)
    tokens = torch.randint(0, 64, (1, tree.size), generator=g)
    cache = new_cache(model, 1)
    forward_step(model, prefix, cache)
    p = prefix.shape[1]
    mask = torch.cat([torch.ones(tree.size, p, dtype=torch.bool), tree.ancestor_mask()], dim=1)
    logits = forward_step(model, tokens, cache, positions=tree.positions(p), mask=mask)
    for i in range(tree.size):
        path_tokens = tokens[:, tree.path(i)]
        expected = forward(model, torch.cat([prefix, path_tokens], dim=1))[:, -1]
        assert torch.allclose(logits[:, i], expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------


def _good():
    return make_inputs(2, 4, 2, 3, 8, [4, 4], n_extra=0)


@pytest.mark.parametrize(
    "mutate,err,match",
    [
        (lambda q, k, v, pl, m: (q[0], k, v, pl, m), ValueError, "q must have 4 dims"),
        (lambda q, k, v, pl, m: (q, k[:, :, :, :4], v, pl, m), ValueError, "k and v must have the same shape"),
        (lambda q, k, v, pl, m: (q, k[..., :4], v[..., :4], pl, m), ValueError, "does not match q"),
        (lambda q, k, v, pl, m: (q, k[:1], v[:1], pl, m), ValueError, "does not match q"),
        (lambda q, k, v, pl, m: (q[:, :3], k, v, pl, m), ValueError, "must be a multiple of Hkv"),
        (lambda q, k, v, pl, m: (q, k, v, pl, m.float()), TypeError, "tree_mask must be a bool tensor"),
        (lambda q, k, v, pl, m: (q, k, v, pl, m[:, :2]), ValueError, "tree_mask must have shape"),
        (lambda q, k, v, pl, m: (q, k, v, torch.tensor([4]), m), ValueError, r"prefix_len tensor must have shape \[B\]"),
        (lambda q, k, v, pl, m: (q, k, v, torch.tensor([4.0, 4.0]), m), TypeError, "prefix_len tensor must hold integers"),
        (lambda q, k, v, pl, m: (q, k, v, 4.0, m), TypeError, "prefix_len must be an int"),
        (lambda q, k, v, pl, m: (q, k, v, 5, m), ValueError, r"prefix_len must be in \[0, N - M\]"),
        (lambda q, k, v, pl, m: (q, k, v, torch.tensor([4, 5]), m), ValueError, r"prefix_len must be in \[0, N - M\]"),
        (lambda q, k, v, pl, m: (q, k, v, -1, m), ValueError, r"prefix_len must be in \[0, N - M\]"),
        (lambda q, k, v, pl, m: (q, k.numpy(), v, pl, m), TypeError, "k must be a torch.Tensor"),
    ],
)
def test_bad_args(mutate, err, match):
    q, k, v, mask = _good()
    args = mutate(q, k, v, 4, mask)
    for fn in (tree_attention, tree_attention_full, tree_attention_merged):
        with pytest.raises(err, match=match):
            fn(*args)
