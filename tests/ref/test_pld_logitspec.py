"""Retrieval drafting: the n-gram pool and trie (shared/ngram.py), prompt lookup (ref/pld.py), LogitSpec (ref/logitspec.py)."""

from __future__ import annotations

import pytest
import torch

from lossless import lossless_check, tiny_model
from specdec.ref import logitspec_generate, pld_generate, vanilla_generate
from specdec.ref.engine import RoundState
from specdec.ref.logitspec import LogitSpecDrafter, guess_branch_length
from specdec.ref.model import new_cache
from specdec.shared.ngram import NgramPool, Trie, build_trie, prompt_lookup
from specdec.shared.sampling import SamplingParams
from specdec.shared.tree import Tree

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models():
    return {
        "llama": tiny_model("llama", vocab=V, seed=0, init_std=0.3),
        "qwen2": tiny_model("qwen2", vocab=V, seed=1, init_std=0.3),
    }


# ---------------------------------------------------------------------------------------------
# The pool and the trie
# ---------------------------------------------------------------------------------------------


def test_pool_latest_occurrence_and_longest_suffix():
    text = [1, 2, 3, 4, 9, 1, 2, 5, 6, 7, 2]
    pool = NgramPool(max_ngram_size=3, num_pred_tokens=3, tokens=text)
    assert pool.continuation([1, 2]) == [5, 6, 7]  # latest occurrence wins over [3, 4, 9]
    assert pool.continuation([2]) == [5, 6, 7]
    assert pool.continuation([7, 2]) == []  # the text's own suffix is not a match
    assert pool.lookup(text + [1, 2]) == [5, 6, 7]
    assert pool.lookup([4, 9]) == [1, 2, 5]  # 2-gram hit
    assert pool.lookup([8, 9]) == [1, 2, 5]  # falls back to the 1-gram [9]
    assert pool.lookup([8]) == []
    assert pool.lookup([1, 2], limit=1) == [5]
    # PLD: the most recent earlier occurrence of the longest matching suffix
    assert prompt_lookup(text, 3, 10) == [5, 6, 7, 2]
    assert prompt_lookup([5, 5], 3, 4) == [5]
    assert prompt_lookup([1, 2, 3], 3, 4) == []


def test_pool_incremental_equals_rebuild_and_grows():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 6, (80,), generator=g).tolist()
    inc = NgramPool(3, 5, text[:10])
    for n in range(11, 81, 7):
        inc.update(text[:n])
    inc.update(text)
    full = NgramPool(3, 5, text)
    assert inc._end == full._end
    for i in range(len(text)):
        assert inc.lookup(text[: i + 1] + [3]) == full.lookup(text[: i + 1] + [3])
    # continuations are read from the text, so they grow as the text does
    pool = NgramPool(2, 4, [7, 8])
    assert pool.continuation([7]) == [8]
    pool.update([7, 8, 9, 10, 11])
    assert pool.continuation([7]) == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="only grows"):
        pool.update([7])


def test_trie_merges_prefixes_parents_first():
    tokens, parents = build_trie(0, [[1, 2, 3], [1, 2, 4], [5], [1, 6], [5, 7], [1, 2, 3]])
    Tree.from_parents(parents)  # valid, parents first
    depth = Tree(tuple(parents)).depth
    assert depth == sorted(depth)  # breadth-first: levels are contiguous
    # no two siblings carry the same token
    seen = set()
    for t, p in zip(tokens[1:], parents[1:]):
        assert (p, t) not in seen
        seen.add((p, t))
    paths = {tuple(tokens[j] for j in Tree(tuple(parents)).path(i)[1:]) for i in range(len(tokens))}
    assert {(1, 2, 3), (1, 2, 4), (5,), (1, 6), (5, 7)} <= paths
    assert len(tokens) == 1 + 7  # 1, 2, 3, 4, 5, 6, 7
    # sibling order = insertion order: 1 before 5; under 1: 2 before 6
    assert [tokens[c] for c in Tree(tuple(parents)).children(0)] == [1, 5]
    # capacity counts draft nodes (the root excluded), cutting the branch that overflows
    tokens, parents = build_trie(0, [[1, 2, 3], [4, 5, 6]], capacity=4)
    assert tokens == [0, 1, 4, 2, 3] and parents == [-1, 0, 0, 1, 3]
    t = Trie(9)
    assert t.insert([1, 2]) == 2 and t.insert([1, 2, 3]) == 1 and t.num_drafts == 3


