"""Tensor parallelism (fast/tp.py) on the CPU: two gloo processes, the Triton kernels under the interpreter.

Every decoder gives the same greedy tokens at TP = 2 as at TP = 1 (fp32, a small model; bitwise equality
of logits across TP degrees is not promised: the row-parallel sums are added in another order), the ranks
agree with each other, and bad configurations are clear errors. The GLIDE decoders (draft layer sharded
like the target, fast/glide) also draft the same trees round by round: the chain and a tree on the
sharded beam (per-rank top-k merged), and keyed sampling over a truncated draft vocabulary on the gathered
logits (a vocabulary holding keyed vanilla's tokens, all on level 1: drafts are accepted every round). The vocab-sharded reductions (argmax, log_softmax, the beam's top-k) are checked with the real
collectives against the full tensors' results.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from lossless import tiny_hf_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; the ranks run on one thread each too

PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]
NEW = 6


KEYED = dict(temperature=1.0, sampling="keyed", seed=3)
BATCH = [[5, 6, 7, 8, 9, 5, 6, 7], [12, 13, 12, 13, 12]]


def _glide_decoders(fast, glide, small, trees: dict):
    """The GLIDE decoders; each records its drafted trees (tokens, parents, accepted path) in ``trees[name]``."""
    def rec(name):
        trees[name] = []
        return lambda r: trees[name].append((r.draft.tokens.tolist(), list(r.draft.tree.parents), r.path))

    return {
        "spec": lambda m, kw: fast.spec_generate(m, glide, gamma=3, on_round=rec("spec"), **kw),
        "tree": lambda m, kw: fast.tree_spec_generate(m, glide, tree_shape=(8, 8, 2), on_round=rec("tree"), **kw),
        "tree keyed small vocab": lambda m, kw: fast.tree_spec_generate(m, small, tree_shape=(small.vocab_map.numel(), 4),
                                                                        **kw, **KEYED, on_round=rec("tree keyed small vocab")),
    }


def _decoders(fast, draft, glides=None, trees=None):
    glide = {} if glides is None else _glide_decoders(fast, *glides, trees)
    return {**glide,
        "vanilla": lambda m, kw: fast.vanilla_generate(m, **kw),
        "vanilla keyed": lambda m, kw: fast.vanilla_generate(m, **kw, **KEYED),
        "magicdec keyed": lambda m, kw: fast.magicdec_generate(m, gamma=3, sink_tokens=2, window=6, **kw, **KEYED),
        "pld batch": lambda m, kw: fast.pld_generate(m, BATCH, None, num_pred_tokens=4, max_gen_len=kw["max_gen_len"],
                                                     eos_id=[]),
        "speculative": lambda m, kw: fast.speculative_generate(m, draft, gamma=3, **kw),
        "pld": lambda m, kw: fast.pld_generate(m, num_pred_tokens=4, **kw),
        "logitspec": lambda m, kw: fast.logitspec_generate(m, draft_tree_capacity=8, num_pred_tokens=4, **kw),
        "magicdec": lambda m, kw: fast.magicdec_generate(m, gamma=3, sink_tokens=2, window=6, **kw),
    }


# head_dim 16 and MLP 128 (the CPU interpreter's cost grows with the widths); still two layers: one layer's
# all-reduced output feeds the next, and GLIDE reads the last layer's per-rank cache
TARGET = dict(vocab=67, layers=2, hidden=64, heads=4, kv_heads=2, seed=1, init_std=0.3, max_pos=256, intermediate=128)
HEAD_DIM = TARGET["hidden"] // TARGET["heads"]


def _target_hf():
    """The target as a transformers model (saved to disk for the per-rank checkpoint loading)."""
    return tiny_hf_model("qwen2", **TARGET)


def _models():
    # 4 query heads, 2 KV heads, MLP 128: divisible by 2 ranks; qwen2 for the q/k/v biases
    target = tiny_model("qwen2", **TARGET)   # vocab 67: the lm_head shards are padded
    draft = tiny_model("llama", vocab=67, layers=1, hidden=64, heads=2, kv_heads=1, seed=2, init_std=0.3, max_pos=256)
    return target, draft


def _glides(target, keep: list[int]):
    """A random GLIDE draft (window 8: the 17-token prompt + 6 new shift its sliding cache) and the same
    draft over the truncated vocabulary ``keep`` plus ids at both ends of both ranks' vocabulary slices."""
    from specdec.shared.glide import init_glide_weights, with_draft_vocab

    glide = init_glide_weights(target.config, window=8, seed=3, std=0.3)
    return glide, with_draft_vocab(glide, torch.tensor(sorted(set(keep) | {0, 33, 34, 66})))


