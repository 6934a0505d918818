"""Draft-model speculative decoding (ref/speculative.py): greedy == vanilla, lossless sampling, draft cache, errors."""

from __future__ import annotations

import pytest
import torch

from lossless import assert_matches, chi_square_test, collect_samples, exact_sequence_distribution, lossless_check, tiny_model
from specdec.ref import forward, speculative_generate, vanilla_generate

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models():
    return {
        "llama": tiny_model("llama", vocab=V, seed=0, init_std=0.3),
        "qwen2": tiny_model("qwen2", vocab=V, seed=1, init_std=0.3),
        "draft": tiny_model("llama", vocab=V, seed=2, layers=1, hidden=16, heads=2, kv_heads=1, init_std=0.3),
    }


def _prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_self_draft_accepts_everything(models, family, seed):
    target = models[family]
    p = _prompt(seed, 5 + 3 * seed)
    ref = vanilla_generate(target, p, p.shape[1], max_gen_len=21, eos_id=[])
    res = speculative_generate(target, target, p, p.shape[1], gamma=4, max_gen_len=21, eos_id=[])
    assert res.tolist() == ref.tolist()
    # prefill emits 1, every round 4 accepted drafts + 1 bonus: 1 + 4 * 5 = 21
    assert res.accept_lengths == [1, 5, 5, 5, 5] and res.num == 5 and res.count == 16
    assert res.count == int(res.spec_mask.sum())
    assert res.tau == pytest.approx(21 / 5)
    assert res.spec_mask[0].tolist() == [False] + ([True] * 4 + [False]) * 4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_random_draft_matches_vanilla(models, family, seed, gamma):
    target = models[family]
    p = _prompt(10 + seed, 4 + seed)
    ref = vanilla_generate(target, p, p.shape[1], max_gen_len=16, eos_id=[])
    res = speculative_generate(target, models["draft"], p, p.shape[1], gamma=gamma, max_gen_len=16, eos_id=[],
                               first_target=bool(seed % 2))
    assert res.tolist() == ref.tolist()
    assert res.count == int(res.spec_mask.sum())
    assert sum(res.accept_lengths) >= res.num_tokens
    assert res.tau == pytest.approx(res.num_tokens / res.num)


def test_draft_cache_rolls_back(models):
    """Every proposed chain must be the draft model's own greedy continuation of the sequence so far."""
    target, draft = models["llama"], models["draft"]
    p = _prompt(42, 6)
    from specdec.ref.engine import run_speculative
    from specdec.ref.speculative import DraftModelDrafter

    rounds = []
    drafter = DraftModelDrafter(draft, gamma=3)
    seq = p[0].tolist()

    def on_round(rec):
        rounds.append((list(seq), rec))
        seq.extend(rec.draft.tokens[1:][: rec.accepted].tolist() + [rec.next_token])

    first = vanilla_generate(target, p, 6, max_gen_len=1, eos_id=[]).tolist()
    seq.extend(first)
    res = run_speculative(target, drafter, p, 6, max_gen_len=20, eos_id=[], on_round=on_round)
    assert any(0 < r.accepted < 3 for _, r in rounds) or any(r.accepted == 0 for _, r in rounds)
    for context, rec in rounds:
        expect, s = [], list(context)
        for _ in range(len(rec.draft.tokens) - 1):
            s.append(int(forward(draft, torch.tensor([s]))[0, -1].argmax()))
            expect.append(s[-1])
        assert rec.draft.tokens[1:].tolist() == expect
        # the drafter's cache holds exactly the tokens it believes it has, no more
    assert drafter.cache.length == len(drafter.cached)
    assert res.tolist() == vanilla_generate(target, p, 6, max_gen_len=20, eos_id=[]).tolist()


