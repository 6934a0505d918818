"""Position-keyed sampling in every reference decoder (``sampling="keyed"``, docs/design.md §8).

With the same seed every speculative decoder emits exactly keyed vanilla decoding's tokens, by
construction (verification is greedy on the keyed-perturbed target logits); keyed vanilla itself
samples the target's exact distribution (chi-square over seeds), is reproducible, depends on the
seed and on nothing a batch-mate does; ``temperature=0`` stays greedy; bad arguments are named.
"""

from __future__ import annotations

import pytest
import torch

import specdec.ref as ref
from lossless import chi_square_test, exact_sequence_distribution, tiny_model
from specdec.shared.glide import init_glide_weights
from specdec.shared.keyed import resolve_seed
from specdec.shared.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 16
PROMPTS = [
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5],          # little to retrieve
    [7, 8, 9, 10, 7, 8, 9, 10, 7, 8, 9],        # repetitive: PLD / LogitSpec drafts get accepted
]
SEEDS = range(10)
CONFIGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 0, 1.0),
    (1.0, 5, 0.9),
    (0.7, 4, 1.0),
]


@pytest.fixture(scope="module")
def models():
    target = tiny_model("llama", vocab=VOCAB, seed=1)
    draft = tiny_model("llama", vocab=VOCAB, layers=1, seed=2)
    glide = init_glide_weights(target.config, window=8, seed=3, std=0.5)
    return target, draft, glide


def _decoders(target, draft, glide):
    """(name, call) for every speculative decoder of the reference."""
    return [
        ("speculative", lambda **kw: ref.speculative_generate(target, draft, gamma=3, **kw)),
        ("spec", lambda **kw: ref.spec_generate(target, glide, gamma=3, **kw)),
        ("tree_spec", lambda **kw: ref.tree_spec_generate(target, glide, tree_shape=(2, 3, 2), **kw)),
        ("logitspec", lambda **kw: ref.logitspec_generate(target, draft_tree_capacity=8, num_pred_tokens=3, **kw)),
        ("magicdec", lambda **kw: ref.magicdec_generate(target, gamma=3, sink_tokens=1, window=4, **kw)),
        ("pld", lambda **kw: ref.pld_generate(target, max_ngram_size=2, num_pred_tokens=4, **kw)),
    ]


def _kw(prompt, temperature, top_k, top_p, seed, max_gen_len=10):
    ids = torch.tensor([prompt])
    return dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=max_gen_len, eos_id=[], temperature=temperature,
                top_k=top_k, top_p=top_p, sampling="keyed", seed=seed)


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS)
def test_every_decoder_emits_keyed_vanillas_tokens(models, temperature, top_k, top_p):
    target, draft, glide = models
    accepted = {}
    for prompt in PROMPTS:
        for seed in SEEDS:
            kw = _kw(prompt, temperature, top_k, top_p, seed)
            want = ref.vanilla_generate(target, **kw).output_ids
            for name, decode in _decoders(target, draft, glide):
                res = decode(**kw)
                assert torch.equal(res.output_ids, want), (name, prompt, seed)
                accepted[name] = accepted.get(name, 0) + res.count
    # the drafts are coupled to the target's noise: every drafter gets some accepted
    assert all(n > 0 for n in accepted.values()), accepted


def test_first_target_false_and_eos(models):
    """The prompt's last token as the first root (romsto's mode), and an EOS inside a round."""
    target, draft, glide = models
    for seed in range(5):
        kw = _kw(PROMPTS[0], 1.0, 0, 1.0, seed, max_gen_len=12)
        want = ref.vanilla_generate(target, **kw).output_ids
        assert torch.equal(ref.speculative_generate(target, draft, gamma=3, first_target=False, **kw).output_ids, want)
        assert torch.equal(ref.logitspec_generate(target, draft_tree_capacity=6, first_target=False, **kw).output_ids, want)
        eos = int(want[0, 6])
        cut = want[0, : want[0].tolist().index(eos) + 1]
        kw["eos_id"] = eos
        assert torch.equal(ref.vanilla_generate(target, **kw).output_ids[0], cut)
        for name, decode in _decoders(target, draft, glide):
            assert torch.equal(decode(**kw).output_ids[0], cut), name


