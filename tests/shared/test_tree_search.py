"""specdec.shared.tree_search: acceptance statistics, round costs and the search for the best beam shape."""

from __future__ import annotations

import itertools
import json
import random
from types import SimpleNamespace

import pytest

from specdec.shared import tree_search as ts
from specdec.shared.tree import Tree
from specdec.shared.tree_search import DEFAULT_PRIOR, AcceptanceStats, CostModel, best_gamma, best_tree_shape, tokens_per_second


def _record(parents, path):
    return SimpleNamespace(draft=SimpleNamespace(tree=Tree(tuple(parents))), path=list(path))


def _random_stats(rng: random.Random, depth: int, width: int) -> AcceptanceStats:
    def row(n):
        x = [rng.random() for _ in range(n)]
        z = sum(x) / rng.uniform(0.2, 1.0)
        return [v / z for v in x]

    levels = [[row(rng.randint(1, width))]]
    levels += [[row(rng.randint(1, width)) for _ in range(rng.randint(1, width))] for _ in range(depth - 1)]
    return AcceptanceStats(levels)


# ---------------------------------------------------------------------------------------------
# Expected tokens
# ---------------------------------------------------------------------------------------------


def test_expected_tokens_is_the_nested_product():
    st = AcceptanceStats([
        [[0.5, 0.2, 0.1]],                      # root -> level 1 (one row: the root level holds one node)
        [[0.6, 0.1], [0.4, 0.2, 0.1]],          # level 1 -> 2, after a level 1 of width 1 / of width >= 2
    ])
    assert st.expected_tokens((1,)) == pytest.approx(1.5)
    assert st.expected_tokens((2, 1)) == pytest.approx(1 + 0.7 * (1 + 0.4))
    assert st.expected_tokens((1, 2)) == pytest.approx(1 + 0.5 * (1 + 0.7))
    assert st.expected_tokens((3, 3, 9)) == pytest.approx(1 + 0.8 * (1 + 0.7))  # depth 3 was never measured: adds 0
    assert st.level_mass(1, 7, 99) == pytest.approx(0.7)  # rows past the last repeat it, ranks past a row add 0


def test_prior_is_geometric_and_documented():
    row = DEFAULT_PRIOR.accept[0][0]
    assert row[0] == pytest.approx(0.48, abs=1e-3) and sum(row) == pytest.approx(0.8)
    assert DEFAULT_PRIOR.depth == 8 and DEFAULT_PRIOR.widths == (16,) * 8
    # the default LongSpec tree under the prior: between 3 and 4 tokens per round
    assert 3 < DEFAULT_PRIOR.expected_tokens((4, 16, 16, 16, 16)) < 4


# ---------------------------------------------------------------------------------------------
# Measuring acceptance from rounds
# ---------------------------------------------------------------------------------------------

# A wide tree of shape (2, 3): level 1 = nodes 1, 2 (children of the root), level 2 = nodes 3, 4, 5 ranked
# best first; node 3 is a child of node 2, nodes 4 and 5 of node 1.
WIDE = [-1, 0, 0, 2, 1, 1]


def test_from_rounds_counts_ranks_in_the_simulated_narrow_beams():
    rounds = [
        _record(WIDE, [0, 1, 4]),  # rank 0 at level 1; at level 2 rank 1 of the full beam, rank 0 of the 1-wide one
        _record(WIDE, [0, 2, 3]),  # rank 1 at level 1 (not in the 1-wide beam); rank 0 at level 2
        _record(WIDE, [0]),        # nothing accepted
        _record(WIDE, [0, 1]),     # level 1 rank 0, then stopped
    ]
    st = AcceptanceStats.from_rounds(rounds)
    assert st.rounds == 4
    assert st.reached[0] == (4,) and st.through[0] == ((2, 1),)  # level 1: ranks 0, 1, 0 -> counts [2, 1]
    assert st.accept[0][0] == pytest.approx((0.5, 0.25))
    # level 2, 1-wide beam (level 1 = {node 1}): its candidates are nodes 4, 5. Rounds 1 and 4 reached
    # node 1; round 1 continued through node 4 = rank 0.
    assert st.reached[1][0] == 2 and st.through[1][0] == (1,)
    # level 2, 2-wide beam (level 1 = {1, 2}): candidates 3, 4, 5 in order. Rounds 1, 2, 4 reached level 1;
    # round 1 continued via node 4 (rank 1), round 2 via node 3 (rank 0).
    assert st.reached[1][1] == 3 and st.through[1][1] == (1, 1)
    assert st.accept[1][1] == pytest.approx((1 / 3, 1 / 3))
    # expected tokens = what these rounds did, for the full tree and for the chain the tree contains
    assert st.expected_tokens((2, 3)) == pytest.approx((3 + 3 + 1 + 2) / 4)
    assert st.expected_tokens((1, 1)) == pytest.approx((3 + 1 + 1 + 2) / 4)