@pytest.mark.parametrize("max_gen_len", [1, 2])
@pytest.mark.parametrize("first_target", [True, False])
def test_short_generations(models, max_gen_len, first_target):
    target = models["qwen2"]
    p = _prompt(3, 7)
    ref = vanilla_generate(target, p, 7, max_gen_len=max_gen_len, eos_id=[]).tolist()
    for draft in (target, models["draft"]):
        res = speculative_generate(target, draft, p, 7, gamma=5, max_gen_len=max_gen_len, eos_id=[], first_target=first_target)
        assert res.tolist() == ref and res.count == int(res.spec_mask.sum())


def test_eos_inside_accepted_draft(models):
    target = models["llama"]
    p = _prompt(5, 6)
    free = vanilla_generate(target, p, 6, max_gen_len=24, eos_id=[]).tolist()
    full = speculative_generate(target, target, p, 6, gamma=5, max_gen_len=24, eos_id=[])
    mask = full.spec_mask[0].tolist()
    # an EOS that the draft proposes (and the target accepts) in the middle of a round
    pos = next(i for i in range(1, len(free) - 1) if mask[i] and mask[i + 1] and free[i] not in free[:i])
    eos = free[pos]
    ref = vanilla_generate(target, p, 6, max_gen_len=24, eos_id=[eos]).tolist()
    res = speculative_generate(target, target, p, 6, gamma=5, max_gen_len=24, eos_id=[eos])
    assert ref == free[: pos + 1] and res.tolist() == ref
    assert res.count == int(res.spec_mask.sum()) and res.spec_mask[0, -1]


# ---------------------------------------------------------------------------------------------
# Sampling: lossless (chi-square against the enumerated target distribution)
# ---------------------------------------------------------------------------------------------

SV = 8  # tiny vocabulary: 8 ** 3 = 512 sequences of 3 tokens


@pytest.fixture(scope="module")
def small():
    target = tiny_model("llama", vocab=SV, seed=0, init_std=0.4, layers=1)
    draft = tiny_model("qwen2", vocab=SV, seed=5, init_std=0.8, layers=1)
    return target, draft, torch.tensor([[1, 2, 3, 1, 2]])


@pytest.mark.parametrize("kw", [
    # max_gen_len 4 with first_target: round 1 drafts 2 tokens covering tokens 2 and 3
    dict(temperature=1.0, gamma=2, first_target=True, n=500, max_gen_len=4),
    dict(temperature=0.8, top_k=5, top_p=0.9, gamma=3, first_target=False, n=400, max_gen_len=3),
], ids=["plain", "topk-topp-nofirst"])
def test_sampling_is_lossless(small, kw):
    target, draft, p = small
    kw = dict(kw)
    gamma, first, n = kw.pop("gamma"), kw.pop("first_target"), kw.pop("n")
    decode = lambda **a: speculative_generate(target, draft, gamma=gamma, first_target=first, **a)  # noqa: E731
    lossless_check(decode, target, p, n_samples=n, n_tokens=3, seed=0, **kw)


def test_skip_sample_adjustment_is_detected_as_lossy(small):
    target, draft, p = small
    exact = exact_sequence_distribution(target, p, 3, 1.0)
    lossy = lambda **a: speculative_generate(target, draft, gamma=1, skip_sample_adjustment=True, **a)  # noqa: E731
    samples = collect_samples(lossy, p, 400, 3, 1.0, seed=0)
    res = chi_square_test(samples, exact)
    assert res.pvalue < 1e-5, res  # far beyond the 1e-3 level the lossless tests use
    with pytest.raises(AssertionError, match="do not follow"):
        assert_matches(samples, exact)
    # (the same models, seed and sample count with the correct rule: p = 0.71)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input(models):
    target, p = models["llama"], _prompt(0, 4)
    other = tiny_model("llama", vocab=V + 1, seed=0, layers=1, hidden=16, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        speculative_generate(target, other, p, 4)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        speculative_generate(target, models["draft"], p, 4, gamma=0)
    with pytest.raises(ValueError, match=r"prompt_length\[1\] must be in \[1, 4\]"):  # batches are fine (issue 19), bad lengths not
        speculative_generate(target, models["draft"], torch.cat([p, p]), [4, 5])
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, models["draft"], p, 4, temperature=-1.0)