def test_logitspec_draft_tree_shape():
    """Branch 0 from the pool, then guesses by rank from the last logit, cut by rank, capped by capacity."""
    assert [guess_branch_length(r) for r in (1, 8, 9, 32, 33)] == [4, 4, 3, 3, 1]
    text = list(range(10, 40)) + list(range(40, 70)) + [10, 11]  # root = 11
    logits = torch.zeros(100)
    logits[11] = 9.0  # the root (skipped as a guess)
    logits[12] = 8.0  # rank 1: same as branch 0's first token -> merged
    logits[41] = 7.0  # rank 2: a guess with a pool continuation 42, 43, ...
    logits[99] = 6.0  # rank 3: no continuation -> [99]
    model = tiny_model("llama", vocab=100, seed=0, layers=1, hidden=16, heads=2, kv_heads=1)
    state = RoundState(text, model, new_cache(model), logits, SamplingParams(), None, budget=100)
    d = LogitSpecDrafter(max_ngram_size=3, num_pred_tokens=40, draft_tree_capacity=64).propose(state)
    tokens, tree = d.tokens.tolist(), d.tree
    assert tokens[0] == 11
    branches = {tuple(tokens[j] for j in tree.path(i)[1:]) for i in range(tree.size) if not tree.children(i)}
    assert tuple(range(12, 40)) + tuple(range(40, 52)) in branches  # branch 0: 40 tokens (num_pred_tokens > 30 is fine)
    assert (41, 42, 43, 44) in branches and (99,) in branches
    assert [tokens[c] for c in tree.children(0)][:3] == [12, 41, 99]  # rank order, merged rank 1
    assert tree.size - 1 == 64  # filled to capacity with lower-ranked guesses
    # a small capacity caps everything, branch 0 first
    d = LogitSpecDrafter(3, 20, draft_tree_capacity=5).propose(state)
    assert d.tokens.tolist() == [11, 12, 13, 14, 15, 16] and d.tree == Tree.chain(5)
    # the budget caps the depth (no drafts when only one more token may be emitted)
    state.budget = 1
    assert LogitSpecDrafter(3, 20, 64).propose(state).tree.size == 1


def test_logitspec_guesses_need_only_the_top_capacity_plus_one(monkeypatch):
    """The drafter ranks only the first capacity + 1 logits (guess_order) instead of sorting the whole
    vocabulary: its trees are exactly those of a full stable sort, for tie-heavy logits, every small capacity,
    the root and branch 0's first token at the top of the order (the two guesses that add no root child), a
    draft depth of one (every other guess adds exactly one node, so the tree fills at the last guess ranked),
    with and without a branch 0, and a NaN logit (ranked as -inf)."""
    import specdec.shared.retrieval as retrieval

    def full_order(last_logits, capacity):   # the definition: every id, stable descending, NaN as -inf
        s = last_logits.float().reshape(-1)
        s = torch.where(torch.isnan(s), float("-inf"), s)
        return torch.sort(s, descending=True, stable=True).indices.tolist()

    model = tiny_model("llama", vocab=100, seed=0, layers=1, hidden=16, heads=2, kv_heads=1)
    text = list(range(10, 40)) + list(range(40, 70)) + [10, 11]   # root 11; the pool continues it with 12, 13, ...
    g = torch.Generator().manual_seed(3)
    cases = []
    for trial in range(6):
        logits = torch.randint(0, 3, (100,), generator=g).float()   # three values: ties everywhere
        if trial % 2 == 0:
            logits[11], logits[12] = 9.0, 8.0                       # root first, then branch 0's first token
        if trial == 4:
            logits[50] = float("nan")
        cases.append(logits)
    no_branch0 = list(range(10, 70)) + [99]   # root 99 never occurred before: branch 0 is empty
    for logits in cases:
        for capacity, budget, ctx in [(c, b, t) for c in (1, 2, 3, 5, 17, 64) for b in (100, 2) for t in (text, no_branch0)]:
            state = RoundState(ctx, model, new_cache(model), logits, SamplingParams(), None, budget=budget)
            fast_d = LogitSpecDrafter(3, 20, capacity).propose(state)
            with monkeypatch.context() as m:
                m.setattr(retrieval, "guess_order", full_order)
                want = LogitSpecDrafter(3, 20, capacity).propose(state)
            assert fast_d.tokens.tolist() == want.tokens.tolist() and fast_d.tree == want.tree, capacity
            assert fast_d.tree.size - 1 == capacity


# ---------------------------------------------------------------------------------------------
# Greedy: identical to vanilla
# ---------------------------------------------------------------------------------------------


def _repetitive_prompt(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, V, (6 + seed % 4,), generator=g)
    return torch.cat([base, base, base, base[:3]])[None]


