"""Issue 19 on the fast path: the same input forms as the reference (shared/batch.py), one public API.

Fast ``vanilla_generate`` decodes a batch of prompts of different lengths (row by row equal to the
reference's batch and to each prompt alone, keyed sampling too); so do the fast speculative, PLD,
LogitSpec, MagicDec and GLIDE chain / tree decoders (the engine's batched round; GLIDE drafts all rows in
one draft-layer pass per step, fast/glide/batch.py). CPU: the kernels run under the Triton interpreter, so the models are tiny.
"""

from __future__ import annotations

import pytest
import torch

import specdec.fast as fast
import specdec.ref as ref
from lossless import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 64
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 5, 6], [3], [12, 13, 14, 15, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


@pytest.fixture(scope="module")
def pair():
    m = tiny_model("llama", vocab=VOCAB, layers=1, hidden=128, heads=2, kv_heads=1, seed=1, init_std=0.3, max_pos=256)
    return m, fast.as_fast_model(m)


@pytest.fixture(scope="module")
def narrow_pair():
    """The two GLIDE batch tests' target: hidden 64 (head_dim 32) halves the interpreter's work per pass. Seed 4:
    every row drafts rounds before its EOS, the early-EOS row after two, and some rows accept drafts in rounds
    where the others accept none (ragged acceptance)."""
    m = tiny_model("llama", vocab=VOCAB, layers=1, hidden=64, heads=2, kv_heads=1, seed=4, init_std=0.3, max_pos=256)
    return m, fast.as_fast_model(m)


def _padded(prompts):
    t = max(len(p) for p in prompts)
    return torch.tensor([p + [0] * (t - len(p)) for p in prompts]), [len(p) for p in prompts]


def test_fast_vanilla_ragged_batch_equals_ref_and_alone(pair):
    target, ftarget = pair
    ids, lengths = _padded(PROMPTS)
    alone = [ref.vanilla_generate(target, [p], None, max_gen_len=6, eos_id=[]).output_ids for p in PROMPTS]
    eos = int(alone[2][0, 2])  # row 2 stops at its third token (or earlier if it emitted that token before)
    kw = dict(max_gen_len=6, eos_id=[eos])
    rr = ref.vanilla_generate(target, ids, lengths, **kw)
    for form in ((ids, lengths), (ids, torch.tensor(lengths)), (PROMPTS, None), ([torch.tensor(p) for p in PROMPTS], lengths)):
        ff = fast.vanilla_generate(ftarget, *form, **kw)
        assert torch.equal(ff.output_ids, rr.output_ids), form
        assert ff.row_lengths == rr.row_lengths and ff.row_nums == rr.row_nums
        # ONE batch whatever the prompt lengths: one target pass per step for all rows (not one per length group)
        assert ff.num == rr.num == max(rr.row_lengths), (ff.num, rr.num)
    assert rr.row_lengths[2] <= 3 and rr.output_ids[2, rr.row_lengths[2] - 1] == eos
    for b, p in enumerate(PROMPTS):
        one = ref.vanilla_generate(target, [p], len(p), **kw)
        assert torch.equal(rr.row(b).output_ids, one.output_ids), b


def test_fast_vanilla_ragged_batch_draws_like_the_reference(pair):
    """Rejection sampling over a ragged batch: every step draws the unfinished rows from the one generator in
    one call, as the reference does -- so with the same generator seed fast == ref token for token (fp32),
    including after a row has finished early and left the draws."""
    target, ftarget = pair
    kw = dict(max_gen_len=7, temperature=1.0, top_k=8)
    first = ref.vanilla_generate(target, PROMPTS, None, eos_id=[], generator=torch.Generator().manual_seed(3), **kw)
    eos = int(first.output_ids[1, 1])   # row 1 finishes at its second token, the others draw on without it
    rr = ref.vanilla_generate(target, PROMPTS, None, eos_id=[eos], generator=torch.Generator().manual_seed(3), **kw)
    ff = fast.vanilla_generate(ftarget, PROMPTS, None, eos_id=[eos], generator=torch.Generator().manual_seed(3), **kw)
    assert rr.row_lengths[1] == 2 and max(rr.row_lengths) == 7
    assert torch.equal(ff.output_ids, rr.output_ids)
    assert ff.row_lengths == rr.row_lengths and ff.num == rr.num


def test_fast_vanilla_keyed_rows_keep_their_sequence_ids(pair):
    target, ftarget = pair
    kw = dict(max_gen_len=5, eos_id=[], temperature=1.0, sampling="keyed", seed=11)
    rr = ref.vanilla_generate(target, PROMPTS, None, **kw)
    ff = fast.vanilla_generate(ftarget, PROMPTS, None, **kw)
    assert torch.equal(ff.output_ids, rr.output_ids)  # one batch, and row b is still sequence b
    assert torch.equal(ff.row(0).output_ids, fast.vanilla_generate(ftarget, [PROMPTS[0]], None, **kw).output_ids)


def _spec_calls(target, ftarget):
    """(method, fast call, ref call): the decoders that batch on the fast path (host-tree drafters)."""
    return [
        ("speculative", lambda *a, **kw: fast.speculative_generate(ftarget, ftarget, *a, gamma=2, **kw),
         lambda *a, **kw: ref.speculative_generate(target, target, *a, gamma=2, **kw)),
        ("pld", lambda *a, **kw: fast.pld_generate(ftarget, *a, num_pred_tokens=3, **kw),
         lambda *a, **kw: ref.pld_generate(target, *a, num_pred_tokens=3, **kw)),
        ("logitspec", lambda *a, **kw: fast.logitspec_generate(ftarget, *a, draft_tree_capacity=4, num_pred_tokens=3, **kw),
         lambda *a, **kw: ref.logitspec_generate(target, *a, draft_tree_capacity=4, num_pred_tokens=3, **kw)),
        ("magicdec", lambda *a, **kw: fast.magicdec_generate(ftarget, *a, gamma=2, sink_tokens=1, window=4, **kw),
         lambda *a, **kw: ref.magicdec_generate(target, *a, gamma=2, sink_tokens=1, window=4, **kw)),
    ]


def test_fast_speculative_decoders_batch_ragged_rows_like_ref(pair):
    """Prompts of different lengths (one of length 1, one hitting EOS early) batched on the fast path:
    every row equals the reference batch's row, ref vanilla's, and has the same acceptance per round."""
    target, ftarget = pair
    ids, lengths = _padded(PROMPTS)
    alone = [ref.vanilla_generate(target, [p], None, max_gen_len=6, eos_id=[]).output_ids for p in PROMPTS]
    kw = dict(max_gen_len=6, eos_id=[int(alone[2][0, 2])])
    vanilla = ref.vanilla_generate(target, ids, lengths, **kw)
    for method, f, r in _spec_calls(target, ftarget):
        rr, ff = r(ids, lengths, **kw), f(ids, lengths, **kw)
        assert torch.equal(ff.output_ids, rr.output_ids), method
        assert torch.equal(ff.output_ids, vanilla.output_ids), method
        assert ff.row_lengths == rr.row_lengths and ff.row_accept_lengths == rr.row_accept_lengths, method
        if method == "pld":   # the list form too
            assert torch.equal(f(PROMPTS, None, **kw).output_ids, ff.output_ids), method


def test_fast_batched_keyed_rows_equal_keyed_vanilla(pair):
    target, ftarget = pair
    kw = dict(max_gen_len=5, eos_id=[], temperature=1.0, sampling="keyed", seed=5)
    want = ref.vanilla_generate(target, PROMPTS[:3], None, **kw).output_ids
    for method, f, _ in _spec_calls(target, ftarget):
        assert torch.equal(f(PROMPTS[:3], None, **kw).output_ids, want), method


def test_fast_glide_decoders_batch_ragged_rows_like_ref(narrow_pair, monkeypatch):
    """The GLIDE chain and beam tree batched on the fast path (each row drafts on its row of the batch cache,
    one batched verification): every row equals the reference batch's row and ref vanilla's, with the same
    acceptance per round; a row alone gives the same tokens; keyed sampling gives keyed vanilla's tokens."""
    from specdec.shared.glide import init_glide_weights

    target, ftarget = narrow_pair
    glide = init_glide_weights(target.config, seed=3, std=0.3)
    ids, lengths = _padded(PROMPTS)
    alone = [ref.vanilla_generate(target, [p], None, max_gen_len=6, eos_id=[]).output_ids for p in PROMPTS]
    kw = dict(max_gen_len=6, eos_id=[int(alone[2][0, 2])])
    vanilla = ref.vanilla_generate(target, ids, lengths, **kw)
    calls = [("tree_spec", lambda m, *a, **k: m.tree_spec_generate(ftarget if m is fast else target, glide, *a, tree_shape=(2, 3), **k)),
             ("spec", lambda m, *a, **k: m.spec_generate(ftarget if m is fast else target, glide, *a, gamma=3, **k))]
    for method, call in calls:
        seen = {"ref": [], "fast": []}

        def rec(name):   # every row's draft, round by round: a row drafting from another row's state shows here
            return lambda r: seen[name].append((r.row, r.draft.tokens.tolist(), list(r.draft.tree.parents), r.path))

        rr, ff = call(ref, ids, lengths, on_round=rec("ref"), **kw), call(fast, ids, lengths, on_round=rec("fast"), **kw)
        assert torch.equal(ff.output_ids, rr.output_ids), method
        assert torch.equal(ff.output_ids, vanilla.output_ids), method
        assert ff.row_lengths == rr.row_lengths and ff.row_accept_lengths == rr.row_accept_lengths, method
        assert sorted(seen["fast"]) == sorted(seen["ref"]) and len({r[0] for r in seen["ref"]}) == len(PROMPTS), method
        one = call(fast, [PROMPTS[0]], None, **kw)
        assert torch.equal(ff.row(0).output_ids, one.output_ids), method
    keyed = dict(max_gen_len=5, eos_id=[], temperature=1.0, sampling="keyed", seed=5)
    prompts = PROMPTS[:3]                  # ragged: 9, 1 and 5 tokens
    want = ref.vanilla_generate(target, prompts, None, **keyed).output_ids
    from specdec.fast.glide.drafter import FastGlideDrafter

    monkeypatch.setattr(FastGlideDrafter, "batch_rounds", False)   # rows apart (together == apart: the next test)
    for method, call in calls:
        seen = {"ref": [], "fast": []}

        def rec(name):   # each row's beam is ranked with ITS OWN sequence's keyed noise (row b is sequence b)
            return lambda r: seen[name].append((r.row, r.draft.tokens.tolist(), list(r.draft.tree.parents), r.path))

        assert torch.equal(call(fast, prompts, None, on_round=rec("fast"), **keyed).output_ids, want), method
        call(ref, prompts, None, on_round=rec("ref"), **keyed)
        assert sorted(seen["fast"]) == sorted(seen["ref"]), method


def test_fast_bad_lengths_name_the_argument(pair):
    _, ftarget = pair
    ids, _ = _padded(PROMPTS[:2])
    with pytest.raises(ValueError, match=r"prompt_length\[1\] must be in \[1, 9\]"):
        fast.vanilla_generate(ftarget, ids, [9, 0], max_gen_len=2)
    with pytest.raises(ValueError, match=r"prompt_length = 9 is longer than row 1 of input_ids \(1 tokens\)"):
        fast.vanilla_generate(ftarget, PROMPTS[:2], 9, max_gen_len=2)


def test_fast_magicdec_batch_drafts_every_row_in_one_pass_per_step(pair, monkeypatch):
    """MagicDec's regime: in a batch, each draft step is ONE target pass over all rows' StreamingLLM views
    (not one pass per row), and the drafts are the reference batch's, round by round and row by row."""
    import specdec.fast.magicdec as fmagic

    target, ftarget = pair
    ids, lengths = _padded(PROMPTS)
    kw = dict(max_gen_len=7, eos_id=[])
    passes = []
    real_run_step = fmagic.run_step
    monkeypatch.setattr(fmagic, "run_step", lambda fm, cache, tokens, *a: passes.append(tokens.shape[0]) or
                        real_run_step(fm, cache, tokens, *a))
    seen = {"ref": [], "fast": []}

    def rec(name):
        return lambda r: seen[name].append((r.row, r.draft.tokens.tolist(), r.path))

    rr = ref.magicdec_generate(target, ids, lengths, gamma=3, sink_tokens=1, window=4, on_round=rec("ref"), **kw)
    ff = fast.magicdec_generate(ftarget, ids, lengths, gamma=3, sink_tokens=1, window=4, on_round=rec("fast"), **kw)
    assert torch.equal(ff.output_ids, rr.output_ids)
    assert sorted(seen["fast"]) == sorted(seen["ref"]) and len(seen["ref"]) >= len(PROMPTS)
    assert passes and set(passes) == {len(PROMPTS)}, passes   # every draft pass carries the whole batch
    rounds = len(seen["fast"]) // len(PROMPTS)
    assert len(passes) <= 3 * (rounds + 1), (len(passes), rounds)   # gamma passes per round, not gamma x B


def test_fast_finished_rows_read_none_of_their_cache(pair, monkeypatch):
    """A row that finished early stays in the batch as dummy roots with prefix length 0 (its attention reads
    no cache rows; masking at near-zero cost), the others keep theirs, and every row still equals vanilla."""
    import specdec.fast.engine as engine

    target, ftarget = pair
    ids, lengths = _padded(PROMPTS)
    alone = [ref.vanilla_generate(target, [p], None, max_gen_len=8, eos_id=[]).output_ids for p in PROMPTS]
    others = {int(t) for b in (0, 1, 3) for t in alone[b][0]}
    stop = next(j for j in range(1, 4) if int(alone[2][0, j]) not in others)   # a token only row 2 emits
    kw = dict(max_gen_len=8, eos_id=[int(alone[2][0, stop])])          # row 2 stops early, the others run on
    prefixes = []
    real = engine.run_step

    def recording(fm, cache, *a, **k):
        prefixes.append(cache.length_t.tolist())
        return real(fm, cache, *a, **k)

    monkeypatch.setattr(engine, "run_step", recording)
    got = fast.pld_generate(ftarget, ids, lengths, num_pred_tokens=3, **kw)
    assert torch.equal(got.output_ids, ref.vanilla_generate(target, ids, lengths, **kw).output_ids)
    assert got.row_lengths[2] <= stop + 1 < 8 == min(got.row_lengths[b] for b in (0, 1, 3))
    assert all(x > 0 for x in prefixes[0])                            # the first round: every row running
    assert any(p[2] == 0 and all(p[b] > 0 for b in (0, 1, 3)) for p in prefixes)   # row 2 done, reads nothing


def test_fast_glide_batch_drafts_every_row_in_one_pass_per_step(narrow_pair, monkeypatch):
    """One batched GLIDE round (fast/glide/batch.py): the catch-up and every beam level are ONE draft-layer pass
    over all B rows, never a row's own round -- and every row drafts exactly the trees it drafts row by row
    (batch_rounds off), round by round: ragged catch-ups, a one-token prompt, a row that finishes at an early
    EOS (then a dummy in the pass), the last rounds' shorter shapes, a truncated draft vocabulary, keyed
    sampling (each row's beam under its own sequence's noise)."""
    import specdec.fast.glide.batch as gbatch
    from specdec.fast.glide.drafter import FastGlideDrafter
    from specdec.shared.glide import init_glide_weights, with_draft_vocab

    target, ftarget = narrow_pair
    glide = init_glide_weights(target.config, seed=3, std=0.3)
    small = with_draft_vocab(glide, torch.arange(0, VOCAB, 2))      # 32 of the 64 ids
    prompts = PROMPTS[:3]                  # ragged: 9, 1 and 5 tokens
    alone = [ref.vanilla_generate(target, [p], None, max_gen_len=6, eos_id=[]).output_ids for p in prompts]
    kw = dict(max_gen_len=6, eos_id=[int(alone[1][0, 2])])           # the one-token prompt stops early
    passes, own_rounds = [], []
    real_layer = gbatch.glide_layer
    monkeypatch.setattr(gbatch, "glide_layer", lambda fm, g, cache, tokens, *a, **k: passes.append(tokens.shape[0]) or
                        real_layer(fm, g, cache, tokens, *a, **k))
    real_propose = FastGlideDrafter.propose
    monkeypatch.setattr(FastGlideDrafter, "propose", lambda self, st: own_rounds.append(1) or real_propose(self, st))
    keyed = dict(temperature=1.0, sampling="keyed", seed=5)
    for draft, shape, sampling in ((glide, (2, 3), {}), (small, (1, 1, 1, 1), {}), (glide, (2, 3), keyed)):
        runs = {}
        for batched in (True, False):
            monkeypatch.setattr(FastGlideDrafter, "batch_rounds", batched)
            passes.clear(), own_rounds.clear()
            seen = []
            res = fast.tree_spec_generate(ftarget, draft, prompts, None, tree_shape=shape,
                                          on_round=lambda r: seen.append((r.row, r.draft.tokens.tolist(),
                                                                          list(r.draft.tree.parents), r.path)),
                                          **kw, **sampling)
            runs[batched] = (res, sorted(seen), list(passes), len(own_rounds))
        (bres, bseen, bpasses, bown), (rres, rseen, rpasses, rown) = runs[True], runs[False]
        assert torch.equal(bres.output_ids, rres.output_ids) and bseen == rseen, (shape, draft is small)
        assert bres.row_accept_lengths == rres.row_accept_lengths
        want = ref.vanilla_generate(target, prompts, None, **kw, **sampling).output_ids
        assert torch.equal(bres.output_ids, want)   # lossless (keyed: exactly keyed vanilla's tokens)
        assert bpasses and set(bpasses) == {len(prompts)} and rpasses == []   # every pass: all B rows
        assert bown < rown    # row by row: every row its own rounds; batched: only a lone last row
        if not sampling:
            assert bres.row_lengths[1] < max(bres.row_lengths)   # a row finished early and rode along


def _stand_in_captures(monkeypatch) -> tuple[list, list]:
    """CUDA-graph captures on the CPU: a stand-in graph whose replay re-runs the captured body and writes the
    captured outputs in place, as a replay does. Returns the lists the captures and replays ("fused" / "draft")
    are counted in."""
    import specdec.fast.graphs as graphs

    captures, replays = [], []

    class StandIn:   # what a replay does: the captured work again, into the captured outputs
        def __init__(self, body, out):
            self.body, self.out = body, out

        def replay(self):
            replays.append("fused" if len(self.out) == 1 else "draft")
            for static, new in zip(self.out, self.body()):
                static.copy_(new)

    def capture(body, device=None, warmup=2, pool=None):
        for _ in range(warmup):
            body()
        out = body()
        captures.append(1)
        return StandIn(body, out), out

    monkeypatch.setattr(graphs, "capture", capture)
    return captures, replays


def test_fast_glide_batched_capture_path_on_static_buffers(pair, monkeypatch):
    """The capture paths of batched GLIDE rounds (fast/glide/batch.py: static pack refilled each round, the rows'
    caches copied into a static stacked buffer and back, static outputs) run on the CPU with a stand-in for
    the CUDA graph: its replay re-runs the captured body and writes the captured outputs in place, as a replay
    does. Greedy rounds in which every row drafts the full tree run FUSED (draft + verification + acceptance +
    compaction, fused_batch_round), the last rounds the captured draft alone. Round by round the same trees,
    paths and tokens as the eager batched round (== vanilla), at most one capture per catch-up length and
    kind, reused across rounds."""
    import specdec.fast.glide.batch as gbatch
    from specdec.fast.glide.drafter import FastGlideDrafter
    from specdec.shared.glide import init_glide_weights

    target, ftarget = pair
    glide = fast.glide.as_fast_glide(init_glide_weights(target.config, seed=3, std=0.3))
    captures, replays = _stand_in_captures(monkeypatch)
    prompts = PROMPTS[:3]                  # ragged: 9, 1 and 5 tokens
    kw = dict(max_gen_len=8, eos_id=[])
    want = ref.vanilla_generate(target, prompts, None, **kw).output_ids
    monkeypatch.setattr(FastGlideDrafter, "batch_rounds", True)
    runs = []
    # captured and fused, captured draft only, eager
    for static, fuse in ((True, True), (True, False), (False, False)):
        monkeypatch.setattr(gbatch, "_captures", lambda d0, on=static: on)
        monkeypatch.setattr(gbatch, "FUSE", fuse)
        seen = []
        res = fast.tree_spec_generate(ftarget, glide, prompts, None, tree_shape=(2, 3),
                                      on_round=lambda r: seen.append((r.row, r.draft.tokens.tolist(),
                                                                      list(r.draft.tree.parents), r.path)), **kw)
        assert torch.equal(res.output_ids, want), (static, fuse)
        runs.append(seen)
        if len(runs) == 1:
            fused_captures, fused_replays = len(captures), len(replays)
    assert runs[0] == runs[1] == runs[2]    # the eager batched round == row by row: the test above
    assert 1 <= fused_captures <= len((2, 3)) + 1 < fused_replays        # one per catch-up length, reused
    assert set(replays[:fused_replays]) == {"fused"} and set(replays[fused_replays:]) == {"draft"}


@pytest.mark.gpu
def test_gpu_batched_glide_rounds_replay_one_graph(monkeypatch):
    """On CUDA a batched GLIDE round in which every row drafts the full tree is ONE captured graph
    (fast/glide/batch.py): the embedded model in bf16, 5 real prompts of different lengths, one stopping at an
    early EOS (later rounds run eagerly with a dummy row). Outputs == batched vanilla bitwise; every round before
    the early stop ran a graph (captured on its pack layout's first use, replayed after); and round by round the graphs drafted exactly the trees the same body drafts
    eagerly (with the capture's cross-attention split: the split count steers the fp32 merge order)."""
    import specdec.fast.glide.batch as gbatch
    from specdec.bench import load_questions
    from specdec.fast.glide.drafter import FastGlideDrafter
    from specdec.shared.tokenizer import load_tokenizer

    tok = load_tokenizer("default")
    target = fast.load_model("default", dtype=torch.bfloat16, device="cuda")
    glide = fast.load_glide("default-glide", target)
    qs = load_questions("stdlib_code")
    prompts = [tok.encode(q["turns"][0])[:n] for q, n in zip(qs[10:15], (300, 41, 512, 97, 180))]
    kw = dict(max_gen_len=64, eos_id=[])
    eos = int(fast.vanilla_generate(target, prompts, None, **kw).output_ids[1, 20])
    kw["eos_id"] = [eos]
    want = fast.vanilla_generate(target, prompts, None, **kw).output_ids
    stop = want[1].tolist().index(eos) + 1                        # row 1's tokens

    replays, captures = [], []
    real_capture, real_body = gbatch._capture, gbatch._round_body

    class Counting:   # the captured graph, its replays counted
        def __init__(self, graph):
            self.graph = graph

        def replay(self):
            replays.append(1)
            self.graph.replay()

    def counting_capture(*a, **k):
        captures.append(1)
        bg = real_capture(*a, **k)
        bg.graph = Counting(bg.graph)
        return bg

    monkeypatch.setattr(gbatch, "_capture", counting_capture)
    # every batched round split like the capture (the whole capacity), so eager and replayed rounds compute alike
    monkeypatch.setattr(gbatch, "_round_body", lambda d0, st, u, tk, tv, run, rows, span, *a:
                        real_body(d0, st, u, tk, tv, run, rows, tk.shape[-2], *a))
    runs = {}
    for name, batched, capture in (("graphs", True, True), ("eager", True, False), ("rows", False, True)):
        monkeypatch.setattr(FastGlideDrafter, "batch_rounds", batched)
        monkeypatch.setattr(gbatch, "CAPTURE", capture)
        seen = []
        res = fast.tree_spec_generate(target, glide, prompts, None, tree_shape=(4, 8, 8, 4),
                                      on_round=lambda r: seen.append((r.row, r.draft.tokens.tolist(),
                                                                      list(r.draft.tree.parents), r.path)), **kw)
        runs[name] = (res, seen)
        assert torch.equal(res.output_ids, want), name
        if name == "graphs":
            # row 1 emits `stop` tokens at <= 5 a round: that many rounds with every row drafting the full tree, each
            # one graph -- captured on a pack layout's first use (one per catch-up length, fused or draft-only), then
            # replayed
            assert len(captures) + len(replays) >= -(-stop // 5), (len(captures), len(replays), stop)
            assert 1 <= len(captures) <= 2 * 5 and len(replays) >= 1, (len(captures), len(replays))
    assert runs["graphs"][1] == runs["eager"][1]


def _record_widths(monkeypatch) -> list[int]:
    """The batch width (cache slots) of every verification pass the engine runs from now on, in order."""
    import specdec.fast.engine as engine

    widths, real = [], engine.run_step

    def recording(fm, cache, *a, **k):
        widths.append(cache.k.shape[1])
        return real(fm, cache, *a, **k)

    monkeypatch.setattr(engine, "run_step", recording)
    return widths


def _early_stops(alone, early, late, within, skip=0):
    """EOS ids that stop each row of ``early`` within its first ``within`` tokens (one of its tokens ``skip`` to
    ``within``) and never appear in the rows of ``late`` (``alone``: each prompt's own output), or None when this
    model's outputs offer none."""
    late_tokens = {int(t) for b in late for t in alone[b][0]}
    stops = []
    for b in early:
        t = next((int(x) for x in alone[b][0, skip:within] if int(x) not in late_tokens), None)
        if t is None:
            return None
        stops.append(t)
    return stops


def _early_stop_batch(target, max_gen_len, **sampling):
    """PROMPTS as one padded batch whose rows 0 and 1 stop at an early EOS (within their first 3 tokens) while rows 2
    and 3 never meet it: ``(ids, lengths, kw, want)``, ``kw`` the generate arguments and ``want`` the reference's
    batched vanilla result under them."""
    ids, lengths = _padded(PROMPTS)
    alone = [ref.vanilla_generate(target, [p], None, max_gen_len=max_gen_len, eos_id=[], **sampling).output_ids
             for p in PROMPTS]
    stops = _early_stops(alone, early=(0, 1), late=(2, 3), within=3)
    assert stops is not None, "the fixture's rows no longer offer early stops for rows 0 and 1"
    kw = dict(max_gen_len=max_gen_len, eos_id=stops, **sampling)
    return ids, lengths, kw, ref.vanilla_generate(target, ids, lengths, **kw)


def test_fast_finished_rows_leave_the_batch(pair, monkeypatch):
    """Once at most half of a batch's slots still run, the running rows move into the lowest slots and the
    rounds run on half the slots (engine.compact_slots): rows 0 and 1 stop early, rows 2 and 3 move to slots 0
    and 1 and run on a 2-row batch -- every row still equals batched vanilla's, greedy and keyed."""
    target, ftarget = pair
    widths = _record_widths(monkeypatch)
    for sampling in (dict(), dict(temperature=1.0, sampling="keyed", seed=7)):
        ids, lengths, kw, want = _early_stop_batch(target, 10, **sampling)
        assert max(want.row_lengths[:2]) <= 3 and min(want.row_lengths[2:]) == 10
        for method, f, _ in _spec_calls(target, ftarget):
            widths.clear()
            got = f(ids, lengths, **kw)
            assert torch.equal(got.output_ids, want.output_ids), (method, sampling)
            # 4 slots, then 2 once rows 0 and 1 are done (then 1 when one of rows 2, 3 finishes a round earlier)
            assert widths[0] == 4 and 2 in widths and widths == sorted(widths, reverse=True), (method, widths)
            if method == "magicdec":   # the narrower batch drafts on the leading rows of the same scratch cache
                assert ftarget.caches["magicdec_batch"].k.shape[1] == 4


def test_compacted_width_halves_while_the_running_rows_fit():
    from specdec.fast.engine import compacted_width

    assert [compacted_width(r, 8) for r in range(9)] == [1, 1, 2, 4, 4, 8, 8, 8, 8]
    assert compacted_width(4, 6) == 6 and compacted_width(3, 6) == 3 and compacted_width(2, 6) == 3
    assert compacted_width(1, 3) == 1
    assert compacted_width(1, 1) == 1
    with pytest.raises(ValueError, match=r"running must be in \[0, 4\]"):
        compacted_width(5, 4)


def test_compact_slots_moves_only_rows_past_the_width():
    from specdec.fast.engine import compact_slots
    from specdec.fast.model import StaticKVCache

    k = torch.arange(2 * 4 * 1 * 6 * 2, dtype=torch.float32).view(2, 4, 1, 6, 2)
    cache = StaticKVCache(k.clone(), -k.clone(), 0, torch.zeros(4, dtype=torch.int32))
    slot, lengths = [0, 1, 2, 3], [6, 5, 4, 3]
    compact_slots(cache, slot, [1, 3], lengths, 2)        # rows 0 and 2 finished; row 3 moves into row 0's slot
    assert slot == [0, 1, 2, 0]
    assert torch.equal(cache.k[:, 0, :, :3], k[:, 3, :, :3]) and torch.equal(cache.v[:, 0, :, :3], -k[:, 3, :, :3])
    assert torch.equal(cache.k[:, 0, :, 3:], k[:, 0, :, 3:])   # only the moved row's verified rows are copied
    assert torch.equal(cache.k[:, 1], k[:, 1])                 # row 1 stays where it was
    with pytest.raises(ValueError, match="3 running rows do not fit 2 slots"):
        compact_slots(cache, slot, [0, 1, 3], lengths, 2)


def test_ensure_rows_narrows_without_reallocating(pair):
    _, ftarget = pair
    four = ftarget.ensure_rows(4, 12, name="rows_test")
    two = ftarget.ensure_rows(2, 10, name="rows_test")
    assert two is four.leading(2) and two.k.data_ptr() == four.k.data_ptr() and two.length == 0
    assert ftarget.ensure_rows(4, 12, name="rows_test") is four
    wider = ftarget.ensure_rows(6, 12, name="rows_test")           # more rows than it has: a new allocation
    assert wider.k.shape[1] == 6 and ftarget.caches["rows_test"] is wider
    ftarget.drop_caches("rows_test")


def test_leading_views_are_kept_and_share_memory():
    from specdec.fast.model import StaticKVCache

    cache = StaticKVCache(torch.zeros(1, 4, 1, 3, 2), torch.zeros(1, 4, 1, 3, 2), 2, torch.zeros(4, dtype=torch.int32))
    two = cache.leading(2)
    assert cache.leading(2) is two and cache.leading(4) is cache and two.length == 2
    two.k[0, 1, 0, 0, 0] = 5.0
    two.length_t[1] = 7
    assert cache.k[0, 1, 0, 0, 0] == 5.0 and cache.length_t[1] == 7
    with pytest.raises(ValueError, match=r"n must be in \[1, 4\]"):
        cache.leading(0)


@pytest.mark.parametrize("together", [False, True])
def test_fast_glide_rows_leave_the_batch(narrow_pair, monkeypatch, together):
    """The GLIDE chain and tree when finished rows leave the batch: rows 2 and 3 move to slots 0 and 1 and draft
    there (each row's sliding cache stays its own; with ``together`` the rows draft in one batched round over the
    narrower batch), and every row still equals batched vanilla's."""
    from specdec.fast.glide.drafter import FastGlideDrafter
    from specdec.shared.glide import init_glide_weights

    target, ftarget = narrow_pair
    glide = init_glide_weights(target.config, seed=3, std=0.3)
    monkeypatch.setattr(FastGlideDrafter, "batch_rounds", together)
    ids, lengths, kw, want = _early_stop_batch(target, 8)
    widths = _record_widths(monkeypatch)
    for method, call in (("tree_spec", lambda: fast.tree_spec_generate(ftarget, glide, ids, lengths, tree_shape=(2, 3), **kw)),
                         ("spec", lambda: fast.spec_generate(ftarget, glide, ids, lengths, gamma=3, **kw))):
        widths.clear()
        got = call()
        assert torch.equal(got.output_ids, want.output_ids), method
        assert widths and widths[0] == 4 and 2 in widths, (method, widths)


@pytest.mark.gpu
def test_gpu_finished_rows_leave_the_batch_bitwise(monkeypatch):
    """Compaction on the GPU in bf16 (the embedded model, 4 real prompts of different lengths): rows 0 and 1 stop
    at an early EOS, rows 2 and 3 move to slots 0 and 1 and run on a 2-slot batch (new step graphs; a GLIDE row's
    graphs captured again for its new slot), and every decoder's rows equal batched vanilla's bit for bit."""
    from specdec.bench import load_questions
    from specdec.methods import METHODS
    from specdec.shared.tokenizer import load_tokenizer

    tok = load_tokenizer("default")
    target = fast.load_model("default", dtype=torch.bfloat16, device="cuda")
    models = {"draft": fast.load_model("default-draft", dtype=torch.bfloat16, device="cuda"),
              "glide": fast.load_glide("default-glide", target)}
    qs = load_questions("stdlib_code")
    prompts = [tok.encode(q["turns"][0])[:n] for q, n in zip(qs[20:24], (220, 64, 400, 150))]
    kw = dict(max_gen_len=64, eos_id=[])
    alone = [fast.vanilla_generate(target, [p], None, **kw).output_ids for p in prompts]
    stops = _early_stops(alone, early=(0, 1), late=(2, 3), within=26, skip=6)
    assert stops is not None, "these prompts no longer offer early stops for rows 0 and 1"
    kw["eos_id"] = stops
    want = fast.vanilla_generate(target, prompts, None, **kw)
    assert max(want.row_lengths[:2]) <= 26 and min(want.row_lengths[2:]) == 64, want.row_lengths
    widths = _record_widths(monkeypatch)
    for name, m in METHODS.items():
        if name == "vanilla":
            continue
        widths.clear()
        args = (target,) if m.needs is None else (target, models[m.needs])
        got = getattr(fast, m.function)(*args, prompts, None, **kw)
        assert torch.equal(got.output_ids, want.output_ids), name
        assert widths and widths[0] == 4 and 2 in widths, (name, widths)


def test_fast_glide_fused_rounds_after_compaction(narrow_pair, monkeypatch):
    """GLIDE's fused batched rounds (stand-in graphs on the CPU) read each slot's length from ``length_t`` on the
    device: after rows 0 and 1 finish and rows 2 and 3 move to slots 0 and 1, the fused rounds of the 2-slot batch
    must see the moved rows' lengths, and every row still equals batched vanilla's."""
    import specdec.fast.glide.batch as gbatch
    from specdec.fast.glide.drafter import FastGlideDrafter
    from specdec.shared.glide import init_glide_weights

    target, ftarget = narrow_pair
    glide = fast.glide.as_fast_glide(init_glide_weights(target.config, seed=3, std=0.3))
    _, replays = _stand_in_captures(monkeypatch)
    monkeypatch.setattr(FastGlideDrafter, "batch_rounds", True)
    monkeypatch.setattr(gbatch, "_captures", lambda d0: True)
    ids, lengths, kw, want = _early_stop_batch(target, 8)
    widths = _record_widths(monkeypatch)
    fused_at = []
    real_fused = gbatch.fused_batch_round
    monkeypatch.setattr(gbatch, "fused_batch_round", lambda d, rows, st, cache: fused_at.append(cache.k.shape[1]) or
                        real_fused(d, rows, st, cache))
    got = fast.tree_spec_generate(ftarget, glide, ids, lengths, tree_shape=(2, 3), **kw)
    assert torch.equal(got.output_ids, want.output_ids)
    assert 4 in widths and 2 in fused_at, (widths, fused_at)   # a fused round ran on the compacted batch
