"""A truncated GLIDE draft vocabulary on the reference path (docs/design.md §12): the draft proposes only N
target ids through a sorted map, verification is unchanged, so every GLIDE decoder stays lossless -- greedy
output == vanilla, sampling matches the target's distribution (chi-square), keyed output == keyed vanilla;
the map round-trips through the checkpoint and bad maps fail at load; train_glide trains over the N tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from lossless import glide_sampling_pvalue, tiny_model
from specdec.ref import vanilla_generate
from specdec.ref.glide import draft_lm_head, glide_logits, load_glide, spec_generate, tree_spec_generate
from specdec.ref.train_glide import glide_loss, to_draft_ids, train_glide
from specdec.shared.glide import (DRAFT_VOCAB_KEY, draft_vocab_from_counts, init_glide_weights, save_glide,
                                  validate_draft_vocab, with_draft_vocab)
from specdec.shared.keyed import keyed_noise

VOCAB = 24
MAP = [0, 2, 3, 5, 7, 8, 11, 13, 16, 17, 19, 23]  # 12 of 24 target ids, sorted


def _pair(seed=0, vocab=VOCAB, window=8):
    target = tiny_model("llama", vocab=vocab, seed=seed)
    glide = init_glide_weights(target.config, window=window, seed=seed + 100, std=0.5)
    return target, glide


def _rounds(decode, **kw):
    rounds = []
    res = decode(on_round=lambda r: rounds.append((r.draft.tokens.tolist(), list(r.draft.tree.parents))), **kw)
    return res, rounds


def test_draft_logits_are_the_mapped_lm_head_rows():
    target, glide = _pair()
    g = with_draft_vocab(glide, MAP)
    h = torch.randn(3, target.config.hidden_size)
    full = glide_logits(target, h)
    assert torch.equal(glide_logits(target, h, g), full[:, MAP])
    assert draft_lm_head(target, g) is draft_lm_head(target, g)  # the sliced copy is made once and kept
    assert g.draft_vocab_size == 12 and glide.draft_vocab_size == VOCAB


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_tree_and_chain_equal_vanilla_and_propose_only_mapped_ids(seed):
    target, glide = _pair(seed)
    g = with_draft_vocab(glide, MAP)
    prompt = torch.tensor([[1, 4, 6, 9, 4, 6]])
    want = vanilla_generate(target, prompt, 6, max_gen_len=20, eos_id=[]).tolist()
    res, rounds = _rounds(lambda **kw: tree_spec_generate(target, g, prompt, 6, tree_shape=(3, 4, 2), max_gen_len=20, eos_id=[], **kw))
    assert res.tolist() == want
    drafted = {t for tokens, _ in rounds for t in tokens[1:]}
    assert drafted and drafted <= set(MAP)
    assert spec_generate(target, g, prompt, 6, gamma=3, max_gen_len=20, eos_id=[]).tolist() == want


def test_a_map_of_every_id_drafts_exactly_the_full_vocabulary_trees():
    target, glide = _pair(2)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    for kw in (dict(), dict(temperature=0.9, top_k=5, sampling="keyed", seed=3)):
        r_full = _rounds(lambda **k: tree_spec_generate(target, glide, prompt, 5, tree_shape=(2, 3), max_gen_len=12, eos_id=[], **kw, **k))
        r_map = _rounds(lambda **k: tree_spec_generate(target, with_draft_vocab(glide, list(range(VOCAB))), prompt, 5,
                                                       tree_shape=(2, 3), max_gen_len=12, eos_id=[], **kw, **k))
        assert r_full[1] == r_map[1] and torch.equal(r_full[0].output_ids, r_map[0].output_ids)


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_sampling_is_lossless_with_a_truncated_draft(kind):
    assert glide_sampling_pvalue(kind, draft_vocab=[1, 3, 4, 6]) >= 1e-3


def test_keyed_noise_of_the_mapped_ids_and_keyed_output_equals_keyed_vanilla():
    ids = torch.tensor(MAP)
    pos = torch.tensor([4, 9])
    assert torch.equal(keyed_noise(777, pos, 0, token_ids=ids), keyed_noise(777, pos, VOCAB)[:, ids])
    target, glide = _pair(3)
    g = with_draft_vocab(glide, MAP)
    prompt = torch.tensor([[2, 7, 1, 8, 2, 8]])
    for seed in (0, 1, 2):
        kw = dict(max_gen_len=14, eos_id=[], temperature=1.0, top_p=0.95, sampling="keyed", seed=seed)
        want = vanilla_generate(target, prompt, 6, **kw).output_ids
        assert torch.equal(tree_spec_generate(target, g, prompt, 6, tree_shape=(2, 3), **kw).output_ids, want)
        assert torch.equal(spec_generate(target, g, prompt, 6, gamma=3, **kw).output_ids, want)


def test_keyed_beam_ranks_by_the_mapped_ids_noise(monkeypatch):
    """Give the truncated draft the noise of its DRAFT ids (0..N-1) instead of the mapped target ids: the
    trees change -- so the test above is not passing by accident of the ranking."""
    target, glide = _pair(3)
    g = with_draft_vocab(glide, MAP)
    prompt = torch.tensor([[2, 7, 1, 8, 2, 8]])
    kw = dict(max_gen_len=14, eos_id=[], temperature=1.0, sampling="keyed", seed=1)
    _, right = _rounds(lambda **k: tree_spec_generate(target, g, prompt, 6, tree_shape=(2, 3), **kw, **k))
    import specdec.ref.glide as rg
    real = rg.perturbed_logprobs
    monkeypatch.setattr(rg, "perturbed_logprobs", lambda *a, token_ids=None: real(*a))
    _, wrong = _rounds(lambda **k: tree_spec_generate(target, g, prompt, 6, tree_shape=(2, 3), **kw, **k))
    assert wrong != right


def test_checkpoint_round_trip_and_bad_maps(tmp_path):
    target, glide = _pair()
    # absent = the full vocabulary, files as before (no draft_vocab key, no draft_vocab_size)
    d0 = save_glide(glide, tmp_path / "full")
    assert "draft_vocab_size" not in json.load(open(f"{d0}/config.json"))
    assert load_glide(d0, target).vocab_map is None
    d = save_glide(with_draft_vocab(glide, MAP), tmp_path / "cut")
    assert json.load(open(f"{d}/config.json"))["draft_vocab_size"] == len(MAP)
    g = load_glide(d, target)
    assert torch.equal(g.vocab_map, torch.tensor(MAP)) and g.vocab_map.dtype == torch.int64
    from safetensors.torch import load_file, save_file

    def rewrite(name, ids=None, cfg=None):
        out = tmp_path / name
        save_glide(glide, out)
        sd = load_file(f"{d}/model.safetensors")
        if ids is not None:
            sd[DRAFT_VOCAB_KEY] = ids
        save_file(sd, f"{out}/model.safetensors")
        c = json.load(open(f"{d}/config.json"))
        c.update(cfg or {})
        json.dump(c, open(f"{out}/config.json", "w"))
        return out

    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        load_glide(rewrite("range", torch.tensor([0, 5, VOCAB]), {"draft_vocab_size": 3}), target)
    with pytest.raises(ValueError, match="strictly increasing"):
        load_glide(rewrite("order", torch.tensor([5, 2, 9]), {"draft_vocab_size": 3}), target)
    with pytest.raises(ValueError, match="draft_vocab_size=12"):
        load_glide(rewrite("size", torch.tensor([1, 2, 3])), target)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_glide(rewrite("tok", cfg={"vocab_size": 32000}), target)
    with pytest.raises(TypeError, match="int64 tensor"):
        validate_draft_vocab(torch.tensor([0.0, 1.0]), VOCAB)
    with pytest.raises(ValueError, match=r"1 <= N <= the target's 24"):
        validate_draft_vocab(torch.arange(25), VOCAB)


def test_draft_vocab_from_counts():
    counts = torch.tensor([5, 0, 9, 5, 1, 9, 5])
    assert draft_vocab_from_counts(counts, 3).tolist() == [0, 2, 5]  # 9, 9 and the lowest id of the 5s
    assert draft_vocab_from_counts(counts, 7).tolist() == list(range(7))
    for bad in (0, 8):
        with pytest.raises(ValueError, match=r"size must be an int in \[1, 7\]"):
            draft_vocab_from_counts(counts, bad)


def test_truncated_loss_skips_tokens_outside_and_training_keeps_the_map(tmp_path):
    target, glide = _pair()
    g = with_draft_vocab(glide, MAP)
    assert to_draft_ids(torch.tensor([0, 1, 23, 8]), g.vocab_map).tolist() == [0, -100, 11, 5]
    x = torch.tensor([[0, 2, 1, 3, 4, 5, 23, 8]])
    loss = glide_loss(target, g, x)
    # by hand: cross-entropy over the N draft logits at the positions whose next token is in the map
    from specdec.ref.glide import glide_full_forward
    from specdec.ref.train_glide import target_last_layer_kv

    tk, tv = target_last_layer_kv(target, x)
    lg = glide_full_forward(target, g, x, tk, tv)[0, :-1]
    lab = to_draft_ids(x[0, 1:], g.vocab_map)
    keep = lab != -100
    want = torch.nn.functional.cross_entropy(lg[keep], lab[keep])
    torch.testing.assert_close(loss, want)
    assert lg.shape[-1] == len(MAP)
    res = train_glide(target, [torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0))], glide=glide,
                      draft_vocab=MAP, window=8, seq_len=32, batch_size=2, steps=3, eval_every=None, progress=False,
                      save_dir=tmp_path / "trained", distill=0.5)
    assert res.glide.vocab_map.tolist() == MAP and all(r["loss"] == r["loss"] for r in res.history)  # finite, not NaN
    assert load_glide(tmp_path / "trained", target).vocab_map.tolist() == MAP