def _check_reductions(tp) -> None:
    """TensorParallel.argmax / log_softmax / beam_topk with the real collectives == the full tensors' results."""
    from specdec.shared.glide import beam_level

    v = 67
    width = -(-v // tp.world)
    gen = torch.Generator().manual_seed(5)                     # the same data on every rank
    full = torch.randint(-3, 3, (4, 5, v), generator=gen).float()
    full[0, 0, width - 1] = full[0, 0, width] = 9.0            # a tie across the shard boundary: the lower id
    full[0, 1, :] = -1.0                                        # all negative: the zero padding must not win
    full[0, 2, v - 1] = float("nan")                            # NaN wins, as in torch.argmax
    padded = torch.cat([full, torch.zeros(4, 5, tp.world * width - v)], dim=-1)
    local = padded[..., tp.rank * width:(tp.rank + 1) * width]
    assert torch.equal(tp.argmax(local, v), torch.argmax(full, dim=-1))
    logits = torch.randn(3, v, generator=gen) * 4
    local = torch.cat([logits, torch.zeros(3, tp.world * width - v)], dim=-1)[:, tp.rank * width:(tp.rank + 1) * width]
    logp = tp.log_softmax(local, v)
    want = torch.log_softmax(logits, dim=-1)[:, tp.rank * width:(tp.rank + 1) * width]
    torch.testing.assert_close(logp, want, rtol=0, atol=2e-6)
    logp = torch.randint(-4, 0, (3, v), generator=gen).float()      # many exact ties
    cum = torch.tensor([-1.0, 0.0, -1.0])
    local = logp[:, tp.rank * width:(tp.rank + 1) * width]
    for k in (1, 16, 3 * v):
        got = tp.beam_topk(cum, local, v, k, width)
        for g, w in zip(got, beam_level(cum, logp, k)):
            assert torch.equal(g, w)


def _count_tp_calls(tp, fn):
    """``(fn(), {"argmax": n, "all_gather_last": n})``: how often ``fn`` took a sharded argmax and gathered logits."""
    cls = type(tp)   # a frozen dataclass: count the calls on the class for this one run
    calls = {"argmax": 0, "all_gather_last": 0}
    real = {name: getattr(cls, name) for name in calls}

    def counted(name):
        def wrapper(self, *a, **k):
            calls[name] += 1
            return real[name](self, *a, **k)
        return wrapper

    for name in calls:
        setattr(cls, name, counted(name))
    try:
        return fn(), calls
    finally:
        for name in calls:
            setattr(cls, name, real[name])


def _check_greedy_argmax_is_sharded(calls: dict) -> None:
    """Greedy decoding under TP takes each pass's argmax across the vocabulary shards: the logits are gathered
    only by the prefill (once per prompt row) -- vanilla's steps, and the verifications of the drafters that
    do not read the root's logits (PLD, a draft model; one prompt and a batch). LogitSpec reads the root's full
    logits, so its verifications keep gathering them. ``calls``: per decoder, its runs' counts (:func:`_count_tp_calls`)."""
    for name, prefills in (("vanilla", 1), ("pld", 1), ("speculative", 1), ("pld batch", len(BATCH))):
        assert calls[name]["all_gather_last"] == prefills and calls[name]["argmax"] >= 1, (name, calls[name])
    assert calls["logitspec"]["all_gather_last"] > 1, calls["logitspec"]


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, keep: list[int]) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    import specdec.fast as fast
    from specdec.fast.tp import TensorParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        target, draft = _models()
        tp = TensorParallel(rank=rank, world=world)
        _check_reductions(tp)
        fm = fast.as_fast_model(target, tp=tp)
        assert fm.w["layers.0.wqkv"].shape[0] == (4 + 2 * 2) * HEAD_DIM // world      # this rank's heads only
        glides, trees = _glides(target, keep), {}
        fg = fast.glide.as_fast_glide(glides[0], tp=tp)
        assert fg.w["wqkv"].shape[0] == fg.w["wq_x"].shape[0] * 2 == (4 + 2 * 2) * HEAD_DIM // world   # the draft's too
        loaded = fast.load_glide(os.path.join(out_dir, "glide"), fm, window=8)           # from disk: the same slice
        assert loaded.tp is tp and loaded.w.keys() == fg.w.keys() and all(torch.equal(loaded.w[k], fg.w[k]) for k in fg.w)
        ids = torch.tensor([PROMPT])
        kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=NEW, eos_id=[])
        out, calls = {}, {}
        for name, run in _decoders(fast, draft, glides, trees).items():
            if name != "vanilla keyed":
                res, calls[name] = _count_tp_calls(tp, lambda: run(fm, kw))
                out[name] = res.output_ids
        _check_greedy_argmax_is_sharded(calls)
        lsg = fast.Qwen2Glide(None, os.path.join(out_dir, "target"), os.path.join(out_dir, "glide"), dtype=torch.float32,
                              device="cpu", window=8, tp=tp)     # LongSpec's class, each rank loading its slice
        assert lsg.target.tp is tp and lsg.glide.tp is tp
        assert torch.equal(lsg.tree_spec_generate(ids, ids.shape[1], tree_shape=(8, 8, 2), max_gen_len=NEW, eos_id=[])[0],
                           out["tree"])
        with pytest.raises(ValueError, match="tree_shape='auto' is not supported on a tensor-parallel target"):
            fast.tree_spec_generate(fm, glides[0], tree_shape="auto", **kw)
        with pytest.raises(ValueError, match="draft_tree_capacity='auto' is not supported on a tensor-parallel target"):
            fast.logitspec_generate(fm, draft_tree_capacity="auto", **kw)
        with pytest.raises(ValueError, match=f"rank {rank}'s slice of a 2-way split; the target is not split"):
            fast.glide.as_fast_glide(fg)
        torch.save((out, trees), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tp2_gives_tp1_tokens_for_every_decoder():
    import specdec.fast as fast

    target, draft = _models()
    ids = torch.tensor([PROMPT])
    kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=NEW, eos_id=[])
    trees: dict = {}
    keep = fast.vanilla_generate(target, **kw, **KEYED).output_ids[0].tolist()     # the small vocabulary holds these
    with tempfile.TemporaryDirectory() as tmp:
        from specdec.shared.glide import save_glide

        save_glide(_glides(target, keep)[0], os.path.join(tmp, "glide"))
        _target_hf().save_pretrained(os.path.join(tmp, "target"))
        # the two ranks decode while this process computes the TP = 1 reference (three one-thread processes
        # share the cores instead of the reference running first with the ranks' share idle)
        ctx = mp.start_processes(_rank_main, args=(2, os.path.join(tmp, "init"), tmp, keep), nprocs=2, join=False,
                                 start_method="spawn")
        try:
            want = {name: run(target, kw).output_ids for name, run in _decoders(fast, draft, _glides(target, keep), trees).items()}
        except BaseException:
            for p in ctx.processes:
                p.terminate()
                p.join()
            raise
        while not ctx.join():
            pass
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert all(torch.equal(want[k], want["vanilla"]) for k in ("speculative", "pld", "logitspec", "magicdec", "spec", "tree"))
    assert torch.equal(want["magicdec keyed"], want["vanilla keyed"])               # lossless
    assert torch.equal(want["tree keyed small vocab"], want["vanilla keyed"])
    for name, tokens in want.items():
        if name == "vanilla keyed":   # the TP = 1 reference of the keyed decoders only
            continue
        assert torch.equal(ranks[0][0][name], tokens), name
        assert torch.equal(ranks[1][0][name], tokens), name
    assert sum(len(path) - 1 for *_, path in trees["tree keyed small vocab"]) >= 2   # accepted drafts
    for name, rounds in trees.items():                                               # the same trees, round by round
        assert len(rounds) >= 2 and ranks[0][1][name] == rounds and ranks[1][1][name] == rounds, name