def test_from_rounds_skips_levels_a_round_did_not_draft_and_round_trips_through_json(tmp_path):
    # the last rounds of a call draft fewer levels (the budget): they count only for the levels they drafted
    rounds = [_record(WIDE, [0, 1, 4]), _record([-1, 0, 0], [0, 1])]
    st = AcceptanceStats.from_rounds(rounds, meta={"note": "x"})
    assert st.reached[0] == (2,) and st.reached[1] == (1, 1, 1)  # p = 1..3 (the widest level)
    f = st.save(tmp_path)
    assert f.endswith(ts.ACCEPTANCE_FILE)
    back = AcceptanceStats.load(tmp_path)
    assert back == st and back.meta == {"note": "x"}
    assert AcceptanceStats.from_dict(DEFAULT_PRIOR.to_dict()) == DEFAULT_PRIOR  # probabilities only (no counts)


def test_from_rounds_with_real_round_records():
    from specdec.shared.round import Draft, RoundRecord

    import torch

    rec = RoundRecord(Draft(torch.tensor([5, 6, 7, 8, 9, 10]), Tree(tuple(WIDE))), [0, 2, 3], 11)
    st = AcceptanceStats.from_rounds([rec])
    assert st.accept[0][0] == pytest.approx((0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Round cost
# ---------------------------------------------------------------------------------------------


def test_cost_model_interpolates_and_never_falls_with_size():
    c = CostModel([(2, 1.0), (10, 3.0), (20, 2.5)], level_fixed=0.5, level_per_node=0.1)
    assert c.verify == ((2, 1.0), (10, 3.0), (20, 3.0))  # noise must not make a bigger tree look cheaper
    assert c.verify_time(1) == 1.0 and c.verify_time(6) == pytest.approx(2.0) and c.verify_time(40) == pytest.approx(3.0)
    assert CostModel([(2, 1.0), (4, 2.0)]).verify_time(8) == pytest.approx(4.0)  # last slope beyond the last point
    # (2, 3, 4): 10 nodes, two drafted levels of 2 and 3 nodes
    assert c.round_time((2, 3, 4)) == pytest.approx(3.0 + 2 * 0.5 + 0.1 * 5)


def test_cost_model_fit_recovers_the_model():
    truth = CostModel([(2, 1.0), (8, 1.5), (32, 2.5), (128, 6.0)], level_fixed=0.25, level_per_node=0.01)
    shapes = [(1,), (7,), (31,), (127,), (1, 1, 1, 1), (1,) * 8, (1, 16, 1), (1, 64, 1)]
    fitted = CostModel.fit([(s, truth.round_time(s)) for s in shapes], meta={"device": "test"})
    assert fitted.verify == truth.verify
    assert fitted.level_fixed == pytest.approx(0.25) and fitted.level_per_node == pytest.approx(0.01)
    assert CostModel.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted
    # a negative excess (noise) clips at zero instead of going negative
    assert CostModel.fit([((1,), 1.0), ((1, 1), 0.9)]).level_fixed == 0.0


def test_measure_cost_model_times_each_shape():
    calls = []

    def time_round(shape):
        calls.append(shape)
        return 1.0 + 0.01 * sum(shape) + 0.2 * (len(shape) - 1)

    c = ts.measure_cost_model(time_round, [(1,), (15,), (1, 1, 1)], reps=3, warmup=1)
    assert calls.count((15,)) == 4
    assert c.level_fixed == pytest.approx(0.2, abs=1e-9)
    assert ts.calibration_shapes(8) == [(1,), (3,), (7,), (1, 1, 1, 1), (1,) * 8]  # level 1 <= 8, level 2 <= 8 x level 1


def test_measure_cost_model_keeps_the_fastest_repeat_and_round_timer_the_median_gap(monkeypatch):
    """Interference only adds time: a shape's cost is its fastest repeat (a slowed call does not move the fitted
    level cost), and within a call the median gap between full-depth rounds (a slowed round does not either).
    The repeats are passes over all shapes: a slow spell hits one call of each shape, not every call of one."""
    order = []
    slow = iter([5.0, 1.4 + 9.0, 1.6, 1.2, 1.4, 1.6 + 3.0])   # pass 1: (1,) (1, 1) slowed, (1, 1, 1); pass 2

    def time_round(shape):
        order.append(shape)
        return next(slow)

    c = ts.measure_cost_model(time_round, [(1,), (1, 1), (1, 1, 1)], reps=2)
    assert order == [(1,), (1, 1), (1, 1, 1)] * 2
    assert c.verify_time(2) == pytest.approx(1.2) and c.level_fixed == pytest.approx(0.2) and c.level_per_node == 0.0

    clock = iter([0.0, 1.0, 2.0, 9.0, 10.0, 11.0])           # gaps 1, 1, 7 (a slowed round), 1, 1

    class Rec:
        def __init__(self, depth):
            self.draft = type("D", (), {"tree": type("T", (), {"depth": [0] + [depth]})()})()

    def generate(ids, p, tree_shape, max_gen_len, eos_id, on_round):
        for _ in range(6):
            on_round(Rec(len(tree_shape)))
        return type("R", (), {"elapsed_time": 99.0, "num": 7})()

    monkeypatch.setattr(ts.time, "perf_counter", lambda: next(clock))
    assert ts.round_timer(generate, 16, 64, stamps=True, prompt_length=8, max_gen_len=4)((1,)) == 1.0


def test_cost_cache_per_process_and_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(ts, "_PROCESS_COSTS", {})
    made = []

    def measure():
        made.append(1)
        return CostModel([(2, 1.0 + len(made))])

    a = ts.cached_cost_model("k", measure)
    assert ts.cached_cost_model("k", measure) is a and len(made) == 1  # once per process
    path = tmp_path / "specdec" / "cost_models.json"
    assert json.loads(path.read_text())["k"]["verify"] == [[2, 2.0]]
    monkeypatch.setattr(ts, "_PROCESS_COSTS", {})  # a new process reads the file
    assert ts.cached_cost_model("k", measure) == a and len(made) == 1
    assert ts.cached_cost_model("k", measure, cache=False).verify == ((2, 3.0),) and len(made) == 2  # no cache: measure again
    assert json.loads(path.read_text())["k"]["verify"] == [[2, 2.0]]  # ... and leave the file alone
    path.write_text("{corrupt")
    monkeypatch.setattr(ts, "_PROCESS_COSTS", {})
    assert ts.cached_cost_model("k", measure).verify == ((2, 4.0),)  # a corrupt cache is measured over and rewritten
    assert ts.cost_cache_path() == str(path)
    assert "threads" in ts.device_description("cpu")


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def test_expensive_verification_picks_a_small_tree_and_a_flat_cost_a_wide_one():
    steep = CostModel([(1, 1.0), (2, 2.0), (128, 128.0)], level_fixed=0.05)  # every verified node costs a step
    small = best_tree_shape(DEFAULT_PRIOR, steep)
    assert sum(small) <= 2
    flat = CostModel([(1, 1.0), (128, 1.0)])  # verification costs the same at any size, levels are free
    wide = best_tree_shape(DEFAULT_PRIOR, flat)
    assert sum(wide) == ts.MAX_AUTO_NODES and len(wide) == DEFAULT_PRIOR.depth
    # a GPU-like curve with a price per level: in between
    mid = best_tree_shape(DEFAULT_PRIOR, CostModel([(2, 1.0), (64, 1.1), (128, 1.6)], level_fixed=0.12))
    assert sum(small) < sum(mid) < sum(wide)
    assert best_tree_shape(DEFAULT_PRIOR, flat, max_nodes=20, max_depth=3) == best_tree_shape(DEFAULT_PRIOR, flat, 20, 3)
    assert sum(best_tree_shape(DEFAULT_PRIOR, flat, max_nodes=20, max_depth=3)) <= 20
    assert max(best_tree_shape(DEFAULT_PRIOR, flat, vocab_size=5)) <= 5
    assert best_gamma(DEFAULT_PRIOR, steep) == 1 and best_gamma(DEFAULT_PRIOR, flat) == DEFAULT_PRIOR.depth


@pytest.mark.parametrize("seed", range(12))
def test_search_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    depth, width = rng.randint(1, 3), 4
    st = _random_stats(rng, depth, width)
    pts = sorted(rng.sample(range(1, 20), 3))
    cost = CostModel([(n, rng.uniform(0.5, 3.0)) for n in pts], rng.uniform(0, 0.5), rng.uniform(0, 0.1))
    max_nodes = rng.randint(1, 11)
    best = max((tokens_per_second(st, cost, s), s) for d in range(1, depth + 2)  # one level deeper and one rank
               for s in itertools.product(range(1, width + 2), repeat=d) if sum(s) <= max_nodes)  # wider than measured
    got = best_tree_shape(st, cost, max_nodes=max_nodes)
    assert sum(got) <= max_nodes
    assert tokens_per_second(st, cost, got) == pytest.approx(best[0], rel=1e-9)
    g = best_gamma(st, cost, max_gamma=max_nodes)
    assert tokens_per_second(st, cost, (1,) * g) == pytest.approx(
        max(tokens_per_second(st, cost, (1,) * d) for d in range(1, min(depth, max_nodes) + 1)), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    assert ts.is_auto("tree_shape", "auto") and not ts.is_auto("tree_shape", (1, 2))
    with pytest.raises(ValueError, match="tree_shape"):
        ts.is_auto("tree_shape", "autox")
    with pytest.raises(ValueError, match="gamma"):
        ts.is_auto("gamma", "Auto")
    with pytest.raises(ValueError, match="cost"):
        CostModel([(2, -1.0)])
    with pytest.raises(ValueError, match="cost"):
        CostModel([(2, 1.0)], level_fixed=-0.1)
    with pytest.raises(ValueError, match="cost"):
        CostModel([(2, float("nan"))])
    with pytest.raises(ValueError, match="cost"):
        CostModel([])
    with pytest.raises(ValueError, match="cost"):
        CostModel.fit([((1, 1), 1.0)])  # no one-level shape: verification unmeasured
    with pytest.raises(ValueError, match="stats"):
        AcceptanceStats([])
    with pytest.raises(ValueError, match="stats"):
        AcceptanceStats([[]])
    with pytest.raises(ValueError, match="stats"):
        AcceptanceStats([[[0.7, 0.6]]])  # a row sums to more than 1
    with pytest.raises(ValueError, match="stats"):
        AcceptanceStats.from_counts([[0]], [[[]]])  # nothing reached
    with pytest.raises(ValueError, match="records"):
        AcceptanceStats.from_rounds([])
    with pytest.raises(ValueError, match="stats"):
        AcceptanceStats.from_dict({"format": "something else"})
    with pytest.raises(ValueError, match="max_nodes"):
        best_tree_shape(DEFAULT_PRIOR, CostModel([(2, 1.0)]), max_nodes=0)
    with pytest.raises(TypeError, match="cost"):
        best_tree_shape(DEFAULT_PRIOR, {"verify": [(2, 1.0)]})


# ---------------------------------------------------------------------------------------------
# With the GLIDE checkpoint
# ---------------------------------------------------------------------------------------------


def test_glide_checkpoint_carries_its_acceptance(tmp_path):
    from specdec.shared.config import ModelConfig
    from specdec.shared.glide import init_glide_weights, load_glide_weights, save_glide

    cfg = ModelConfig("llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=4)
    glide = init_glide_weights(cfg)
    assert glide.acceptance is None and ts.acceptance_of(glide) is None
    save_glide(glide, tmp_path / "plain")
    assert load_glide_weights(tmp_path / "plain", cfg).acceptance is None
    glide.acceptance = AcceptanceStats.from_rounds([_record(WIDE, [0, 2, 3])])
    d = save_glide(glide, tmp_path / "measured")
    back = load_glide_weights(d, cfg)
    assert back.acceptance == glide.acceptance
    # a draft object without the field (the fast path's fused weights) finds the file next to its source
    assert ts.acceptance_of(SimpleNamespace(source=d)) == glide.acceptance
    assert ts.acceptance_of(SimpleNamespace(source=str(tmp_path / "missing"))) is None


def test_the_default_draft_ships_measured_acceptance():
    from specdec.shared.assets import resolve_model_path

    st = AcceptanceStats.load(resolve_model_path("default-glide"))
    assert st.rounds >= 300 and st.depth >= 5
    assert 0.4 < st.accept[0][0][0] < 0.8  # the draft's top-1 guess is right about half the time
    # the measured tree tau of (4, 16, 16, 16, 16) on the CPU was ~3.8 (BENCHMARKS.md)
    assert 3.0 < st.expected_tokens((4, 16, 16, 16, 16)) < 4.8
