"""tree_shape="auto" / gamma="auto" on the fast path: the same resolution as the reference's, lossless.

On a CPU the kernels run in the Triton interpreter (about a second per round), so the decoding tests hand the
resolver a cost curve instead of measuring one; one short test drives the real measurement.
"""

from __future__ import annotations

import pytest
import torch
from lossless import tiny_model

import specdec.fast as fast
import specdec.ref as ref
from specdec.fast.glide import decoders as fdec
from specdec.shared import tree_search as ts
from specdec.shared.glide import init_glide_weights, save_glide
from specdec.shared.tree_search import AcceptanceStats, CostModel

VOCAB = 64
FLAT = CostModel([(1, 1.0), (128, 1.0)])
# a draft right at rank 0 or 1 only, two levels deep: under a flat cost the best beam is (2, 2), the best chain 2
STATS = AcceptanceStats([[[0.5, 0.3]], [[0.5, 0.3], [0.4, 0.3]]])


def _models(seed=1):
    m = tiny_model("llama", vocab=VOCAB, layers=1, hidden=128, heads=2, kv_heads=1, seed=seed, init_std=0.3, max_pos=2048)
    return m, fast.as_fast_model(m), init_glide_weights(m.config, window=8, seed=seed + 1, std=0.3)


@pytest.fixture
def flat_device(monkeypatch):
    """The fast path's device costs are a flat curve (counted, never measured)."""
    asked = []
    monkeypatch.setattr(fdec, "device_cost_model", lambda target, glide, cache=True: asked.append(1) or FLAT)
    return asked


def test_fast_auto_is_lossless_and_matches_ref(flat_device):
    target, ftarget, glide = _models()
    glide.acceptance = STATS
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 5, 6, 7]])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=6, eos_id=[])
    res = fast.tree_spec_generate(ftarget, glide, tree_shape="auto", **kw)
    assert res.tree_shape == (2, 2) and flat_device
    want = ref.vanilla_generate(target, **kw).output_ids
    assert torch.equal(res.output_ids, want)
    assert torch.equal(ref.tree_spec_generate(target, glide, tree_shape=(2, 2), **kw).output_ids, res.output_ids)
    chain = fast.spec_generate(ftarget, glide, gamma="auto", **dict(kw, max_gen_len=3))
    assert chain.tree_shape == (1, 1) and torch.equal(chain.output_ids, want[:, :3])
    assert fdec.resolve_tree_shape(ftarget, glide, None) == (4, 16, 16, 16, 16)


def test_fast_auto_finds_statistics_next_to_the_checkpoint(flat_device, tmp_path):
    """fast.load_glide returns fused weights without the field: the file next to the checkpoint is read."""
    target, ftarget, glide = _models(seed=3)
    glide.acceptance = STATS
    d = save_glide(glide, tmp_path / "glide")
    fg = fast.load_glide(d, target=ftarget)
    assert ts.acceptance_of(fg) == STATS
    assert fdec.resolve_tree_shape(ftarget, fg, "auto") == (2, 2)
    assert fdec.resolve_gamma(ftarget, fg, "auto") == 2
    with pytest.raises(ValueError, match="tree_shape"):
        fast.tree_spec_generate(ftarget, fg, torch.tensor([[1, 2]]), 2, tree_shape="autox")
    with pytest.raises(ValueError, match="gamma"):
        fast.spec_generate(ftarget, fg, torch.tensor([[1, 2]]), 2, gamma="auto-4")


def test_fast_cost_measurement_runs_the_decoder(tmp_path, monkeypatch):
    """The real measurement, cut to two shapes of one round each (the interpreter is slow)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, ftarget, glide = _models(seed=5)
    cost = fdec.measure_cost_model(ftarget, glide, reps=1, shapes=[(3,), (1, 1)], max_gen_len=2, prompt_length=8)
    assert [n for n, _ in cost.verify] == [4] and cost.meta["path"] == "fast"
    assert cost.round_time((1, 1)) > 0


def test_fast_calibration_times_both_sides_of_every_row_tile_limit():
    """On CUDA the calibration verifies r and r + 1 nodes at each limit r of the row GEMM's tiles (the
    verification's cost steps there, and interpolating across the step priced a 33-node tree's round 10 % low);
    on a CPU the reduced set is unchanged. Every shape fits the search's node limit."""
    from specdec.fast.kernels.rowgemm import row_tile_limits

    gpu = fdec.calibration_shapes(4096, cpu=False)
    verified = {1 + s[0] for s in gpu if len(s) == 1}
    for r in row_tile_limits():
        assert {r, r + 1} <= verified, (r, sorted(verified))
    assert set(ts.CALIBRATION_SHAPES) <= set(gpu) and len(set(gpu)) == len(gpu)
    assert all(sum(s) <= ts.MAX_AUTO_NODES for s in gpu)
    assert fdec.calibration_shapes(4096, cpu=True) == list(fdec.CPU_CALIBRATION_SHAPES)


def test_fast_logitspec_capacity_auto_is_lossless_and_matches_ref(monkeypatch):
    """LogitSpec with draft_tree_capacity="auto" on the fast path: the capacity both paths choose from the same
    costs (a steep curve -> a small tree), reported on the result, and vanilla's tokens."""
    import specdec.fast.logitspec as flog
    import specdec.ref.logitspec as rlog

    steep = CostModel([(2, 1.0), (5, 1.3), (17, 4.0), (65, 16.0), (128, 32.0)])
    monkeypatch.setattr(flog, "device_capacity_cost", lambda target, cache=True: steep)
    monkeypatch.setattr(rlog, "device_capacity_cost", lambda target, cache=True: steep)
    target, ftarget, _ = _models(seed=3)
    base = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(4))
    ids = torch.cat([base, base, base[:3]])[None]
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=10, eos_id=[])
    res = fast.logitspec_generate(ftarget, draft_tree_capacity="auto", **kw)
    want = ref.logitspec_generate(target, draft_tree_capacity="auto", **kw)
    assert res.draft_tree_capacity == want.draft_tree_capacity < 16
    assert torch.equal(res.output_ids, want.output_ids)
    assert torch.equal(res.output_ids, ref.vanilla_generate(target, **kw).output_ids)
