"""The fast path against the reference: token-identical greedy output for every decoder.

On CPU the Triton kernels run under the interpreter (slow), so these use 1-layer models with
hidden 64 (head_dim 32) and short generations; ``-m gpu`` runs larger models (hidden 128) for real on CUDA.
"""

from __future__ import annotations

import pytest
import torch

import specdec.fast as fast
import specdec.ref as ref
from lossless import lossless_check, tiny_model

VOCAB = 64


def _pair(family="llama", layers=1, seed=0, device="cpu", kv_heads=1):
    hidden = 64 if device == "cpu" else 128   # the interpreter's work per pass halves at hidden 64
    m = tiny_model(family, vocab=VOCAB, layers=layers, hidden=hidden, heads=2, kv_heads=kv_heads, seed=seed, init_std=0.3, max_pos=2048)
    if device != "cpu":
        m.weights = {k: v.to(device) for k, v in m.weights.items()}
    return m, fast.as_fast_model(m)


REPETITIVE = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]


def _decoders(draft, fdraft):
    """(name, ref call, fast call) for every decoder that needs no GLIDE checkpoint."""
    return [
        ("vanilla", lambda m, **kw: ref.vanilla_generate(m, **kw), lambda m, **kw: fast.vanilla_generate(m, **kw)),
        ("speculative", lambda m, **kw: ref.speculative_generate(m, draft, gamma=3, **kw),
         lambda m, **kw: fast.speculative_generate(m, fdraft, gamma=3, **kw)),
        ("pld", lambda m, **kw: ref.pld_generate(m, num_pred_tokens=4, **kw),
         lambda m, **kw: fast.pld_generate(m, num_pred_tokens=4, **kw)),
        ("logitspec", lambda m, **kw: ref.logitspec_generate(m, draft_tree_capacity=8, num_pred_tokens=4, **kw),
         lambda m, **kw: fast.logitspec_generate(m, draft_tree_capacity=8, num_pred_tokens=4, **kw)),
        ("magicdec", lambda m, **kw: ref.magicdec_generate(m, gamma=3, sink_tokens=2, window=6, **kw),
         lambda m, **kw: fast.magicdec_generate(m, gamma=3, sink_tokens=2, window=6, **kw)),
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fast_greedy_token_identical_to_ref_and_vanilla(family):
    seed = {"llama": 7, "qwen2": 9}[family]   # PLD, LogitSpec and MagicDec each accept some drafts
    target, ftarget = _pair(family, seed=seed)
    draft, fdraft = _pair(family, seed=seed + 1)
    ids = torch.tensor([REPETITIVE])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=8, eos_id=[])
    vanilla = ref.vanilla_generate(target, **kw).output_ids
    for name, r, f in _decoders(draft, fdraft):
        rr, ff = r(target, **kw), f(ftarget, **kw)
        assert torch.equal(rr.output_ids, vanilla), name
        assert torch.equal(ff.output_ids, rr.output_ids), name
        assert ff.accept_lengths == rr.accept_lengths, name  # same drafts, same acceptance, round by round
        assert ff.count == int(ff.spec_mask.sum())


def test_glide_gemv_rows_rule():
    """The GLIDE draft layer's own rule for norm-folding GEMVs on several rows (the target's decode
    phase has one arithmetic for every row count, :func:`specdec.fast.model.step_forward`)."""
    import specdec.fast.glide.layer as fglide

    _, fm = _pair()
    ws = [fm.w[f"layers.0.{n}"] for n in ("wqkv", "wo", "w13", "w2")]
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fglide._gemv_rows_ok(ws, 1, cpu) and fglide._gemv_rows_ok(ws, 1, cuda)   # one row: always
    biggest = 2 * fm.config.intermediate_size * fm.config.hidden_size * fm.w["embed"].element_size()   # w13 [2F, H]
    most = fglide.GEMV_ROWS_MAX_BYTES // biggest
    assert most >= 2
    assert not fglide._gemv_rows_ok(ws, most, cpu)                                # several: CUDA only
    assert fglide._gemv_rows_ok(ws, most, cuda)                                   # small weights: re-read from L2
    assert not fglide._gemv_rows_ok(ws, most + 1, cuda)


PUBLIC_API = ["load_model", "load_glide", "forward", "tree_attention", "vanilla_generate", "speculative_generate",
              "spec_generate", "tree_spec_generate", "logitspec_generate", "magicdec_generate", "pld_generate"]


