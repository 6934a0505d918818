"""Sampling rules: equal to transformers' logits warpers, pure, reproducible; the romsto processors."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from helpers import make_tiny_model_dir
from specdec.ref import forward, load_model, vanilla_generate
from specdec.shared.sampling import (
    GreedyProcessor,
    MultinomialProcessor,
    NucleusProcessor,
    SamplingParams,
    TopKNucleusProcessor,
    TopKProcessor,
    apply_temperature,
    check_sampling_args,
    greedy,
    logits_to_probs,
    process_logits,
    sample,
    sample_from_probs,
    top_k_filter,
    top_p_filter,
    TIE_SLACK,
    stable_topk,
)

V = 50


def _random_logits(seed: int, rows: int = 6, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _tied_logits(seed: int, rows: int = 6, vocab: int = V) -> torch.Tensor:
    """Small integers: many exact ties, also at the top-k boundary."""
    return torch.randint(-3, 4, (rows, vocab), generator=torch.Generator().manual_seed(seed)).float()


LOGITS = {
    "random": lambda s: _random_logits(s),
    "ties": lambda s: _tied_logits(s),
    "peaked": lambda s: _random_logits(s) * 10,
    "with-inf": lambda s: _random_logits(s).masked_fill(_random_logits(s + 100) > 1.0, float("-inf")),
}

_DUMMY_IDS = torch.zeros(6, 1, dtype=torch.long)


@pytest.mark.parametrize("kind", list(LOGITS))
@pytest.mark.parametrize("k", [1, 2, 7, V - 1, V, V + 5])
def test_top_k_matches_transformers(kind, k):
    for seed in range(3):
        x = LOGITS[kind](seed)
        assert torch.equal(top_k_filter(x, k), TopKLogitsWarper(k)(_DUMMY_IDS, x))


@pytest.mark.parametrize("kind", list(LOGITS))
@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.8, 0.95, 0.999])
def test_top_p_matches_transformers(kind, p):
    for seed in range(3):
        x = LOGITS[kind](seed)
        assert torch.equal(top_p_filter(x, p), TopPLogitsWarper(p)(_DUMMY_IDS, x))


@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 1.5, 4.0])
def test_temperature_matches_transformers(t):
    x = _random_logits(1)
    assert torch.allclose(apply_temperature(x, t), TemperatureLogitsWarper(t)(_DUMMY_IDS, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("t,k,p", [(0.8, 0, 0.9), (1.3, 5, 1.0), (0.6, 10, 0.7), (1.0, 3, 0.5), (2.0, 0, 1.0)])
def test_process_logits_is_transformers_chain(t, k, p):
    """temperature -> top-k -> top-p, the order transformers' generate applies them."""
    for kind in ("random", "ties"):
        x = LOGITS[kind](4)
        y = TemperatureLogitsWarper(t)(_DUMMY_IDS, x)
        if k:
            y = TopKLogitsWarper(k)(_DUMMY_IDS, y)
        if p < 1.0:
            y = TopPLogitsWarper(p)(_DUMMY_IDS, y)
        got = process_logits(x, t, k, p)
        assert torch.equal(torch.isinf(got), torch.isinf(y))
        assert torch.allclose(got, y, atol=1e-6)
        probs = logits_to_probs(x, t, k, p)
        assert torch.allclose(probs, torch.softmax(y, -1), atol=1e-6)
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[0]))


def test_filters_off_values_are_identity():
    x = _random_logits(0)
    assert torch.equal(top_k_filter(x, 0), x)
    assert torch.equal(top_p_filter(x, 1.0), x)


def test_top_k_keeps_ties_at_boundary():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0]])
    assert torch.isfinite(top_k_filter(x, 3)).tolist() == [[True, False, True, True, True]]


def test_top_p_always_keeps_most_likely():
    x = torch.tensor([[0.0, 10.0, 0.0]])
    out = top_p_filter(x, 1e-6)
    assert torch.isfinite(out).tolist() == [[False, True, False]]


def test_functions_never_mutate_inputs():
    x = _tied_logits(7)
    x3 = _random_logits(8).reshape(2, 3, V)
    before, before3 = x.clone(), x3.clone()
    apply_temperature(x, 0.5)
    top_k_filter(x, 3)
    top_p_filter(x, 0.5)
    process_logits(x, 0.7, 4, 0.8)
    logits_to_probs(x, 0.7, 4, 0.8)
    logits_to_probs(x, 0.0)
    sample(x, 0.9, 5, 0.9, torch.Generator().manual_seed(0))
    sample(x3, 0.9, 5, 0.9, torch.Generator().manual_seed(0))
    greedy(x)
    for proc in (GreedyProcessor(), MultinomialProcessor(0.8), TopKProcessor(0.8, 3), NucleusProcessor(0.8, 0.6), TopKNucleusProcessor(0.8, 3, 0.6)):
        probs = proc(x)
        pb = probs.clone()
        proc.sample(probs)
        assert torch.equal(probs, pb)
    assert torch.equal(x, before) and torch.equal(x3, before3)


