"""A truncated GLIDE draft vocabulary on the fast path (docs/design.md §12), fp32 under the Triton interpreter
on a CPU: the fast drafter proposes exactly the reference's trees (greedy and keyed, the keyed noise gathered
through the map), so the output is vanilla's / keyed vanilla's; sampled output keeps the target's
distribution (chi-square); the map loads with the checkpoint and its lm_head rows are a sliced copy.
"""

from __future__ import annotations

import pytest
import torch

import specdec.fast as fast
import specdec.ref as ref
from lossless import exact_sequence_distribution, lossless_check, tiny_model
from specdec.fast.glide import as_fast_glide
from specdec.shared.glide import init_glide_weights, save_glide, with_draft_vocab

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 32
MAP = list(range(0, VOCAB, 2)) + [3, 7]  # 18 of 32 ids
MAP.sort()
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]]


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", vocab=VOCAB, layers=1, hidden=128, heads=2, kv_heads=1, seed=1, init_std=0.05, max_pos=2048)
    glide = with_draft_vocab(init_glide_weights(target.config, window=8, seed=3, std=0.05), MAP)
    return target, fast.as_fast_model(target), glide


def _rounds(decode, **kw):
    rounds = []
    res = decode(on_round=lambda r: rounds.append(([int(t) for t in r.draft.tokens.tolist()], list(r.draft.tree.parents), r.path)), **kw)
    return res, rounds


@pytest.mark.parametrize("keyed", [False, True])
def test_fast_truncated_trees_equal_ref_trees_and_vanilla(models, keyed):
    """Round by round the same trees (tokens are mapped target ids, parents) and paths as the reference; the
    output is (keyed) vanilla's. The keyed prompt is longer than 2 * window: the draft window slides."""
    target, ftarget, glide = models
    for i, ids in enumerate(PROMPTS[1:] if keyed else PROMPTS[:1]):
        x = torch.tensor([ids])
        kw = dict(input_ids=x, prompt_length=x.shape[1], max_gen_len=10, eos_id=[])
        if keyed:
            kw.update(temperature=1.0, top_p=0.95, sampling="keyed", seed=i)
        want = ref.vanilla_generate(target, **kw).output_ids
        rr, r_rounds = _rounds(lambda **k: ref.tree_spec_generate(target, glide, tree_shape=(2, 3, 2), **k), **kw)
        ff, f_rounds = _rounds(lambda **k: fast.tree_spec_generate(ftarget, glide, tree_shape=(2, 3, 2), **k), **kw)
        assert torch.equal(rr.output_ids, want) and torch.equal(ff.output_ids, want), (keyed, i)
        assert f_rounds == r_rounds, (keyed, i)
        assert {t for tokens, _, _ in f_rounds for t in tokens[1:]} <= set(MAP)
    chain = fast.spec_generate(ftarget, glide, gamma=3, **kw)
    assert torch.equal(chain.output_ids, want)


def test_fast_truncated_sampling_is_lossless():
    """Chi-square of the first sampled token, a one-level tree of 3 drafts from 4 mapped ids (under the interpreter
    each call takes ~0.2 s: 100 samples over 8 cells; the GPU test below runs 1500 over two tokens)."""
    target = tiny_model("qwen2", vocab=8, layers=1, hidden=64, heads=2, kv_heads=1, seed=4)
    glide = with_draft_vocab(init_glide_weights(target.config, window=8, seed=5, std=0.5), [1, 3, 4, 6])
    ftarget = fast.as_fast_model(target)
    prompt = torch.tensor([[1, 2, 3, 4]])
    exact = exact_sequence_distribution(target, prompt, 1, temperature=0.9)
    res = lossless_check(lambda **kw: fast.tree_spec_generate(ftarget, glide, tree_shape=(3,), **kw), target, prompt,
                         n_samples=100, n_tokens=1, temperature=0.9, exact=exact, max_gen_len=1)
    assert res.pvalue >= 1e-3


@pytest.mark.gpu
def test_gpu_fast_truncated_sampling_is_lossless():
    target = tiny_model("llama", vocab=10, layers=1, hidden=128, heads=2, kv_heads=1, seed=21, init_std=0.5)
    target.weights = {k: v.cuda() for k, v in target.weights.items()}
    glide = with_draft_vocab(init_glide_weights(target.config, seed=23, std=0.5, device="cuda"), [0, 2, 3, 5, 8, 9])
    ft = fast.as_fast_model(target)
    lossless_check(lambda **kw: fast.tree_spec_generate(ft, glide, tree_shape=(3, 4), **kw), target,
                   torch.tensor([[1, 2, 3, 1, 2]]), n_samples=1500, temperature=1.0, top_k=6)


def test_fast_load_glide_keeps_the_map_and_a_sliced_lm_head(models, tmp_path):
    target, ftarget, glide = models
    d = save_glide(glide, tmp_path / "g")
    fg = fast.load_glide(d, ftarget)
    assert fg.vocab_map.tolist() == MAP and fg.draft_vocab_size == len(MAP)
    head = fg.lm_head_for(ftarget)
    assert torch.equal(head, ftarget.w["lm_head"][torch.tensor(MAP)]) and head is fg.lm_head_for(ftarget)
    assert as_fast_glide(init_glide_weights(target.config, window=8)).vocab_map is None
    with pytest.raises(ValueError, match="draft tokens can fill"):
        fast.tree_spec_generate(ftarget, with_draft_vocab(glide, [1, 2]), torch.tensor([PROMPTS[0]]), 11, tree_shape=(3,))
