"""draft_tree_capacity="auto" for LogitSpec (shared/capacity.py, both paths' resolve_capacity): the smaller
tree is the larger one's first insertions, the statistics and the choice, the decoders on "auto"."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from lossless import tiny_model

import specdec.fast.logitspec as flog
import specdec.ref as ref
import specdec.ref.logitspec as rlog
from specdec.ref.engine import RoundState, run_speculative
from specdec.ref.model import new_cache
from specdec.shared import tree_search as ts
from specdec.shared.capacity import (CAPACITY_CHOICES, CapacityStats, accepted_by_capacity, best_capacity,
                                     capacity_file_for, capacity_stats_of, default_capacity_stats)
from specdec.shared.retrieval import LogitSpecDrafter
from specdec.shared.sampling import SamplingParams
from specdec.shared.tree_search import CostModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _paths(draft, nodes=None) -> set[tuple[int, ...]]:
    """Each node's root-to-node token path (only ``nodes`` when given)."""
    toks, tree = draft.tokens.tolist(), draft.tree
    return {tuple(toks[j] for j in tree.path(i)) for i in range(tree.size) if nodes is None or i in nodes}


def test_a_smaller_capacity_is_the_first_insertions_of_a_larger_one():
    """The fact "auto" measures by: the trie of capacity c is exactly the nodes the trie of capacity C > c created
    first (insertion index <= c), for tie-heavy logits, a context with and without a branch 0, and budgets that
    cut the depth; a child is always inserted after its parent."""
    model = tiny_model("llama", vocab=100, seed=0, layers=1, hidden=16, heads=2, kv_heads=1)
    text = list(range(10, 40)) + list(range(40, 70)) + [10, 11] + list(range(12, 20)) + [10, 11]
    no_branch0 = list(range(10, 70)) + [99]
    g = torch.Generator().manual_seed(5)
    checked = 0
    for trial in range(5):
        logits = torch.randint(0, 4, (100,), generator=g).float()
        if trial % 2:
            logits[11], logits[41] = 9.0, 8.0
        for ctx in (text, no_branch0):
            for budget in (100, 3):
                state = RoundState(ctx, model, new_cache(model), logits, SamplingParams(), None, budget=budget)
                big = LogitSpecDrafter(3, 20, 64)
                d_big = big.propose(state)
                ids = big.insertion_ids
                assert sorted(ids) == list(range(d_big.tree.size)) and ids[0] == 0
                assert all(ids[d_big.tree.parents[j]] < ids[j] for j in range(1, d_big.tree.size))
                for c in (1, 2, 3, 5, 8, 17, 33, 63):
                    d_small = LogitSpecDrafter(3, 20, c).propose(state)
                    assert _paths(d_small) == _paths(d_big, {j for j in range(d_big.tree.size) if ids[j] <= c}), (trial, c)
                    checked += 1
    assert checked == 5 * 2 * 2 * 8


def test_accepted_by_capacity():
    assert accepted_by_capacity([1, 3, 9], [1, 2, 3, 8, 9, 64]) == [1, 1, 2, 2, 3, 3]
    assert accepted_by_capacity([], [1, 4]) == [0, 0]
    assert accepted_by_capacity([2], [1]) == [0]


def test_stats_of_a_run_give_its_own_tokens_per_round():
    """Counted from a greedy run at capacity C, E(C) is that run's own tokens per round, and E grows with c."""
    target = tiny_model("llama", vocab=48, layers=1, hidden=32, heads=2, kv_heads=1, seed=2, init_std=0.3)
    base = torch.randint(0, 48, (7,), generator=torch.Generator().manual_seed(1))
    prompt = torch.cat([base, base, base])[None]
    drafter, rounds, lengths = LogitSpecDrafter(3, 20, 24), [], []

    def hook(rec):
        rounds.append([drafter.insertion_ids[j] for j in rec.path[1:]])
        lengths.append(len(rec.path))   # accepted drafts + the target's own token
    res = run_speculative(target, drafter, prompt, prompt.shape[1], 40, eos_id=[], on_round=hook, tree_size=25)
    stats = CapacityStats.measure(rounds, [1, 4, 24])
    assert stats.rounds == len(lengths) == res.num - 1
    assert stats.expected_tokens(24) == pytest.approx(sum(lengths) / len(lengths))
    assert 1.0 <= stats.expected_tokens(1) <= stats.expected_tokens(4) <= stats.expected_tokens(24)
    assert stats.expected_tokens(100) == stats.expected_tokens(24)  # flat beyond what was measured


def test_stats_interpolate_validate_and_round_trip(tmp_path):
    s = CapacityStats((2, 6), (4, 8), rounds=4, meta={"x": 1})
    assert s.expected_tokens(1) == pytest.approx(1.5)      # from (0, 0) to (2, 1.0)
    assert s.expected_tokens(4) == pytest.approx(2.5)      # halfway from 1.0 to 2.0
    assert s.expected_tokens(6) == s.expected_tokens(50) == pytest.approx(3.0)
    f = tmp_path / "s.json"
    s.save(f)
    assert CapacityStats.load(f) == s and CapacityStats.load(f).meta == {"x": 1}
    bad = [((2, 1), (1, 2), 1, "strictly increasing"), ((1, 2), (3, 2), 1, "must not decrease"), ((1,), (1, 2), 1, "equal length"),
           ((0,), (0,), 1, "capacities must be ints >= 1"), ((1,), (-1,), 1, "accepted must be ints >= 0"), ((1,), (1,), 0, "rounds must be >= 1")]
    for caps, acc, rounds, msg in bad:
        with pytest.raises(ValueError, match=msg):
            CapacityStats(caps, acc, rounds)
    f.write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match=r"s\.json: stats: not a specdec LogitSpec acceptance file"):
        CapacityStats.load(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match=r"s\.json: not JSON"):
        CapacityStats.load(f)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        s.expected_tokens(0)