@pytest.mark.parametrize("name", PUBLIC_API)
def test_fast_exposes_the_ref_api(name):
    """Switching is one import line: same names, same parameter names and defaults."""
    import inspect

    r, f = inspect.signature(getattr(ref, name)), inspect.signature(getattr(fast, name))
    assert list(f.parameters)[: len(r.parameters)] == list(r.parameters) or name in ("load_model", "load_glide", "tree_attention")
    for p in r.parameters.values():
        if p.name in f.parameters and p.default is not inspect.Parameter.empty and name not in ("load_model",):
            assert f.parameters[p.name].default == p.default, (name, p.name)


def test_fast_self_draft_accepts_everything():
    target, ftarget = _pair(seed=3)
    ids = torch.tensor([[1, 2, 3, 4]])
    res = fast.speculative_generate(ftarget, ftarget, ids, 4, gamma=3, max_gen_len=9, eos_id=[])
    assert torch.equal(res.output_ids, ref.vanilla_generate(target, ids, 4, max_gen_len=9, eos_id=[]).output_ids)
    assert res.accept_lengths == [1, 4, 4]  # always right: 3 drafts + bonus per round


def test_fast_eos_inside_accepted_draft():
    target, ftarget = _pair(seed=4)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    plain = ref.vanilla_generate(target, ids, 5, max_gen_len=8, eos_id=[]).output_ids[0].tolist()
    eos = plain[4]
    want = plain[: plain.index(eos) + 1]
    res = fast.speculative_generate(ftarget, ftarget, ids, 5, gamma=3, max_gen_len=8, eos_id=eos)
    assert res.output_ids[0].tolist() == want


def test_fast_bad_input():
    _, ftarget = _pair(seed=5)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="gamma"):
        fast.speculative_generate(ftarget, ftarget, ids, 3, gamma=0)
    with pytest.raises(ValueError, match="draft_tree_capacity"):
        fast.logitspec_generate(ftarget, ids, 3, draft_tree_capacity=500)
    with pytest.raises(ValueError, match="temperature"):
        fast.vanilla_generate(ftarget, ids, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="empty prompt"):
        fast.vanilla_generate(ftarget, torch.zeros(1, 0, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="context"):
        fast.vanilla_generate(ftarget, ids, 3, max_gen_len=10_000)
    other = tiny_model("llama", vocab=VOCAB + 1, layers=1, hidden=128, heads=2, kv_heads=1)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fast.speculative_generate(ftarget, fast.as_fast_model(other), ids, 3)
    small = tiny_model("llama", vocab=VOCAB, layers=1, hidden=32, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="head dims"):
        fast.as_fast_model(small)


# ---------------------------------------------------------------------------------------------
# GPU: a larger random model, fp32 token identity and lossless sampling for real
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gpu_fast_greedy_matches_ref_fp32(family):
    target, ftarget = _pair(family, layers=4, seed=11, device="cuda", kv_heads=1)
    draft, fdraft = _pair(family, layers=1, seed=12, device="cuda", kv_heads=1)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, VOCAB, (1, 40), generator=g)
        ids[0, 20:34] = ids[0, 0:14]  # something for retrieval to find
        kw = dict(input_ids=ids, prompt_length=40, max_gen_len=48, eos_id=[])
        vanilla = ref.vanilla_generate(target, **kw).output_ids
        assert torch.equal(fast.vanilla_generate(ftarget, **kw).output_ids, vanilla)
        for name, r, f in _decoders(draft, fdraft):
            assert torch.equal(f(ftarget, **kw).output_ids, vanilla), name


@pytest.mark.gpu
def test_gpu_fast_sampling_is_lossless():
    target = tiny_model("llama", vocab=10, layers=1, hidden=128, heads=2, kv_heads=1, seed=21, init_std=0.5)
    draft = tiny_model("llama", vocab=10, layers=1, hidden=128, heads=2, kv_heads=1, seed=22, init_std=0.5)
    for m in (target, draft):
        m.weights = {k: v.cuda() for k, v in m.weights.items()}
    ft, fd = fast.as_fast_model(target), fast.as_fast_model(draft)
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    from specdec.shared.glide import init_glide_weights

    glide = init_glide_weights(target.config, seed=23, std=0.5, device="cuda")
    for decode in (
        lambda **kw: fast.tree_spec_generate(ft, glide, tree_shape=(3, 4), **kw),
        lambda **kw: fast.magicdec_generate(ft, gamma=2, sink_tokens=1, window=2, **kw),
        lambda **kw: fast.speculative_generate(ft, fd, gamma=2, **kw),
        lambda **kw: fast.pld_generate(ft, num_pred_tokens=2, max_ngram_size=2, **kw),
        lambda **kw: fast.logitspec_generate(ft, draft_tree_capacity=6, num_pred_tokens=2, **kw),
    ):
        lossless_check(decode, target, prompt, n_samples=1500, temperature=1.0, top_k=6)


