"""tree_shape="auto" / gamma="auto" on the reference path: resolved before decoding, visible on the result,
lossless, with the draft's stored statistics and this device's measured (and cached) round costs."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from lossless import tiny_model

import specdec.ref as ref
from specdec.ref import glide as rglide
from specdec.shared import tree_search as ts
from specdec.shared.glide import init_glide_weights
from specdec.shared.tree_search import AcceptanceStats, CostModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 32


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Cost models go to a private cache dir, no memo of an earlier test is seen, and the device's costs
    are measured with the real decoder but short calls (one timing per shape, 8 tokens)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(ts, "_PROCESS_COSTS", {})
    monkeypatch.setattr(rglide, "measure_cost_model", functools.partial(rglide.measure_cost_model, reps=1, max_gen_len=8))
    return tmp_path / "specdec" / "cost_models.json"


def _pair(seed=3):
    target = tiny_model("llama", vocab=VOCAB, layers=1, hidden=32, heads=2, kv_heads=1, seed=seed, max_pos=512)
    return target, init_glide_weights(target.config, window=8, seed=seed + 1, std=0.5)


def test_auto_is_lossless_and_reports_the_shape(private_cache):
    target, glide = _pair()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, prompt_length=12, max_gen_len=20, eos_id=[])
    vanilla = ref.vanilla_generate(target, **kw).output_ids
    tree = ref.tree_spec_generate(target, glide, tree_shape="auto", **kw)
    assert torch.equal(tree.output_ids, vanilla)
    assert tree.tree_shape == rglide.resolve_tree_shape(target, glide, "auto")  # the same cached cost, the same shape
    assert sum(tree.tree_shape) <= ts.MAX_AUTO_NODES and max(tree.tree_shape) <= VOCAB
    chain = ref.spec_generate(target, glide, gamma="auto", **kw)
    assert torch.equal(chain.output_ids, vanilla)
    assert chain.tree_shape == (1,) * rglide.resolve_gamma(target, glide, "auto")
    # the device's costs were measured once and written to the cache
    entries = json.loads(private_cache.read_text())
    assert len(entries) == 1 and next(iter(entries)).startswith("ref.glide|")
    # an explicit shape / gamma is reported too, and None is LongSpec's default
    assert ref.tree_spec_generate(target, glide, tree_shape=(2, 2), **kw).tree_shape == (2, 2)
    assert ref.spec_generate(target, glide, gamma=3, **kw).tree_shape == (1, 1, 1)
    assert rglide.resolve_tree_shape(target, glide, None) == (4, 16, 16, 16, 16)


def test_auto_sampling_is_lossless_in_keyed_mode(private_cache):
    target, glide = _pair(seed=5)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    kw = dict(input_ids=ids, prompt_length=10, max_gen_len=16, eos_id=[], temperature=0.9, sampling="keyed", seed=11)
    want = ref.vanilla_generate(target, **kw).output_ids
    assert torch.equal(ref.tree_spec_generate(target, glide, tree_shape="auto", **kw).output_ids, want)


def test_auto_uses_the_drafts_statistics_and_the_cost_curve(private_cache):
    target, glide = _pair()
    steep = CostModel([(1, 1.0), (2, 2.0), (128, 128.0)], level_fixed=0.1)
    flat = CostModel([(1, 1.0), (128, 1.0)])
    assert sum(rglide.resolve_tree_shape(target, glide, "auto", cost=steep)) == 1
    wide = rglide.resolve_tree_shape(target, glide, "auto", cost=flat)
    assert sum(wide) == ts.MAX_AUTO_NODES and max(wide) <= VOCAB  # the prior: 8 levels, capped by the vocabulary
    # statistics stored with the draft win over the prior: a draft whose guesses are only ever right at rank 0
    glide.acceptance = AcceptanceStats([[[0.9]], [[0.9]], [[0.9]]])
    assert rglide.resolve_tree_shape(target, glide, "auto", cost=flat) == (1, 1, 1)
    assert rglide.resolve_gamma(target, glide, "auto", cost=flat) == 3
    assert not private_cache.exists()  # an explicit cost measures nothing


def test_bad_auto_arguments(private_cache):
    target, glide = _pair()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="tree_shape"):
        ref.tree_spec_generate(target, glide, ids, 3, tree_shape="autox")
    with pytest.raises(ValueError, match="gamma"):
        ref.spec_generate(target, glide, ids, 3, gamma="automatic")
    with pytest.raises(ValueError, match="tree_shape"):
        rglide.resolve_tree_shape(target, glide, "")
    other = tiny_model("llama", vocab=VOCAB, layers=1, hidden=64, heads=2, kv_heads=1, seed=9)
    with pytest.raises(ValueError, match="does not match"):
        rglide.resolve_tree_shape(other, glide, "auto")  # checked before anything is measured
    assert not private_cache.exists()