def test_greedy_is_argmax_of_raw_logits_lowest_index_on_ties():
    x = torch.tensor([[1.0, 5.0, 5.0, -2.0], [7.0, 0.0, 7.0, 7.0]])
    assert greedy(x).tolist() == [1, 0]
    assert sample(x, 0.0).tolist() == [1, 0]
    assert logits_to_probs(x, 0.0).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    # temperature 0 ignores top-k/top-p and the generator
    assert sample(x, 0.0, top_k=1, top_p=0.1, generator=torch.Generator().manual_seed(3)).tolist() == [1, 0]


def test_sampling_reproducible_with_generator():
    x = _random_logits(2, rows=64)
    a = sample(x, 1.0, 0, 1.0, torch.Generator().manual_seed(123))
    b = sample(x, 1.0, 0, 1.0, torch.Generator().manual_seed(123))
    c = sample(x, 1.0, 0, 1.0, torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # shapes: [..., V] -> [...]
    assert sample(x.reshape(8, 8, V), 1.0, generator=torch.Generator().manual_seed(0)).shape == (8, 8)
    assert sample_from_probs(torch.softmax(x, -1), torch.Generator().manual_seed(0)).shape == (64,)


def test_samples_stay_inside_the_filtered_support():
    x = _random_logits(3, rows=1).expand(2000, V)
    toks = sample(x, 1.0, top_k=4, generator=torch.Generator().manual_seed(0))
    allowed = set(torch.topk(x[0], 4).indices.tolist())
    assert set(toks.tolist()) == allowed
    toks = sample(x, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    allowed = set(torch.nonzero(torch.isfinite(top_p_filter(x[:1], 0.5))[0]).flatten().tolist())
    assert set(toks.tolist()) <= allowed and len(allowed) < V


def test_sample_frequencies_match_probs():
    x = _random_logits(5, rows=1)[0] / 2
    probs = logits_to_probs(x, 0.9, 8, 0.95)
    n = 20000
    toks = sample(x.expand(n, V), 0.9, 8, 0.95, torch.Generator().manual_seed(0))
    freq = torch.bincount(toks, minlength=V).float() / n
    assert (freq[probs == 0] == 0).all()
    assert 0.5 * (freq - probs).abs().sum() < 0.02  # total variation; ~0.01 expected at this n


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t,k,p,err,match",
    [
        (-0.1, 0, 1.0, ValueError, "temperature must be >= 0"),
        (float("nan"), 0, 1.0, ValueError, "temperature"),
        ("1", 0, 1.0, TypeError, "temperature must be a number"),
        (1.0, -1, 1.0, ValueError, "top_k must be >= 0"),
        (1.0, 2.5, 1.0, TypeError, "top_k must be an int"),
        (1.0, 0, 0.0, ValueError, r"top_p must be in \(0, 1\]"),
        (1.0, 0, 1.01, ValueError, r"top_p must be in \(0, 1\]"),
        (1.0, 0, -0.5, ValueError, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_args(t, k, p, err, match):
    with pytest.raises(err, match=match):
        check_sampling_args(t, k, p)
    with pytest.raises(err, match=match):
        SamplingParams(t, k, p)


def test_apply_temperature_zero_rejected():
    with pytest.raises(ValueError, match="temperature > 0"):
        apply_temperature(_random_logits(0), 0.0)


def test_sampling_params():
    assert SamplingParams().greedy and not SamplingParams(0.5).greedy


# ---------------------------------------------------------------------------------------------
# romsto-style processors
# ---------------------------------------------------------------------------------------------


def test_greedy_processor():
    x = _tied_logits(1)
    proc = GreedyProcessor(temperature=0.3)  # temperature accepted and ignored
    probs = proc(x)
    assert torch.equal(probs.argmax(-1), x.argmax(-1)) and torch.equal(probs.sum(-1), torch.ones(6))
    tok = proc.sample(probs)
    assert tok.shape == (6, 1) and torch.equal(tok[:, 0], x.argmax(-1))


def test_multinomial_processor():
    x = _random_logits(2)
    proc = MultinomialProcessor(0.7)
    assert torch.allclose(proc(x), torch.softmax(x / 0.7, -1), atol=1e-6)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a, b = proc.sample(proc(x), g1), proc.sample(proc(x), g2)
    assert a.shape == (6, 1) and torch.equal(a, b)


def test_top_k_processor():
    x = _random_logits(3)
    probs = TopKProcessor(0.9, top_k=3)(x)
    assert ((probs > 0).sum(-1) == 3).all()
    assert torch.allclose(probs, logits_to_probs(x, 0.9, 3, 1.0))


def test_nucleus_processor():
    x = _random_logits(4)
    probs = NucleusProcessor(1.1, top_p=0.6)(x)
    assert torch.allclose(probs, torch.softmax(TopPLogitsWarper(0.6)(_DUMMY_IDS, x / 1.1), -1), atol=1e-6)
    assert ((probs > 0).sum(-1) < V).all()


def test_top_k_nucleus_processor():
    x = _random_logits(5)
    proc = TopKNucleusProcessor(0.8, top_k=6, top_p=0.7)
    assert torch.allclose(proc(x), logits_to_probs(x, 0.8, 6, 0.7))
    assert ((proc(x) > 0).sum(-1) <= 6).all()
    assert proc.params == SamplingParams(0.8, 6, 0.7)
    assert "TopKNucleusProcessor" in repr(proc)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: MultinomialProcessor(0.0), "temperature > 0"),
        (lambda: MultinomialProcessor(-1.0), "temperature > 0"),
        (lambda: TopKProcessor(1.0, top_k=0), "top_k >= 1"),
        (lambda: TopKProcessor(0.0, top_k=3), "temperature > 0"),
        (lambda: NucleusProcessor(1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (lambda: NucleusProcessor(1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (lambda: TopKNucleusProcessor(1.0, top_k=0, top_p=0.5), "top_k >= 1"),
        (lambda: TopKNucleusProcessor(1.0, top_k=3, top_p=2.0), r"top_p must be in \(0, 1\]"),
        (lambda: GreedyProcessor(-1.0), "temperature must be >= 0"),
    ],
)
def test_processor_bad_args(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------------------------------------
# Vanilla sampling
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load_model(make_tiny_model_dir(tmp_path_factory.mktemp("sampling"), family="llama", seed=1))


def test_vanilla_sampling_reproducible(tiny_model):
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    run = lambda seed, **kw: vanilla_generate(tiny_model, ids, 6, max_gen_len=24, eos_id=[], temperature=1.0,  # noqa: E731
                                              generator=torch.Generator().manual_seed(seed), **kw).output_ids
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(0, top_k=5, top_p=0.9), run(0, top_k=5, top_p=0.9))


def test_vanilla_sampling_degenerate_filters_equal_greedy(tiny_model):
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    g = vanilla_generate(tiny_model, ids, 6, max_gen_len=20, eos_id=[]).output_ids
    k1 = vanilla_generate(tiny_model, ids, 6, max_gen_len=20, eos_id=[], temperature=1.3, top_k=1, generator=torch.Generator().manual_seed(0)).output_ids
    p0 = vanilla_generate(tiny_model, ids, 6, max_gen_len=20, eos_id=[], temperature=0.7, top_p=1e-6, generator=torch.Generator().manual_seed(0)).output_ids
    assert torch.equal(g, k1) and torch.equal(g, p0)


def test_vanilla_first_token_distribution(tiny_model):
    """The first sampled token of vanilla decoding follows the processed target distribution."""
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    probs = logits_to_probs(forward(tiny_model, ids)[0, -1], 1.0, 10, 1.0)
    n = 3000
    res = vanilla_generate(tiny_model, ids.expand(n, 5), 5, max_gen_len=1, eos_id=[], temperature=1.0, top_k=10,
                           generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(res.output_ids[:, 0], minlength=probs.shape[0]).float() / n
    assert (freq[probs == 0] == 0).all()
    assert 0.5 * (freq - probs).abs().sum() < 0.05


def _full_stable_order(scores: torch.Tensor, k: int) -> list[int]:
    return torch.sort(scores, descending=True, stable=True).indices[:k].tolist()


@pytest.mark.parametrize("kind", ["random", "few_values", "all_equal", "tie_at_cut", "with_inf"])
@pytest.mark.parametrize("k", [0, 1, 5, 40, 70, 200])
def test_stable_topk_is_the_prefix_of_a_stable_sort(kind, k):
    """Exactly the first k of a stable descending sort (equal scores: lower index first), whatever the ties --
    including more ties at the cut than TIE_SLACK, where topk alone would pick arbitrary tied indices."""
    g = torch.Generator().manual_seed(7)
    n = 100
    if kind == "random":
        scores = torch.randn(n, generator=g)
    elif kind == "few_values":
        scores = torch.randint(0, 4, (n,), generator=g).float()
    elif kind == "all_equal":
        scores = torch.zeros(n)
    elif kind == "tie_at_cut":   # 10 clear winners, then 60 equal scores, then lower ones
        scores = torch.cat([torch.arange(10, 0, -1).float() + 5, torch.full((60,), 3.0), torch.rand(30, generator=g)])
        scores = scores[torch.randperm(n, generator=g)]
    else:
        scores = torch.randn(n, generator=g)
        scores[::3] = float("-inf")
    got = stable_topk(scores, k).tolist()
    assert got == _full_stable_order(scores, k)
    assert len(got) == min(k, n)
    # the caller may hand in the candidates (any order): same answer
    kk = min(k + TIE_SLACK, n)
    cand = torch.topk(scores, kk).indices.flip(0)
    assert stable_topk(scores, k, candidates=cand).tolist() == got
