"""GLIDE (LongSpec) in the reference path: beam rule, draft layer, window cache, checkpoints, decoding."""

from __future__ import annotations

import os

import pytest
import torch
from lossless import glide_sampling_pvalue, tiny_model

from specdec.ref.engine import RoundState, run_speculative
from specdec.ref.glide import (
    GlideDrafter,
    glide_full_forward,
    glide_kv,
    glide_layer,
    glide_logits,
    load_glide,
    spec_generate,
    tree_spec_generate,
    window_mask,
)
from specdec.ref.model import forward_step, new_cache
from specdec.ref.vanilla import vanilla_generate
from specdec.shared.glide import Glide, GlideConfig, beam_level, glide_expected_shapes, init_glide_weights, load_glide_weights, save_glide


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _pair(family: str, seed: int, vocab: int = 16, window: int = 8, std: float = 0.5):
    target = tiny_model(family, vocab=vocab, seed=seed)
    glide = init_glide_weights(target.config, window=window, seed=seed + 100, std=std)
    return target, glide


def _prompt(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The beam rule
# ---------------------------------------------------------------------------------------------


def test_beam_level_hand_checked_two_levels():
    # Level 1 at the root: log-probs over V = 4 tokens.
    root = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    parent, tok, cum = beam_level(torch.zeros(1), root, 2)
    assert parent.tolist() == [0, 0] and tok.tolist() == [1, 2]
    assert torch.allclose(cum, torch.log(torch.tensor([0.5, 0.3])))
    # Level 2: node 0 (p=.5) is sure of token 3; node 1 (p=.3) splits evenly over 0 and 1.
    lp = torch.log(torch.tensor([[0.05, 0.05, 0.1, 0.8], [0.5, 0.5, 1e-9, 1e-9]]))
    parent, tok, cum = beam_level(cum, lp, 3)
    # Pair scores: (0,3) .40, (1,0) .15, (1,1) .15 (tie: lower flat index first), (0,2) .05, ...
    assert parent.tolist() == [0, 1, 1] and tok.tolist() == [3, 0, 1]
    assert torch.allclose(cum.exp(), torch.tensor([0.40, 0.15, 0.15]), atol=1e-6)
    # A beam, not top-k per node: node 0's second-best child (.05) loses to node 1's children.
    parent, tok, _ = beam_level(torch.log(torch.tensor([0.5, 0.3])), lp, 4)
    assert list(zip(parent.tolist(), tok.tolist())) == [(0, 3), (1, 0), (1, 1), (0, 2)]


@pytest.mark.parametrize("seed", range(4))
def test_beam_level_matches_full_sort(seed):
    """The two-stage top-k (row-wise, then over the candidates) == a full stable sort of all n * V pairs,
    ties included (scores quantised so many pairs tie)."""
    g = torch.Generator().manual_seed(seed)
    n, v, k = 6, 200, 16
    lp = torch.log_softmax(torch.randn(n, v, generator=g), -1)
    if seed % 2:
        lp = (lp * 4).round() / 4  # many exact ties
    cum = (torch.randn(n, generator=g) * 2).round() / 2
    parent, tok, score = beam_level(cum, lp, k)
    flat = (cum[:, None] + lp).reshape(-1)
    order = torch.sort(-flat, stable=True).indices[:k]  # stable: equal scores keep flat-index order
    assert torch.equal(parent, order // v) and torch.equal(tok, order % v)
    assert torch.equal(score, flat[order])


def test_beam_level_ties_and_clamp():
    lp = torch.zeros(2, 3)  # everything ties: flat order (node-major, then token)
    parent, tok, _ = beam_level(torch.zeros(2), lp, 10)  # k clamped to n * V = 6
    assert list(zip(parent.tolist(), tok.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    with pytest.raises(ValueError):
        beam_level(torch.zeros(3), lp, 2)
    # more ties at the cut than TIE_SLACK (two-stage path): still exactly the flat order
    parent, tok, _ = beam_level(torch.zeros(4), torch.zeros(4, 100), 16)
    assert parent.tolist() == [0] * 16 and tok.tolist() == list(range(16))
    parent, tok, _ = beam_level(torch.tensor([-1.0, 0.0, 0.0, -1.0]), torch.zeros(4, 100), 120)
    assert parent.tolist() == [1] * 100 + [2] * 20 and tok.tolist() == list(range(100)) + list(range(20))


def test_tree_draft_is_the_documented_beam():
    """Rebuild each round's tree by brute force (full-sequence draft logits per node, beam rule)."""
    target, glide = _pair("qwen2", 3, vocab=12, window=4)
    tree_shape = (2, 3, 4)
    prompt = _prompt(12, 9, 3)
    records = []
    tree_spec_generate(target, glide, prompt, 9, tree_shape=tree_shape, max_gen_len=8, eos_id=[], on_round=records.append)
    res = vanilla_generate(target, prompt, 9, max_gen_len=8, eos_id=[])
    seq = prompt[0].tolist() + res.tolist()
    L = 9  # first round: the verified prefix is the prompt; the root is the prefill's token
    for r in records[:2]:
        draft = r.draft
        tokens, parents = draft.tokens.tolist(), list(draft.tree.parents)
        cache = new_cache(target)
        forward_step(target, torch.tensor([seq[:L]]), cache)
        tk, tv = cache.k[-1], cache.v[-1]

        def node_logprobs(node: int) -> torch.Tensor:
            path = draft.tree.path(node)
            ids = torch.tensor([seq[:L] + [tokens[j] for j in path]])
            t = ids.shape[1]
            idx = torch.arange(t)
            self_mask = window_mask(idx, idx, glide.window)
            cross = (idx[:, None] > torch.arange(L)[None, :])  # query t sees target < t, within [0, L)
            h, _, _ = glide_layer(target, glide, ids, idx, None, None, self_mask, tk, tv, cross)
            return torch.log_softmax(glide_logits(target, h[0, -1:]), dim=-1)

        level, cum = [0], torch.zeros(1)
        depth = draft.tree.depth
        for k in tree_shape:
            lp = torch.cat([node_logprobs(n) for n in level])
            parent, tok, cum = beam_level(cum, lp, k)
            nxt = [i for i in range(len(tokens)) if depth[i] == depth[level[0]] + 1]
            assert [parents[i] for i in nxt] == [level[int(p)] for p in parent]
            assert [tokens[i] for i in nxt] == tok.tolist()
            level = nxt
        L += len(r.path)


# ---------------------------------------------------------------------------------------------
# The draft layer and its sliding window
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_window_cache_matches_brute_force_and_stays_bounded(family):
    target, glide = _pair(family, 1, vocab=16, window=8)
    seq = _prompt(16, 60, 5)
    cache = new_cache(target)
    forward_step(target, seq, cache)
    tk, tv = cache.k[-1], cache.v[-1]
    # Brute force: whole sequence, window-8 causal self mask, query t sees target rows < t.
    ref = torch.log_softmax(glide_full_forward(target, glide, seq, tk, tv, lag=1)[0], dim=-1)
    drafter = GlideDrafter(target, glide, (1,))
    t = 19  # first catch-up of 20 positions: longer than the window (chunked)
    steps = [1, 3, 2, 5, 1, 4]
    i = 0
    while t < 60:
        h = drafter._catch_up(seq[0, : t + 1].tolist(), tk[:, :, :t], tv[:, :, :t])
        got = torch.log_softmax(glide_logits(target, h[None])[0], dim=-1)
        torch.testing.assert_close(got, ref[t], atol=1e-4, rtol=1e-4)
        assert drafter.cache.k.shape[2] <= 8 and drafter.cache.v.shape[2] <= 8
        assert drafter.cache.pos.tolist() == list(range(t - 7, t + 1))
        t += steps[i % len(steps)]
        i += 1
    # The window matters: a full-context draft gives different logits.
    wide = torch.log_softmax(glide_full_forward(target, glide, seq, tk, tv, lag=1, window=1000)[0], dim=-1)
    assert not torch.allclose(wide[40], ref[40], atol=1e-3)


def test_catch_up_caches_exactly_the_layers_kv_of_the_window():
    """The catch-up fills the draft cache with glide_kv (no layer pass for positions before the root):
    the very K/V the whole layer returns for those tokens, bitwise, and only the root's window of them."""
    target, glide = _pair("llama", 2, vocab=16, window=8)
    seq = _prompt(16, 30, 7)
    cache = new_cache(target)
    forward_step(target, seq, cache)
    tk, tv = cache.k[-1], cache.v[-1]
    pos = torch.arange(30)
    _, k_all, v_all = glide_layer(target, glide, seq, pos, None, None, window_mask(pos, pos, 8), tk, tv,
                                  pos[None, :] < pos[:, None])
    k_kv, v_kv = glide_kv(target, glide, seq, pos)
    assert torch.equal(k_kv, k_all) and torch.equal(v_kv, v_all)
    drafter = GlideDrafter(target, glide, (1,))
    drafter._catch_up(seq[0].tolist(), tk[:, :, :29], tv[:, :, :29])      # root at 29: a window of 8
    assert drafter.cache.pos.tolist() == list(range(22, 30))
    assert torch.equal(drafter.cache.k[:, :, :-1], k_all[:, :, 22:29]) and torch.equal(drafter.cache.v[:, :, :-1], v_all[:, :, 22:29])


def test_draft_cache_does_not_grow_with_context():
    target, glide = _pair("llama", 2, vocab=16, window=8)
    drafter = GlideDrafter(target, glide, (2, 2))
    sizes = []

    class Spy:
        def propose(self, state: RoundState):
            d = drafter.propose(state)
            sizes.append(drafter.cache.k.shape[2])
            return d

    res = run_speculative(target, Spy(), _prompt(16, 30, 1), 30, max_gen_len=80, eos_id=[])
    assert res.num_tokens == 80
    assert max(sizes) <= 8 and drafter.cache.k.numel() <= 8 * glide.config.num_kv_heads * glide.config.head_dim


# ---------------------------------------------------------------------------------------------
# Greedy: token for token equal to vanilla
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_tree_and_chain_equal_vanilla(family, seed):
    target, glide = _pair(family, seed, vocab=12, window=4 + 4 * seed)
    prompt = _prompt(12, 6 + 3 * seed, seed)
    n = prompt.shape[1]
    want = vanilla_generate(target, prompt, n, max_gen_len=20, eos_id=[]).tolist()
    for shape in [(4, 16, 16, 16, 16), (1, 1, 1, 1), (8,), (2, 3, 4)]:
        res = tree_spec_generate(target, glide, prompt, n, tree_shape=shape, max_gen_len=20, eos_id=[])
        assert res.tolist() == want, shape
        assert res.count == int(res.spec_mask.sum())
    for gamma in (1, 4):
        res = spec_generate(target, glide, prompt, n, gamma=gamma, max_gen_len=20, eos_id=[])
        assert res.tolist() == want, gamma


def test_every_drafter_pass_and_training_take_the_fused_attention(monkeypatch):
    """The draft's catch-up over emitted tokens (a whole prompt at first), its tree levels and the training
    forward attend through fused_masked_attention (drafts are only proposals); the written-out
    masked_attention stays the definition (glide_full_forward's default), which the fused forward matches
    (the same function, rounded differently)."""
    import specdec.ref.glide as ref_glide

    target, glide = _pair("llama", 3, vocab=12, window=6)
    prompt = _prompt(12, 15, 3)
    calls = []
    real_fused, real_plain = ref_glide.fused_masked_attention, ref_glide.masked_attention
    monkeypatch.setattr(ref_glide, "fused_masked_attention", lambda q, *a: calls.append(("fused", q.shape[2])) or real_fused(q, *a))
    monkeypatch.setattr(ref_glide, "masked_attention", lambda q, *a: calls.append(("plain", q.shape[2])) or real_plain(q, *a))
    tree_spec_generate(target, glide, prompt, prompt.shape[1], tree_shape=(2, 2, 1), max_gen_len=12, eos_id=[])
    # first round: the catch-up runs only the root (position 15) through the layer, self + cross (the
    # positions before it need only their K/V, glide_kv); then the two tree levels that need a draft forward
    # (the beam keeps 2 nodes each), self + cross each
    assert calls[:2] == [("fused", 1)] * 2
    assert calls[2:6] == [("fused", 2)] * 4
    assert calls[6] == ("fused", 1)   # the next round starts with a catch-up: again the root alone
    calls.clear()
    ids = prompt[:, :12]
    cache = new_cache(target, 1)
    forward_step(target, ids, cache)
    tk, tv = cache.k[-1], cache.v[-1]
    fused = glide_full_forward(target, glide, ids, tk, tv, fused=True)
    assert calls == [("fused", 12)] * 2
    plain = glide_full_forward(target, glide, ids, tk, tv)
    assert torch.allclose(fused, plain, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_many_seeds_and_eos(seed):
    family = ("llama", "qwen2")[seed % 2]
    target = tiny_model(family, vocab=16, seed=10 + seed, eos=3)
    glide = init_glide_weights(target.config, window=16, seed=seed, std=0.5)
    prompt = _prompt(16, 5 + seed, seed)
    n = prompt.shape[1]
    want = vanilla_generate(target, prompt, n, max_gen_len=16).tolist()  # stops at EOS 3
    assert tree_spec_generate(target, glide, prompt, n, max_gen_len=16).tolist() == want
    assert spec_generate(target, glide, prompt, n, max_gen_len=16).tolist() == want


def test_tree_default_shape_and_bad_args():
    target, glide = _pair("llama", 0)
    prompt = _prompt(16, 5, 0)
    res = tree_spec_generate(target, glide, prompt, 5, tree_shape=None, max_gen_len=6, eos_id=[])
    assert len(tuple(res)) == 5 and res.num_tokens == 6
    with pytest.raises(ValueError):
        tree_spec_generate(target, glide, prompt, 5, tree_shape=(4, 0), max_gen_len=6)
    with pytest.raises(ValueError):
        spec_generate(target, glide, prompt, 5, gamma=0)
    other = tiny_model("llama", vocab=16, hidden=48, seed=0)
    with pytest.raises(ValueError, match="does not match"):
        spec_generate(other, glide, prompt, 5)


# ---------------------------------------------------------------------------------------------
# Sampling: lossless
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_sampling_is_lossless(kind):
    assert glide_sampling_pvalue(kind) >= 1e-3


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _assert_same_weights(a: Glide, b: Glide):
    assert set(a.weights) == set(b.weights)
    for k in a.weights:
        torch.testing.assert_close(a.weights[k].float(), b.weights[k].float())


def test_checkpoint_formats_load(tmp_path):
    target, glide = _pair("qwen2", 0, window=32)
    # 1. save_glide -> HF-format dir; the window comes back from config.json.
    d = save_glide(glide, tmp_path / "hf")
    g1 = load_glide(d, target)
    _assert_same_weights(glide, g1)
    assert g1.window == 32 and g1.dtype == target.dtype
    # 2. HF dir with LongSpec-like prefixed keys, the unused cross k/v, and a whole target model inside.
    from safetensors.torch import save_file

    sd = {f"model.layers.0.{k}": v for k, v in glide.weights.items()}
    sd["model.layers.0.cross_attn.k_proj.weight"] = torch.zeros(16, 32)
    sd["model.layers.0.cross_attn.v_proj.weight"] = torch.zeros(16, 32)
    sd.update({f"target.model.{k}": v.clone() for k, v in target.weights.items() if k.startswith("layers.")})
    os.makedirs(tmp_path / "prefixed")
    save_file(sd, str(tmp_path / "prefixed" / "model.safetensors"))
    g2 = load_glide(tmp_path / "prefixed", target)
    _assert_same_weights(glide, g2)
    assert g2.extras["prefix"] == "model.layers.0." and g2.window == 512
    # 3. LongSpec training state_dict (.pth) with the draft_model. prefix.
    torch.save({f"draft_model.{k}": v for k, v in glide.weights.items()}, tmp_path / "glide.pth")
    g3 = load_glide(tmp_path / "glide.pth", target, window=32)
    _assert_same_weights(glide, g3)
    # 4. pytorch_model.bin dir, nested {'state_dict': ...} .pth.
    os.makedirs(tmp_path / "bin")
    torch.save({f"glide.{k}": v for k, v in glide.weights.items()}, tmp_path / "bin" / "pytorch_model.bin")
    _assert_same_weights(glide, load_glide(tmp_path / "bin", target))
    torch.save({"state_dict": {f"draft_model.{k}": v for k, v in glide.weights.items()}}, tmp_path / "nested.pth")
    _assert_same_weights(glide, load_glide(tmp_path / "nested.pth", target))
    # The loaded drafts decode identically.
    prompt = _prompt(16, 6, 0)
    a = spec_generate(target, g1, prompt, 6, max_gen_len=8, eos_id=[])
    b = spec_generate(target, g3, prompt, 6, max_gen_len=8, eos_id=[])
    assert a.tolist() == b.tolist() and a.accept_lengths == b.accept_lengths


def test_checkpoint_mismatch_rejected_clearly(tmp_path):
    target, glide = _pair("llama", 0)
    bigger = tiny_model("llama", vocab=16, hidden=48, heads=4, kv_heads=2, seed=0)
    wrong = init_glide_weights(bigger.config)
    torch.save({f"draft_model.{k}": v for k, v in wrong.weights.items()}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"tensor 'draft_model\.[a-z_.]+' has shape \([\d, ]+\), but the target .* needs \([\d, ]+\)"):
        load_glide(tmp_path / "wrong.pth", target)
    # Missing tensors are named.
    sd = {k: v for k, v in glide.weights.items() if k != "mlp.up_proj.weight"}
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="mlp.up_proj.weight"):
        load_glide(tmp_path / "missing.pth", target)
    # A target checkpoint is not a GLIDE checkpoint.
    torch.save({f"model.{k}": v for k, v in target.weights.items()}, tmp_path / "target.pth")
    with pytest.raises(ValueError, match="not a GLIDE checkpoint"):
        load_glide(tmp_path / "target.pth", target)
    with pytest.raises(ValueError, match="does not exist"):
        load_glide(tmp_path / "nope", target)
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_glide(tmp_path / "corrupt.pth", target)


def test_glide_config_and_shapes(tmp_path):
    target = tiny_model("llama", vocab=16, hidden=32, heads=4, kv_heads=2, seed=0)
    cfg = GlideConfig.from_target(target.config)
    assert cfg.window == 512 and cfg.hidden_size == 32
    shapes = glide_expected_shapes(cfg)
    assert shapes["self_attn.k_proj.weight"] == (16, 32) and shapes["cross_attn.q_proj.bias"] == (32,)
    assert "cross_attn.k_proj.weight" not in shapes
    with pytest.raises(ValueError):
        GlideConfig.from_target(target.config, window=0)
    g = load_glide_weights(save_glide(init_glide_weights(target.config, window=7), tmp_path / "w7"), target.config)
    assert g.window == 7
