"""Position-keyed sampling on the fast path (``sampling="keyed"``): every fast decoder emits exactly keyed
vanilla decoding's tokens, and fast == ref in fp32.

On a CPU the Triton kernels run under the interpreter (about a second per decoding call), so this
checks 2 seeds x 1 prompt (two sampling configs) per decoder; tests/ref/test_keyed_sampling_decoders.py
covers the many-seed matrix on the reference, whose decoders use the same shared key, acceptance
rule (``shared/round.accept_draft``) and drafting rules.
"""

from __future__ import annotations

import pytest
import torch

import specdec.fast as fast
import specdec.ref as ref
from lossless import tiny_model
from specdec.shared.glide import init_glide_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 64
PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8]


def _pair(seed):
    m = tiny_model("llama", vocab=VOCAB, layers=1, hidden=128, heads=2, kv_heads=1, seed=seed, init_std=0.3, max_pos=2048)
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
        # the fast GLIDE drafter's beam is not yet ranked by the keyed noise: other drafts, same output
        ("tree_spec", lambda **kw: ref.tree_spec_generate(target, glide, tree_shape=(2, 2), **kw),
         lambda **kw: fast.tree_spec_generate(ftarget, glide, tree_shape=(2, 2), **kw), False),
        ("spec", lambda **kw: ref.spec_generate(target, glide, gamma=2, **kw),
         lambda **kw: fast.spec_generate(ftarget, glide, gamma=2, **kw), False),
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
