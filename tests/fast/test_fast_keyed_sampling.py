"""Position-keyed sampling on the fast path (``sampling="keyed"``): every fast decoder emits exactly keyed
vanilla decoding's tokens, and fast == ref in fp32 -- the GLIDE beam ranked by the keyed noise included
(same drafted trees and acceptance as the reference, and more accepted than without the noise).

On a CPU the Triton kernels run under the interpreter (about a second per decoding call), so this
checks 2 seeds x 1 prompt (two sampling configs) per decoder; tests/ref/test_keyed_sampling_decoders.py
covers the many-seed matrix on the reference, whose decoders use the same shared key, acceptance
rule (``shared/round.accept_draft``) and drafting rules.
"""

from __future__ import annotations

import pytest
import torch

import specdec.fast as fast
import specdec.fast.glide.drafter as fast_drafter
import specdec.ref as ref
from lossless import tiny_model
from specdec.shared.glide import init_glide_weights
from specdec.shared.sampling import process_logits

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 64
PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8]


def _pair(seed):
    # hidden 64 (head_dim 32): the interpreter's work per pass is half of hidden 128's
    m = tiny_model("llama", vocab=VOCAB, layers=1, hidden=64, heads=2, kv_heads=1, seed=seed, init_std=0.3, max_pos=2048)
    return m, fast.as_fast_model(m)


@pytest.fixture(scope="module")
def models():
    target, ftarget = _pair(1)
    draft, fdraft = _pair(2)
    glide = init_glide_weights(target.config, window=8, seed=3, std=0.3)
    return target, ftarget, draft, fdraft, glide


def _decoders(target, ftarget, draft, fdraft, glide):
    """(name, ref call, fast call, same drafts on both paths?) for every speculative decoder."""
    return [
        ("speculative", lambda **kw: ref.speculative_generate(target, draft, gamma=3, **kw),
         lambda **kw: fast.speculative_generate(ftarget, fdraft, gamma=3, **kw), True),
        ("magicdec", lambda **kw: ref.magicdec_generate(target, gamma=3, sink_tokens=1, window=4, **kw),
         lambda **kw: fast.magicdec_generate(ftarget, gamma=3, sink_tokens=1, window=4, **kw), True),
        ("pld", lambda **kw: ref.pld_generate(target, num_pred_tokens=3, **kw),
         lambda **kw: fast.pld_generate(ftarget, num_pred_tokens=3, **kw), True),
        ("logitspec", lambda **kw: ref.logitspec_generate(target, draft_tree_capacity=6, num_pred_tokens=3, **kw),
         lambda **kw: fast.logitspec_generate(ftarget, draft_tree_capacity=6, num_pred_tokens=3, **kw), True),
        # both GLIDE beams are ranked by the draft's processed log-probs + the keyed noise: the same trees
        ("tree_spec", lambda **kw: ref.tree_spec_generate(target, glide, tree_shape=(2, 2), **kw),
         lambda **kw: fast.tree_spec_generate(ftarget, glide, tree_shape=(2, 2), **kw), True),
        ("spec", lambda **kw: ref.spec_generate(target, glide, gamma=2, **kw),
         lambda **kw: fast.spec_generate(ftarget, glide, gamma=2, **kw), True),
    ]


@pytest.mark.parametrize("seed,temperature,top_k,top_p", [(0, 1.0, 0, 1.0), (1, 0.7, 5, 0.9)])
def test_fast_decoders_emit_keyed_vanillas_tokens(models, seed, temperature, top_k, top_p):
    target, ftarget, draft, fdraft, glide = models
    ids = torch.tensor([PROMPT])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=6, eos_id=[], temperature=temperature,
              top_k=top_k, top_p=top_p, sampling="keyed", seed=seed)
    want = ref.vanilla_generate(target, **kw).output_ids
    assert torch.equal(fast.vanilla_generate(ftarget, **kw).output_ids, want)
    for name, r, f, same_drafts in _decoders(target, ftarget, draft, fdraft, glide):
        rr, ff = r(**kw), f(**kw)
        assert torch.equal(rr.output_ids, want), name
        assert torch.equal(ff.output_ids, want), name
        if same_drafts:  # same drafts, same keyed acceptance, round by round
            assert ff.accept_lengths == rr.accept_lengths, name


def test_fast_keyed_seed_resolution_greedy_and_bad_args(models):
    target, ftarget, _, _, _ = models
    ids = torch.tensor([PROMPT])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=4, eos_id=[], temperature=1.0, sampling="keyed")
    # the generator's initial seed is the key, exactly as on the reference
    want = ref.vanilla_generate(target, seed=5, **kw).output_ids
    assert torch.equal(fast.vanilla_generate(ftarget, generator=torch.Generator().manual_seed(5), **kw).output_ids, want)
    # keyed at temperature 0 is greedy decoding
    greedy = dict(kw, temperature=0.0)
    assert torch.equal(fast.pld_generate(ftarget, num_pred_tokens=3, seed=5, **greedy).output_ids,
                       ref.vanilla_generate(target, **{**greedy, "sampling": "rejection"}).output_ids)
    bad = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=2, temperature=1.0)
    for decode in (lambda **k: fast.vanilla_generate(ftarget, **k), lambda **k: fast.pld_generate(ftarget, **k)):
        with pytest.raises(ValueError, match="sampling"):
            decode(sampling="bogus", **bad)
        with pytest.raises(TypeError, match="seed"):
            decode(sampling="keyed", seed="x", **bad)
        with pytest.raises(ValueError, match="seed"):
            decode(sampling="keyed", seed=-1, **bad)