def test_best_capacity_small_when_verification_is_expensive_wide_when_cheap():
    """Fed cost curves: rows that cost as much as a step each (a CPU) -> a small tree; a flat curve (a GPU at
    small batch) -> the widest tree the statistics still reward; a tie -> the smaller capacity."""
    stats = CapacityStats((1, 4, 16, 64, 127), (40, 80, 100, 115, 120), rounds=100)   # E: 1.4, 1.8, 2.0, 2.15, 2.2
    steep = CostModel(((2, 2.0), (5, 5.0), (17, 17.0), (65, 65.0), (128, 128.0)))
    assert best_capacity(stats, steep) == 1
    mild = CostModel(((2, 1.0), (17, 1.1), (65, 1.6), (128, 2.2)))
    assert best_capacity(stats, mild) == 16
    flat = CostModel(((2, 1.0), (128, 1.0)))
    assert best_capacity(stats, flat) == 127
    assert best_capacity(stats, flat, max_capacity=50) == 48       # the most it may use
    plateau = CapacityStats((4, 8), (100, 100), rounds=100)         # 8 gains nothing over 4
    assert best_capacity(plateau, flat) == 4
    with pytest.raises(TypeError, match="stats must be a CapacityStats"):
        best_capacity({}, flat)
    with pytest.raises(TypeError, match="cost must be a CostModel"):
        best_capacity(stats, None)


def test_the_embedded_model_ships_its_curve():
    s = capacity_stats_of(ref.load_model("default"))
    assert s is not None and s == default_capacity_stats()
    assert s.capacities[-1] == max(CAPACITY_CHOICES) and s.rounds >= 100
    assert 1.0 < s.expected_tokens(1) < s.expected_tokens(64) < 8.0


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Cost models go to a private cache dir; calibration with short calls (one timing per capacity, 8 tokens)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(ts, "_PROCESS_COSTS", {})
    monkeypatch.setattr(rlog, "measure_capacity_cost", functools.partial(rlog.measure_capacity_cost, reps=1, max_gen_len=8))
    return tmp_path / "specdec" / "cost_models.json"


def test_auto_is_lossless_and_reports_the_capacity(private_cache):
    target = tiny_model("qwen2", vocab=40, layers=1, hidden=32, heads=2, kv_heads=1, seed=4, init_std=0.3, max_pos=1024)
    base = torch.randint(0, 40, (9,), generator=torch.Generator().manual_seed(2))
    ids = torch.cat([base, base, base[:4]])[None]
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=24, eos_id=[])
    vanilla = ref.vanilla_generate(target, **kw).output_ids
    res = ref.logitspec_generate(target, draft_tree_capacity="auto", **kw)
    assert torch.equal(res.output_ids, vanilla)
    assert res.draft_tree_capacity == rlog.resolve_capacity(target, "auto")   # the same cached cost, the same choice
    assert res.draft_tree_capacity in CAPACITY_CHOICES
    entries = json.loads(private_cache.read_text())
    assert len(entries) == 1 and next(iter(entries)).startswith("ref.logitspec|")
    assert {n for n, _ in CostModel.from_dict(next(iter(entries.values()))).verify} == {2, 5, 17, 65, 128}
    # an explicit capacity is reported as given; sampling in keyed mode stays vanilla's tokens
    assert ref.logitspec_generate(target, draft_tree_capacity=5, **kw).draft_tree_capacity == 5
    keyed = dict(kw, temperature=0.9, sampling="keyed", seed=11)
    assert torch.equal(ref.logitspec_generate(target, draft_tree_capacity="auto", **keyed).output_ids,
                       ref.vanilla_generate(target, **keyed).output_ids)


def test_resolve_capacity_one_rule_on_both_paths():
    """Both paths choose by the same rule from the same statistics and costs (no measurement when both are given);
    the fast path never goes past its 127 drafts."""
    target = tiny_model("llama", vocab=40, layers=1, hidden=32, heads=2, kv_heads=1, seed=4)
    stats = CapacityStats((1, 16, 127), (50, 120, 200), rounds=100)
    for cost in (CostModel(((2, 1.0), (128, 1.0))), CostModel(((2, 1.0), (17, 3.0), (128, 20.0)))):
        assert rlog.resolve_capacity(target, "auto", stats=stats, cost=cost) == flog.resolve_capacity(target, "auto", stats=stats, cost=cost)
    assert rlog.resolve_capacity(target, 7) == flog.resolve_capacity(target, 7) == 7


def test_bad_capacity_input():
    target, p = tiny_model("llama", vocab=16, layers=1, hidden=16, heads=2, kv_heads=1), torch.tensor([[1, 2, 3]])
    for fn in (ref.logitspec_generate, rlog.resolve_capacity, flog.resolve_capacity):
        args = (target, p, 3) if fn is ref.logitspec_generate else (target,)
        with pytest.raises(ValueError, match="draft_tree_capacity must be 'auto' or an int, got 'wide'"):
            fn(*args, draft_tree_capacity="wide")
        with pytest.raises(ValueError, match="draft_tree_capacity must be >= 1"):
            fn(*args, draft_tree_capacity=0)
        with pytest.raises(TypeError, match="draft_tree_capacity must be an int"):
            fn(*args, draft_tree_capacity=2.5)
    assert capacity_file_for("/x/model").endswith("logitspec_acceptance.json")
