"""specdec.benchutil's repetition measure (issue 21's distinct 4-gram share of greedy completions)."""

import pytest
import torch

from specdec.benchutil import distinct_ngram_share


def test_distinct_ngram_share_counts_repeated_ngrams():
    assert distinct_ngram_share(list(range(10))) == 1.0                       # 7 4-grams, all distinct
    loop = [1, 2, 3] * 8                                                       # 21 4-grams, 3 distinct
    assert distinct_ngram_share(loop) == pytest.approx(3 / 21)
    assert distinct_ngram_share([5] * 6, n=1) == pytest.approx(1 / 6)
    assert distinct_ngram_share([1, 2, 1, 2], n=2) == pytest.approx(2 / 3)   # (1,2) (2,1) (1,2)


def test_distinct_ngram_share_short_sequences_and_bad_n():
    assert distinct_ngram_share([1, 2, 3]) == 1.0 and distinct_ngram_share([]) == 1.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_ngram_share([1, 2, 3], n=0)


def test_exactness_prompts_are_held_out_prompts_cut_to_length():
    from specdec.benchutil import exactness_prompts

    prompts = exactness_prompts(5, prompt_tokens=100)
    assert len(prompts) == 5
    assert all(p.dim() == 2 and p.shape[0] == 1 and 64 <= p.shape[1] <= 100 for p in prompts)
    assert torch.equal(exactness_prompts(2, prompt_tokens=100)[1], prompts[1])      # the same order every call
    with pytest.raises(ValueError, match="n=100000"):
        exactness_prompts(100000)


def test_fast_greedy_decoders_name_every_speculative_method():
    from specdec.benchutil import fast_greedy_decoders
    from specdec.methods import METHODS

    runs = fast_greedy_decoders(object(), object(), object())
    assert sorted(runs) == sorted(m for m in METHODS if m != "vanilla")