def test_self_draft_and_full_window_accept_everything(models):
    """A drafter that has the target's logits proposes the target's keyed choices: every draft is accepted."""
    target, _, _ = models
    for seed in range(3):
        kw = _kw(PROMPTS[0], 0.8, 0, 0.95, seed, max_gen_len=13)
        want = ref.vanilla_generate(target, **kw).output_ids
        res = ref.speculative_generate(target, target, gamma=3, **kw)
        assert torch.equal(res.output_ids, want) and res.accept_lengths == [1, 4, 4, 4]
        res = ref.magicdec_generate(target, gamma=3, sink_tokens=4, window=64, **kw)
        assert torch.equal(res.output_ids, want) and res.accept_lengths == [1, 4, 4, 4]


def test_glide_keyed_drafts_follow_the_noise(models):
    """Keyed GLIDE chains are ranked by the draft's processed log-probs plus the keyed noise, so they are
    not the draft's plain argmax chains (the output equality is checked above)."""
    target, _, glide = models
    rounds = []
    kw = _kw(PROMPTS[1], 1.0, 0, 1.0, 4)
    ref.spec_generate(target, glide, gamma=3, on_round=rounds.append, **kw)
    greedy_rounds = []
    ref.spec_generate(target, glide, gamma=3, on_round=greedy_rounds.append, **{**kw, "temperature": 0.0})
    assert len(rounds) >= 3
    # not the draft's plain argmax chain: the noise changes what it proposes
    assert [r.draft.tokens.tolist() for r in rounds] != [r.draft.tokens.tolist() for r in greedy_rounds[: len(rounds)]]


def test_glide_keyed_beam_accepts_more_on_the_default_model(monkeypatch):
    """On the embedded default model and its trained GLIDE draft, the beam ranked by the keyed noise gets
    more drafts accepted than the same beam ranked by the draft's processed log-probs alone (the noise
    dropped); the output is keyed vanilla's either way. (The fast drafter's trees equal these:
    tests/fast/test_fast_keyed_sampling.py.)"""
    import specdec.ref.glide as ref_glide
    from specdec.shared.sampling import process_logits
    from specdec.shared.tokenizer import load_tokenizer

    target = ref.load_model("default")
    glide = ref.load_glide("default-glide", target=target)
    tok = load_tokenizer("default")
    prompts = [tok(text).input_ids for text in ("def fibonacci(n):\n    ", "import os\n\ndef read_lines(path):\n")]

    def tau(seeds=range(3)):
        emitted = passes = 0
        for prompt in prompts:
            for seed in seeds:
                kw = _kw(prompt, 1.0, 0, 1.0, seed, max_gen_len=32)
                res = ref.tree_spec_generate(target, glide, **kw)
                assert torch.equal(res.output_ids, ref.vanilla_generate(target, **kw).output_ids)
                emitted, passes = emitted + res.output_ids.shape[1], passes + res.num
        return emitted / passes

    coupled = tau()
    monkeypatch.setattr(ref_glide, "perturbed_logprobs",
                        lambda logits, t, k, p, seed, seq_id, pos: torch.log_softmax(process_logits(logits.float(), t, k, p), dim=-1))
    uncoupled = tau()
    assert coupled > uncoupled + 0.2, (coupled, uncoupled)  # measured: 2.70 against 2.09


def test_keyed_vanilla_reproducible_seeded_and_batch_independent(models):
    target, _, _ = models
    kw = _kw(PROMPTS[0], 1.0, 0, 1.0, 7, max_gen_len=12)
    a = ref.vanilla_generate(target, **kw).output_ids
    assert torch.equal(a, ref.vanilla_generate(target, **kw).output_ids)
    others = [ref.vanilla_generate(target, **{**kw, "seed": s}).output_ids for s in (8, 9, 10)]
    assert not all(torch.equal(a, o) for o in others)
    # a generator-derived key is the generator's initial seed; an explicit seed wins over a generator
    kw.pop("seed")
    g = torch.Generator().manual_seed(7)
    assert torch.equal(ref.vanilla_generate(target, generator=g, **kw).output_ids, a)
    assert torch.equal(ref.vanilla_generate(target, generator=torch.Generator().manual_seed(99), seed=7, **kw).output_ids, a)
    assert torch.equal(ref.speculative_generate(target, target, gamma=2, generator=torch.Generator().manual_seed(7), **kw).output_ids, a)
    assert resolve_seed(None, torch.Generator().manual_seed(123)) == 123 and resolve_seed(5, None) == 5
    # no seed, no generator: one draw from torch's global RNG, so torch.manual_seed reproduces it
    torch.manual_seed(11)
    b = ref.vanilla_generate(target, **kw).output_ids
    torch.manual_seed(11)
    assert torch.equal(ref.vanilla_generate(target, **kw).output_ids, b)
    # batch row b is sequence b: its tokens do not depend on the other rows' content
    p0, p1, p2 = PROMPTS[0], PROMPTS[1], [2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]
    kw = dict(prompt_length=11, max_gen_len=8, eos_id=[], temperature=1.0, sampling="keyed", seed=3)
    ab = ref.vanilla_generate(target, torch.tensor([p0, p1]), **kw).output_ids
    cb = ref.vanilla_generate(target, torch.tensor([p0, p2]), **kw).output_ids
    ac = ref.vanilla_generate(target, torch.tensor([p2, p1]), **kw).output_ids
    assert torch.equal(ab[0], cb[0]) and torch.equal(ab[1], ac[1])
    assert torch.equal(ab[0], ref.vanilla_generate(target, torch.tensor([p0]), **kw).output_ids[0])