# ---------------------------------------------------------------------------------------------
# The fast GLIDE beam is coupled to the keyed noise exactly as the reference's (ref/glide.py)
# ---------------------------------------------------------------------------------------------

GLIDE_PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8],
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3],  # 16 tokens + 10 new > 2 * window: the draft window slides
]


@pytest.fixture(scope="module")
def flat_models():
    """A vocabulary-16 target and GLIDE draft with small weights (flat distributions): keyed drafts are
    accepted often, unkeyed ones rarely -- what the coupling tests need to see a difference."""
    target = tiny_model("llama", vocab=16, layers=1, hidden=64, heads=2, kv_heads=1, seed=1, init_std=0.05, max_pos=2048)
    glide = init_glide_weights(target.config, window=8, seed=3, std=0.05)
    return target, fast.as_fast_model(target), glide


def _glide_rounds(decode, **kw):
    """Run ``decode`` and record every round's drafted tree (tokens, parents) and accepted path."""
    rounds = []
    res = decode(on_round=lambda r: rounds.append((r.draft.tokens.tolist(), list(r.draft.tree.parents), r.path)), **kw)
    return res, rounds


@pytest.mark.parametrize("mode,seeds,temperature,top_k,top_p", [
    ("tree", (0, 1, 2), 1.0, 0, 1.0),
    ("tree", (3, 4), 0.7, 5, 0.9),
    ("chain", (5, 6), 1.0, 0, 0.95),
])
def test_fast_glide_keyed_trees_equal_ref_trees(flat_models, mode, seeds, temperature, top_k, top_p):
    """Round by round the fast drafter proposes exactly the reference's keyed trees (tokens and parents),
    the target accepts the same paths, and the output is keyed vanilla's."""
    target, ftarget, glide = flat_models
    if mode == "tree":
        r_dec = lambda **kw: ref.tree_spec_generate(target, glide, tree_shape=(2, 3, 2), **kw)  # noqa: E731
        f_dec = lambda **kw: fast.tree_spec_generate(ftarget, glide, tree_shape=(2, 3, 2), **kw)  # noqa: E731
    else:
        r_dec = lambda **kw: ref.spec_generate(target, glide, gamma=3, **kw)  # noqa: E731
        f_dec = lambda **kw: fast.spec_generate(ftarget, glide, gamma=3, **kw)  # noqa: E731
    accepted = 0
    for i, seed in enumerate(seeds):
        ids = torch.tensor([GLIDE_PROMPTS[i % len(GLIDE_PROMPTS)]])
        kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=10, eos_id=[], temperature=temperature,
                  top_k=top_k, top_p=top_p, sampling="keyed", seed=seed)
        want = ref.vanilla_generate(target, **kw).output_ids
        rr, r_rounds = _glide_rounds(r_dec, **kw)
        ff, f_rounds = _glide_rounds(f_dec, **kw)
        assert torch.equal(rr.output_ids, want) and torch.equal(ff.output_ids, want), seed
        assert f_rounds == r_rounds, seed
        assert ff.accept_lengths == rr.accept_lengths and ff.count == rr.count, seed
        accepted += ff.count
    assert accepted > 0  # the paths compared are not all empty


def test_fast_glide_keyed_beam_needs_the_noise(flat_models, monkeypatch):
    """Drop the keyed noise from the fast beam (rank the processed log-probs alone, as the drafter did before
    the coupling): the output stays keyed vanilla's (verification is keyed), but the trees are no longer the
    reference's and far fewer drafts are accepted."""
    target, ftarget, glide = flat_models

    def run(seed):
        ids = torch.tensor([GLIDE_PROMPTS[seed % 2]])
        kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=12, eos_id=[], temperature=1.0,
                  sampling="keyed", seed=seed)
        res, rounds = _glide_rounds(lambda **k: fast.tree_spec_generate(ftarget, glide, tree_shape=(2, 2), **k), **kw)
        assert torch.equal(res.output_ids, ref.vanilla_generate(target, **kw).output_ids)
        return res.count, rounds, kw

    seeds = (0, 1, 2)
    coupled = [run(s) for s in seeds]
    ref_rounds = [_glide_rounds(lambda **k: ref.tree_spec_generate(target, glide, tree_shape=(2, 2), **k), **kw)[1]
                  for _, _, kw in coupled]
    assert [rounds for _, rounds, _ in coupled] == ref_rounds

    def no_noise(logits, temperature, top_k, top_p, key, positions):
        return torch.log_softmax(process_logits(logits.float(), temperature, top_k, top_p), dim=-1)

    monkeypatch.setattr(fast_drafter, "keyed_logprobs", no_noise)
    uncoupled = [run(s) for s in seeds]
    assert [rounds for _, rounds, _ in uncoupled] != ref_rounds
    with_noise, without = sum(c for c, _, _ in coupled), sum(c for c, _, _ in uncoupled)
    assert with_noise >= 2 * without + 4, (with_noise, without)