# ---------------------------------------------------------------------------------------------
# GLIDE: the fast drafter proposes exactly the reference's trees (sliding window exercised)
# ---------------------------------------------------------------------------------------------


def _glide_pair(seed=1, window=8):
    from specdec.shared.glide import init_glide_weights

    target, ftarget = _pair(seed=seed)
    return target, ftarget, init_glide_weights(target.config, window=window, seed=seed + 1, std=0.3)


@pytest.mark.parametrize("mode,gemv_rows", [("tree", False), ("chain", False), ("tree", True)])
def test_fast_glide_drafts_equal_ref_drafts(mode, gemv_rows, monkeypatch):
    """Same drafts, round by round; ``gemv_rows``: the draft layer on the norm-folding GEMVs for
    every row count (the small-model rule, which picks them only on CUDA)."""
    if gemv_rows:
        import specdec.fast.glide.layer as fglide

        monkeypatch.setattr(fglide, "_gemv_rows_ok", lambda weights, rows, device: True)
    target, ftarget, glide = _glide_pair()
    ids = torch.tensor([REPETITIVE])  # 17 tokens + 8 new > 2 * window: the sliding cache shifts
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=8, eos_id=[])
    seen = {"ref": [], "fast": []}

    def rec(name):
        return lambda r: seen[name].append((r.draft.tokens.tolist(), r.draft.tree.parents, r.path))

    if mode == "tree":
        rr = ref.tree_spec_generate(target, glide, tree_shape=(2, 3, 4), on_round=rec("ref"), **kw)
        ff = fast.tree_spec_generate(ftarget, glide, tree_shape=(2, 3, 4), on_round=rec("fast"), **kw)
    else:
        rr = ref.spec_generate(target, glide, gamma=3, on_round=rec("ref"), **kw)
        ff = fast.spec_generate(ftarget, glide, gamma=3, on_round=rec("fast"), **kw)
    assert torch.equal(rr.output_ids, ref.vanilla_generate(target, **kw).output_ids)
    assert torch.equal(ff.output_ids, rr.output_ids)
    assert seen["fast"] == seen["ref"] and len(seen["ref"]) >= 3