def test_head_counts_not_divisible_are_a_clear_error():
    import specdec.fast as fast
    from specdec.fast.tp import TensorParallel, init_tensor_parallel

    target, _ = _models()
    with pytest.raises(ValueError, match=r"attention heads \(4\) to be a multiple of 3"):
        fast.as_fast_model(target, tp=TensorParallel(rank=0, world=3))
    with pytest.raises(ValueError, match=r"KV heads \(2\) to be a multiple of 4"):   # GQA: 4 query heads split, 2 KV heads not
        fast.as_fast_model(target, tp=TensorParallel(rank=0, world=4))
    glide, _ = _glides(target, [])
    with pytest.raises(ValueError, match=r"KV heads \(2\) to be a multiple of 4"):   # the GLIDE layer: the same rule
        fast.glide.as_fast_glide(glide, tp=TensorParallel(rank=0, world=4))
    with pytest.raises(ValueError, match="tp must be an int >= 1"):
        init_tensor_parallel(0)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        init_tensor_parallel(2)   # this process is a world of 1


def test_cli_tp_errors(capsys):
    from specdec.cli import main

    assert main(["generate", "--tp", "0", "x"]) == 2
    assert "--tp must be >= 1" in capsys.readouterr().err
    assert main(["generate", "--tp", "2", "--backend", "ref", "x"]) == 2
    assert "--backend fast" in capsys.readouterr().err
    assert main(["generate", "--tp", "2", "--backend", "fast", "--method", "tree_spec", "--tree-shape", "auto", "x"]) == 2
    assert "auto is not supported with --tp" in capsys.readouterr().err
    assert main(["generate", "--tp", "2", "--backend", "fast", "--method", "tree_spec", "--force-interpreter", "x"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err   # GLIDE is accepted: the launch is what is missing
    assert main(["generate", "--tp", "2", "--backend", "fast", "--method", "vanilla", "--force-interpreter", "x"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_bench_tp_errors(capsys, tmp_path):
    from specdec.bench import bench_main

    out = ["--out-dir", str(tmp_path)]
    assert bench_main(["--tp", "2", "--backend", "ref", "--methods", "vanilla", *out]) == 2
    assert "--backend fast" in capsys.readouterr().err
    assert bench_main(["--tp", "2", "--methods", "vanilla,tree_spec", *out]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err   # GLIDE methods are accepted under TP
    assert bench_main(["--tp", "2", "--methods", "vanilla,pld", *out]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err
    assert bench_main(["--tp", "0", *out]) == 2