DECODERS = {
    "pld": lambda t, p, **kw: pld_generate(t, p, p.shape[1], **kw),
    "pld-1gram": lambda t, p, **kw: pld_generate(t, p, p.shape[1], max_ngram_size=1, num_pred_tokens=3, **kw),
    "logitspec": lambda t, p, **kw: logitspec_generate(t, p, p.shape[1], **kw),
    "logitspec-small": lambda t, p, **kw: logitspec_generate(t, p, p.shape[1], max_ngram_size=2, num_pred_tokens=40, draft_tree_capacity=7, **kw),
}


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_vanilla_and_accepts(models, name, family):
    target = models[family]
    total = 0
    for seed in range(3):
        for p in (_repetitive_prompt(seed), torch.randint(0, V, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))):
            ref = vanilla_generate(target, p, p.shape[1], max_gen_len=24, eos_id=[])
            res = DECODERS[name](target, p, max_gen_len=24, eos_id=[])
            assert res.tolist() == ref.tolist(), (seed, p)
            assert res.count == int(res.spec_mask.sum())
            assert len(res.accept_lengths) == res.num and sum(res.accept_lengths) >= res.num_tokens
            assert res.tau == pytest.approx(res.num_tokens / res.num)
            total += res.count
    assert total > 0  # retrieval actually hits on repetitive text


@pytest.mark.parametrize("name", ["pld", "logitspec"])
def test_retrieval_hits_on_repetitive_prompts(models, name):
    for seed in range(3):
        p = _repetitive_prompt(seed)
        res = DECODERS[name](models["llama"], p, max_gen_len=40, eos_id=[])
        assert res.count > 0 and res.num < 40


@pytest.mark.parametrize("name", ["pld", "logitspec"])
@pytest.mark.parametrize("max_gen_len", [1, 2])
def test_short_generations(models, name, max_gen_len):
    p = _repetitive_prompt(1)
    ref = vanilla_generate(models["qwen2"], p, p.shape[1], max_gen_len=max_gen_len, eos_id=[]).tolist()
    res = DECODERS[name](models["qwen2"], p, max_gen_len=max_gen_len, eos_id=[])
    assert res.tolist() == ref and res.num_tokens == max_gen_len


def _copyable_prompt(target, seed: int) -> torch.Tensor:
    """q + (the target's greedy continuation of q) + q: retrieval can copy what the target will say."""
    q = torch.randint(0, V, (1, 5), generator=torch.Generator().manual_seed(seed))
    cont = vanilla_generate(target, q, 5, max_gen_len=12, eos_id=[]).output_ids
    return torch.cat([q, cont, q], 1)


@pytest.mark.parametrize("name", ["pld", "logitspec"])
def test_eos_inside_accepted_draft(models, name):
    target = models["llama"]
    for seed in range(9, 40):
        p = _copyable_prompt(target, seed)
        free = DECODERS[name](target, p, max_gen_len=30, eos_id=[])
        toks, mask = free.tolist(), free.spec_mask[0].tolist()
        # the first occurrence of a token, as an accepted draft, not the last token
        cand = [i for i in range(1, len(toks) - 1) if mask[i] and toks[i] not in toks[:i]]
        if cand:
            break
    else:
        pytest.fail("no first-occurrence token inside an accepted draft: pick other prompts")
    eos = toks[cand[0]]
    ref = vanilla_generate(target, p, p.shape[1], max_gen_len=30, eos_id=[eos]).tolist()
    res = DECODERS[name](target, p, max_gen_len=30, eos_id=[eos])
    assert ref == toks[: cand[0] + 1] and res.tolist() == ref  # cut right after the EOS
    assert res.count == int(res.spec_mask.sum()) and res.spec_mask[0, -1]


# ---------------------------------------------------------------------------------------------
# Sampling: lossless
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return tiny_model("llama", vocab=8, seed=0, init_std=0.4, layers=1), torch.tensor([[1, 2, 3, 1, 2]])


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9)], ids=["plain", "topk-topp"])
@pytest.mark.parametrize("name", ["pld", "logitspec"])
def test_sampling_is_lossless(small, name, kw):
    target, p = small
    fn = {"pld": lambda **a: pld_generate(target, **a),
          "logitspec": lambda **a: logitspec_generate(target, max_ngram_size=2, num_pred_tokens=4, draft_tree_capacity=12, **a)}[name]
    # max_gen_len 4: round 1 (after the prefill token) may accept 2 drafts -- deeper than the 3-token window needs
    lossless_check(fn, target, p, n_samples=400, n_tokens=3, seed=1, max_gen_len=4, **kw)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input(models):
    t, p = models["llama"], torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="draft_tree_capacity must be >= 1"):
        logitspec_generate(t, p, 3, draft_tree_capacity=0)
    for fn in (pld_generate, logitspec_generate):
        with pytest.raises(ValueError, match="max_ngram_size must be >= 1"):
            fn(t, p, 3, max_ngram_size=0)
        with pytest.raises(ValueError, match="num_pred_tokens must be >= 1"):
            fn(t, p, 3, num_pred_tokens=0)
        with pytest.raises(ValueError, match=r"prompt_length\[0\] must be in \[1, 3\]"):  # batches are fine (issue 19), bad lengths not
            fn(t, torch.cat([p, p]), [0, 3])
        with pytest.raises(ValueError, match="prompt_length"):
            fn(t, p, 4)