def test_keyed_at_temperature_zero_is_greedy(models):
    target, draft, glide = models
    for prompt in PROMPTS:
        kw = _kw(prompt, 0.0, 0, 1.0, 5)
        greedy = ref.vanilla_generate(target, **{**kw, "sampling": "rejection", "seed": None}).output_ids
        assert torch.equal(ref.vanilla_generate(target, **kw).output_ids, greedy)
        for name, decode in _decoders(target, draft, glide):
            assert torch.equal(decode(**kw).output_ids, greedy), name
    assert SamplingParams(0.0, sampling="keyed").keyed is False and SamplingParams(0.5, sampling="keyed").keyed


def test_rejection_stays_the_default_and_a_seed_seeds_it(models):
    """The default is the generator-driven rejection mode; there a ``seed`` seeds a fresh generator."""
    target, draft, _ = models
    ids = torch.tensor([PROMPTS[0]])
    kw = dict(input_ids=ids, prompt_length=11, max_gen_len=10, eos_id=[], temperature=1.0)
    for decode in (lambda **k: ref.vanilla_generate(target, **k), lambda **k: ref.speculative_generate(target, draft, gamma=3, **k)):
        old = decode(generator=torch.Generator().manual_seed(21), **kw).output_ids
        assert torch.equal(decode(generator=torch.Generator().manual_seed(21), sampling="rejection", **kw).output_ids, old)
        assert torch.equal(decode(seed=21, **kw).output_ids, old)


@pytest.mark.parametrize("name", ["vanilla", "speculative", "spec", "tree_spec", "logitspec", "magicdec", "pld"])
def test_bad_sampling_and_seed_are_named(models, name):
    target, draft, glide = models
    decode = dict(_decoders(target, draft, glide), vanilla=lambda **kw: ref.vanilla_generate(target, **kw))[name]
    kw = dict(input_ids=torch.tensor([PROMPTS[0]]), prompt_length=11, max_gen_len=2, temperature=1.0)
    with pytest.raises(ValueError, match="sampling"):
        decode(sampling="bogus", **kw)
    with pytest.raises(TypeError, match="sampling"):
        decode(sampling=1, **kw)
    with pytest.raises(TypeError, match="seed"):
        decode(sampling="keyed", seed="x", **kw)
    with pytest.raises(ValueError, match="seed"):
        decode(sampling="keyed", seed=-1, **kw)
    with pytest.raises(TypeError, match="seed"):
        decode(seed=1.5, **kw)


def test_keyed_vanilla_samples_the_exact_sequence_distribution():
    """The first 3 keyed tokens over many seeds (and sequence ids: batch rows) follow plain sampling's
    exact distribution of 3-token continuations (chi-square, tests/lossless.py)."""
    model = tiny_model("llama", vocab=8, seed=4)
    prompt = torch.tensor([[1, 2, 3]])
    temperature, top_k, top_p = 0.8, 6, 1.0
    exact = exact_sequence_distribution(model, prompt, 3, temperature, top_k, top_p)
    samples = []
    for seed in range(300):
        out = ref.vanilla_generate(model, prompt.expand(5, 3), 3, max_gen_len=3, eos_id=[], temperature=temperature,
                                   top_k=top_k, top_p=top_p, sampling="keyed", seed=seed).output_ids
        samples += [tuple(row) for row in out.tolist()]
    res = chi_square_test(samples, exact)
    assert res.pvalue > 1e-3, res