@pytest.mark.gpu
def test_gpu_fast_glide_keyed_graphs_serve_every_seed():
    """On CUDA the keyed beam runs inside the captured round graphs: the key travels in the round's device
    pack, so one set of graphs serves every seed; the output is keyed vanilla's and the trees are the
    reference's in almost every round (TF32 dots may swap near-tied candidates, as in the greedy test)."""
    from specdec.fast.glide import as_fast_glide

    target = tiny_model("llama", vocab=VOCAB, layers=2, hidden=128, heads=2, kv_heads=1, seed=31, init_std=0.3, max_pos=2048)
    target.weights = {k: v.to("cuda") for k, v in target.weights.items()}
    ftarget = fast.as_fast_model(target)
    glide = init_glide_weights(target.config, seed=32, std=0.3, device="cuda")
    fglide = as_fast_glide(glide)
    assert ftarget.use_graphs
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    shape = (2, 4, 4)
    same = total = 0
    for seed in range(3):
        kw = dict(input_ids=ids, prompt_length=40, max_gen_len=24, eos_id=[], temperature=1.0, sampling="keyed", seed=seed)
        want = ref.vanilla_generate(target, **kw).output_ids
        r_rounds, f_rounds = [], []
        rr = ref.tree_spec_generate(target, glide, tree_shape=shape, on_round=lambda r: r_rounds.append(r.draft.tokens.tolist()), **kw)
        ff = fast.tree_spec_generate(ftarget, fglide, tree_shape=shape, on_round=lambda r: f_rounds.append(r.draft.tokens.tolist()), **kw)
        assert torch.equal(rr.output_ids, want) and torch.equal(ff.output_ids, want), seed
        if len(r_rounds) == len(f_rounds):
            same += sum(a == b for a, b in zip(f_rounds, r_rounds))
        total += len(r_rounds)
    assert same >= 0.8 * total, (same, total)
    # graphs were captured for the keyed rounds (one per catch-up length), not once per seed
    keyed = [k for k in fglide.runtime.graphs if k.sampling is not None]
    assert 0 < len(keyed) <= len(shape) + 1, keyed


def test_fast_longspec_classes_pass_sampling_and_seed(tmp_path):
    """``fast.LlamaGlide``'s methods take ``sampling`` / ``seed`` / ``generator`` like the functions: with the
    same seed they emit keyed vanilla's tokens (the reference's); bad values raise the decoders' errors."""
    from helpers import make_tiny_model_dir

    from specdec.shared.glide import save_glide

    target_dir = make_tiny_model_dir(tmp_path, family="llama", vocab=VOCAB, layers=1, heads=2, kv_heads=1,
                                     hidden=64, head_dim=32, seed=7)
    glide_dir = save_glide(init_glide_weights(ref.load_model(target_dir).config, seed=8, std=0.3), tmp_path / "glide")
    model = fast.LlamaGlide(None, target_dir, str(glide_dir))
    ids = torch.tensor([PROMPT])
    n = ids.shape[1]
    for seed, temperature in ((0, 1.0), (1, 0.7)):
        kw = dict(max_gen_len=5, eos_id=[], temperature=temperature, sampling="keyed", seed=seed)
        want = ref.vanilla_generate(ref.load_model(target_dir), ids, n, **kw).output_ids
        assert torch.equal(model.vanilla_generate(ids, n, **kw)[0], want)
        assert torch.equal(model.tree_spec_generate(ids, n, tree_shape=[2, 2], **kw)[0], want), seed
        assert torch.equal(model.spec_generate(ids, n, gamma=2, **kw)[0], want), seed
        assert torch.equal(model.magicdec_generate(ids, n, gamma=2, sink_tokens=1, window=4, **kw)[0], want), seed
    kw = dict(max_gen_len=5, eos_id=[], temperature=1.0, sampling="keyed")
    assert torch.equal(model.spec_generate(ids, n, gamma=2, generator=torch.Generator().manual_seed(1), **kw)[0],
                       model.spec_generate(ids, n, gamma=2, seed=1, **kw)[0])
    for method in ("tree_spec_generate", "spec_generate", "magicdec_generate", "vanilla_generate"):
        call = getattr(model, method)
        with pytest.raises(TypeError, match="seed"):
            call(ids, n, max_gen_len=2, eos_id=[], temperature=1.0, sampling="keyed", seed=2.5)
        with pytest.raises(ValueError, match="seed"):
            call(ids, n, max_gen_len=2, eos_id=[], temperature=1.0, sampling="keyed", seed=2**63)
        with pytest.raises(ValueError, match="sampling"):
            call(ids, n, max_gen_len=2, eos_id=[], temperature=1.0, sampling="bogus")