@pytest.mark.gpu
def test_gpu_fast_glide_default_tree_matches_vanilla():
    from specdec.shared.glide import init_glide_weights

    target, ftarget = _pair(layers=4, seed=31, device="cuda")
    glide = init_glide_weights(target.config, seed=32, std=0.3, device="cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, 600), generator=g)  # longer than the 512 window
    kw = dict(input_ids=ids, prompt_length=600, max_gen_len=64, eos_id=[])
    vanilla = ref.vanilla_generate(target, **kw).output_ids
    seen = {"ref": [], "fast": []}
    rr = ref.tree_spec_generate(target, glide, on_round=lambda r: seen["ref"].append(r.draft.tokens.tolist()), **kw)
    ff = fast.tree_spec_generate(ftarget, glide, on_round=lambda r: seen["fast"].append(r.draft.tokens.tolist()), **kw)
    assert torch.equal(rr.output_ids, vanilla) and torch.equal(ff.output_ids, vanilla)
    # On the GPU the kernels' fp32 arithmetic (TF32 tensor-core dots) differs from the reference's in the
    # last bits, so two beam candidates with nearly equal scores may swap places; the trees must still
    # be the same in almost every round.
    same = sum(a == b for a, b in zip(seen["fast"], seen["ref"]))
    assert len(seen["fast"]) == len(seen["ref"]) and same >= 0.8 * len(seen["ref"])


@pytest.mark.parametrize("device,shape", [
    ("cpu", (2, 3, 3)),
    pytest.param("cuda", (4, 16, 16, 16, 16), marks=pytest.mark.gpu),
    pytest.param("cuda", (1, 1, 1, 1), marks=pytest.mark.gpu),
])
def test_fused_rounds_equal_unfused(device, shape, monkeypatch):
    """Greedy GLIDE rounds run as one graph on CUDA (draft + verify + accept; the same body eagerly on CPU);
    the same rounds unfused (draft, verification and acceptance apart) give identical drafts, paths and
    tokens -- the last rounds too, where the fused round limits the depth instead of drafting less -- and
    the fused path is really taken, device-driven rounds (launched before the previous round is read,
    their integers built on the device) included."""
    from specdec.fast.glide import FastGlideDrafter
    from specdec.shared.glide import init_glide_weights

    cpu = device == "cpu"  # the interpreter is slow: a smaller case
    target, ftarget = _pair(layers=1 if cpu else 3, seed=41, device=device)
    glide = init_glide_weights(target.config, seed=42, std=0.3, device=device)
    g = torch.Generator().manual_seed(1)
    n = 30 if cpu else 90
    ids = torch.randint(0, VOCAB, (1, n), generator=g)
    kw = dict(input_ids=ids, prompt_length=n, max_gen_len=10 if cpu else 40, eos_id=[], tree_shape=shape)
    calls = {"fused": 0, "ahead": 0}
    orig, orig_ahead = FastGlideDrafter.fused_round, FastGlideDrafter.launch_ahead

    def counting(self, state, tree_size):
        out = orig(self, state, tree_size)
        calls["fused"] += out is not None
        return out

    def counting_ahead(self):
        calls["ahead"] += 1
        return orig_ahead(self)

    monkeypatch.setattr(FastGlideDrafter, "fused_round", counting)
    monkeypatch.setattr(FastGlideDrafter, "launch_ahead", counting_ahead)
    runs = {}
    for fuse in (True, False):
        monkeypatch.setattr(FastGlideDrafter, "fuse_rounds", fuse)
        rounds = []
        res = fast.tree_spec_generate(ftarget, glide, on_round=lambda r: rounds.append((r.draft.tokens.tolist(), r.path, r.next_token)), **kw)
        runs[fuse] = (res.output_ids, rounds)
    # all rounds but the last ones are fused; most of them device-driven (none dropped: no EOS)
    assert calls["fused"] + calls["ahead"] == len(runs[True][1]) and calls["ahead"] >= len(runs[True][1]) // 2, calls
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]
    assert torch.equal(runs[True][0], ref.vanilla_generate(target, **{k: v for k, v in kw.items() if k != "tree_shape"}).output_ids)


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.gpu)])
def test_fast_longspec_classes_match_ref(tmp_path, family):
    """``from specdec.fast import LlamaGlide`` is the only change: same tuples, same greedy tokens."""
    from helpers import make_tiny_model_dir

    from specdec.shared.glide import init_glide_weights, save_glide

    target_dir = make_tiny_model_dir(tmp_path, family=family, vocab=VOCAB, layers=1, heads=2, kv_heads=1,
                                     hidden=128, head_dim=64, seed=7)
    glide_dir = save_glide(init_glide_weights(ref.load_model(target_dir).config, seed=8, std=0.3), tmp_path / "glide")
    cls_ref, cls_fast = (ref.LlamaGlide, fast.LlamaGlide) if family == "llama" else (ref.Qwen2Glide, fast.Qwen2Glide)
    r, f = cls_ref(None, target_dir, str(glide_dir)), cls_fast(None, target_dir, str(glide_dir))
    ids = torch.tensor([REPETITIVE[:9]])
    for method, kw in (("tree_spec_generate", dict(tree_shape=[2, 2])), ("spec_generate", dict(gamma=2))):
        out_r = getattr(r, method)(input_ids=ids, prompt_length=9, max_gen_len=4, eos_id=[], **kw)
        out_f = getattr(f, method)(input_ids=ids, prompt_length=9, max_gen_len=4, eos_id=[], **kw)
        assert len(out_f) == 5 and torch.equal(out_f[0], out_r[0]), method
    assert torch.equal(f.vanilla_generate(ids, 9, max_gen_len=4, eos_id=[])[0], out_r[0])


def test_run_ahead_round_dropped_at_eos():
    """An EOS ends the greedy fused loop with a device-driven round already launched: the output still equals
    the reference (stopped at the EOS) and the cache's device length is put back to the host's."""
    from specdec.shared.glide import init_glide_weights

    target, ftarget = _pair(layers=1, seed=43)
    glide = init_glide_weights(target.config, seed=44, std=0.3)
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    kw = dict(input_ids=ids, prompt_length=30, max_gen_len=24, tree_shape=(2, 3, 3))
    free = ref.vanilla_generate(target, eos_id=[], **{k: v for k, v in kw.items() if k != "tree_shape"}).output_ids[0].tolist()
    # an EOS well past the first rounds (device-driven rounds are running by then), first seen there
    eos = next(t for i, t in enumerate(free) if i >= 10 and t not in free[:i])
    want = ref.tree_spec_generate(target, glide, eos_id=eos, **kw)
    got = fast.tree_spec_generate(ftarget, glide, eos_id=eos, **kw)
    assert torch.equal(got.output_ids, want.output_ids) and got.output_ids[0, -1].item() == eos
    cache = ftarget.caches["main"]
    assert int(cache.length_t[0]) == cache.length
