"""specdec bench / report: the report's arithmetic on hand-made answer files, prompt sets,
conversations, and an end-to-end bench + report run with the embedded model on CPU (ref path)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from specdec import bench, report
from specdec.shared.assets import ASSETS_DIR, EMBEDDED_MODELS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/<layer>/ -> the repository


# ---------------------------------------------------------------------------------------------
# Hand-made answer files
# ---------------------------------------------------------------------------------------------


def _rec(qid, cat, new_tokens, wall, accept_lengths=None, output_ids=None, prefill=None, method="m", texts=None):
    ch = {"index": 0, "turns": texts or ["x" * 3] * len(new_tokens), "new_tokens": new_tokens, "wall_time": wall}
    if accept_lengths is not None:
        ch["accept_lengths"] = accept_lengths
    if output_ids is not None:
        ch["output_ids"] = output_ids
    if prefill is not None:
        ch["prefill_time"] = prefill
        ch["decode_time"] = [w - p for w, p in zip(wall, prefill)]
    return {"question_id": qid, "category": cat, "method": method, "backend": "ref", "choices": [ch]}


def _write(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


BASE = [
    # per-question throughput: 10, 20, 10 tok/s (q2 has two turns: 40 tokens / 4 s)
    _rec(1, "A", [10], [1.0], [1] * 10, [[1] * 10], prefill=[0.1], method="vanilla"),
    _rec(2, "A", [20], [1.0], [1] * 20, [[2] * 20], prefill=[0.3], method="vanilla"),
    _rec(3, "B", [30, 10], [2.0, 2.0], [1] * 40, [[3] * 30, [4] * 10], prefill=[0.2, 0.2], method="vanilla"),
]
METHOD = [
    # 20, 40, 40 tok/s; texts that re-tokenise to nothing like the counts: only new_tokens counts
    _rec(1, "A", [10], [0.5], [1, 4, 5], [[1] * 10], prefill=[0.1], method="tree_spec", texts=["a"]),
    _rec(2, "A", [20], [0.5], [1, 19], [[2] * 19 + [9]], prefill=[0.1], method="tree_spec", texts=["b"]),
    _rec(3, "B", [30, 10], [0.5, 0.5], [1, 5, 5, 5, 5, 5, 4, 1, 4, 5], [[3] * 30, [4] * 10], prefill=[0.1, 0.1], method="tree_spec"),
]


def test_report_arithmetic_per_category_and_overall():
    data = report.compare(BASE, {"tree_spec": METHOD}, base_name="vanilla")
    cats = data["categories"]
    assert list(cats) == ["A", "B", "overall"]
    a, b, o = cats["A"]["tree_spec"], cats["B"]["tree_spec"], cats["overall"]["tree_spec"]
    # Spec-Bench: mean of per-question throughputs, speedup = ratio of those means
    assert a["tok_s"] == pytest.approx(30.0) and cats["A"]["vanilla"]["tok_s"] == pytest.approx(15.0)
    assert a["speedup"] == pytest.approx(2.0)
    assert b["speedup"] == pytest.approx(4.0)
    assert o["speedup"] == pytest.approx((100 / 3) / (40 / 3))  # 2.5, not the mean of per-category speedups
    assert cats["overall"]["vanilla"]["speedup"] == pytest.approx(1.0)
    # tau pooled over rounds: A has 30 tokens in 5 passes = 6.0 (the mean of per-question taus would be 6.67)
    assert a["tau"] == pytest.approx(6.0)
    assert b["tau"] == pytest.approx(40 / 10)
    assert o["tau"] == pytest.approx(70 / 15)
    assert cats["overall"]["vanilla"]["tau"] == pytest.approx(1.0)
    # histogram of per-pass lengths, pooled
    assert a["hist"] == {1: 2, 4: 1, 5: 1, 19: 1}
    assert o["hist"] == {1: 4, 4: 3, 5: 7, 19: 1}
    assert sum(k * v for k, v in o["hist"].items()) == o["tokens"] == 70
    # decode tokens/s: (tokens - 1 per turn) / decode time; TTFT = mean prefill
    assert a["decode_tok_s"] == pytest.approx((9 + 19) / (0.4 + 0.4))
    assert cats["overall"]["vanilla"]["ttft_ms"] == pytest.approx(1e3 * (0.1 + 0.3 + 0.2 + 0.2) / 4)
    # output equality per turn: q2 differs in its last token
    assert a["same_output"] == pytest.approx(0.5) and b["same_output"] == 1.0
    assert o["same_output"] == pytest.approx(3 / 4)


def test_report_counts_recorded_tokens_never_retokenises():
    # same wall times, texts of different lengths: speedup must follow new_tokens only
    base = [_rec(1, "A", [10], [1.0], texts=["one two three"])]
    meth = [_rec(1, "A", [10], [1.0], texts=["a"])]
    data = report.compare(base, {"m": meth})
    assert data["categories"]["overall"]["m"]["speedup"] == pytest.approx(1.0)
    assert data["categories"]["overall"]["m"]["tau"] is None  # no accept_lengths recorded


def test_report_unmatched_questions_left_out():
    data = report.compare(BASE, {"m": METHOD[:2]})
    assert data["unmatched"]["m"] == 1
    o = data["categories"]["overall"]["m"]
    assert o["questions"] == 2 and o["speedup"] == pytest.approx(2.0)
    assert "m" not in data["categories"]["B"]
    assert "not in both files" in report.format_report(data)


def test_report_repeat_spread_from_bench_repeats():
    """bench --repeats N records every turn's N walls; the report gives the median over turns of (max - min) /
    median, and shows the column only when some file has repeats."""
    meth = [dict(r, choices=[dict(r["choices"][0])]) for r in METHOD]
    meth[0]["choices"][0]["wall_time_repeats"] = [[0.5, 0.6, 0.4]]               # spread 0.2 / 0.5 = 0.4
    meth[1]["choices"][0]["wall_time_repeats"] = [[0.5, 0.5, 0.55]]              # 0.05 / 0.5 = 0.1
    meth[2]["choices"][0]["wall_time_repeats"] = [[0.5, 0.52, 0.48], [0.5]]      # 0.04 / 0.5 = 0.08; one wall: none
    data = report.compare(BASE, {"tree_spec": meth}, base_name="vanilla")
    o = data["categories"]["overall"]
    assert o["tree_spec"]["repeat_spread"] == pytest.approx(0.1)                  # median of 0.4, 0.1, 0.08
    assert data["categories"]["A"]["tree_spec"]["repeat_spread"] == pytest.approx(0.25)   # median of 0.4, 0.1
    assert o["vanilla"]["repeat_spread"] is None
    text = report.format_report(data)
    assert "repeat spread" in text and "10.0%" in text
    assert "repeat spread" not in report.format_report(report.compare(BASE, {"tree_spec": METHOD}))
    assert report._spread([1.0]) is None and report._spread("x") is None and report._spread([0.0, 0.0]) is None


def test_report_cli_tables_markdown_and_json(tmp_path, capsys):
    bp, mp = _write(tmp_path / "vanilla.jsonl", BASE), _write(tmp_path / "tree.jsonl", METHOD)
    assert report.report_main(["--base", bp, mp, "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| tree_spec (ref)" in out and "2.50x" in out and "4.00x" in out and "category: A" in out
    assert "speedup (tau) by category" in out and "accept-length histogram" in out
    assert report.report_main(["--base", bp, "--file", mp, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["categories"]["overall"]["tree_spec (ref)"]["speedup"] == pytest.approx(2.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\n')
    assert report.report_main(["--base", str(bad), mp]) == 2
    assert "not an answer record" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Prompt sets, conversations, bookkeeping
# ---------------------------------------------------------------------------------------------


def test_clip_accept_lengths():
    assert bench.clip_accept_lengths([1, 5, 5], 8) == [1, 5, 2]
    assert bench.clip_accept_lengths([1, 1, 1], 3) == [1, 1, 1]
    assert bench.clip_accept_lengths([1, 4], 1) == [1]
    assert bench.clip_accept_lengths(None, 3) is None


def test_methods_and_questions(tmp_path):
    assert bench.canonical_method("tree_spec_generate") == "tree_spec"
    with pytest.raises(ValueError, match="unknown method"):
        bench.canonical_method("medusa")
    assert bench._parse_methods("pld,spec", "all") == ["vanilla", "pld", "spec", "hf_generate", "hf_assisted", "hf_pld"]
    p = _write(tmp_path / "question.jsonl", [{"question_id": i, "category": "c", "turns": [f"q{i}"]} for i in range(5)])
    assert [q["question_id"] for q in bench.load_questions(str(tmp_path), 1, 3)] == [1, 2]
    assert len(bench.load_questions(p)) == 5
    with pytest.raises(ValueError, match="not found"):
        bench.load_questions(str(tmp_path / "nope.jsonl"))


def test_conversation_prompt_multi_turn():
    turns, answers = ["Hi?", "And then?"], ["Hello."]
    v = bench.conversation_prompt(None, turns, answers, family="vicuna", system="S")
    assert v == "S USER: Hi? ASSISTANT: Hello.</s>USER: And then? ASSISTANT:"
    assert bench.conversation_prompt(None, turns, [], family="raw") == "Hi?"
    assert bench.conversation_prompt(None, turns, answers, family="raw") == "Hi?Hello.\n\nAnd then?"
    q = bench.conversation_prompt(None, turns, answers, family="qwen2", system="S")
    assert q.endswith("<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
    l2 = bench.conversation_prompt(None, turns, answers, family="llama2")
    assert l2 == "[INST] Hi? [/INST] Hello. </s><s>[INST] And then? [/INST]"
    with pytest.raises(ValueError):
        bench.conversation_prompt(None, turns, ["a", "b"], family="raw")


def test_shipped_prompt_sets_are_held_out_and_small():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import default_corpus
    finally:
        sys.path.pop(0)
    total = 0
    for name, fn in bench.SHIPPED_SETS.items():
        path = os.path.join(bench.PROMPTS_DIR, fn)
        total += os.path.getsize(path)
        qs = bench.load_questions(name)
        assert qs and len({q["question_id"] for q in qs}) == len(qs)
        for q in qs:
            files = [q["source"]["file"]] if "file" in q["source"] else [f.split(":")[0] for f in q["source"]["files"]]
            for f in files:
                assert default_corpus.is_heldout(f), f"{name} q{q['question_id']}: {f} is a training file"
    assert total < 1 << 20
    code = bench.load_questions("stdlib_code")
    assert {q["category"] for q in code} == {"file_start", "func_body"} and len(code) >= 40
    assert all(q["prompt_tokens"] <= 1024 for q in code)  # fit the embedded model's 2048 positions with room to generate
    longs = bench.load_questions("stdlib_long")
    for q in longs:
        n = 7680 if q["category"] == "long_8k" else int(q["category"].split("_")[1][:-1]) * 1024  # the build's target
        assert 0.9 * n <= q["prompt_tokens"] <= n
    assert [q["category"] for q in longs] == ["long_4k"] * 3 + ["long_16k"] * 2 + ["long_32k"] * 2 + ["long_8k"] * 3
    assert all(q["prompt_tokens"] + 512 <= 8192 for q in longs if q["category"] == "long_8k")  # room to generate


# ---------------------------------------------------------------------------------------------
# End to end: bench + report with the embedded model, ref backend, CPU
# ---------------------------------------------------------------------------------------------


def _embedded(name: str) -> bool:
    d = os.path.join(ASSETS_DIR, EMBEDDED_MODELS[name])
    return os.path.isdir(d) and any(f.endswith((".safetensors", ".pth", ".bin")) for f in os.listdir(d))


@pytest.mark.skipif(not (_embedded("default") and _embedded("default-draft")),
                    reason="the embedded default model (target + draft) is not shipped in shared/assets/default yet")
def test_bench_and_report_end_to_end_embedded_cpu(tmp_path, capsys):
    methods = "speculative" + (",spec" if _embedded("default-glide") else ",pld")
    out = tmp_path / "out"
    # a short held-out code question (single turn) and a two-turn question (turn 2 sees turn 1's answer)
    short = min(bench.load_questions("stdlib_code"), key=lambda q: q["prompt_tokens"])
    qfile = _write(tmp_path / "q.jsonl", [short, {"question_id": 99, "category": "chat", "turns": ["def add(a, b):", "\ndef mul(a, b):"]}])
    rc = bench.bench_main(["--bench", qfile, "--methods", methods, "--peers", "hf_generate", "--backend", "ref",
                           "--max-new-tokens", "5", "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    base = report.load_answers(str(out / "vanilla.jsonl"))
    assert [r["question_id"] for r in base] == [short["question_id"], 99]
    for m in ["vanilla", "hf_generate"] + methods.split(","):
        recs = report.load_answers(str(out / f"{m}.jsonl"))
        for r, b in zip(recs, base):
            ch = r["choices"][0]
            assert r["method"] == m and r["meta"]["method"] == m and r["model_id"] == "specdec-default"
            assert ch["new_tokens"] == [len(t) for t in ch["output_ids"]] and all(1 <= n <= 5 for n in ch["new_tokens"])
            assert sum(ch["accept_lengths"]) == sum(ch["new_tokens"]) and sum(ch["decoding_steps"]) == len(ch["accept_lengths"])
            assert all(w >= p > 0 for w, p in zip(ch["wall_time"], ch["prefill_time"]))
            assert ch["output_ids"] == b["choices"][0]["output_ids"]  # greedy: lossless, and transformers agrees
    assert report.load_answers(str(out / "speculative.jsonl"))[0]["meta"]["options"] == {"gamma": 5, "draft_window": None}
    ch = base[1]["choices"][0]
    assert len(ch["turns"]) == 2 and len(ch["new_tokens"]) == 2
    assert ch["prompt_tokens"][1] >= ch["prompt_tokens"][0] + ch["new_tokens"][0]  # turn 1's prompt + its answer + turn 2

    files = [str(out / f"{m}.jsonl") for m in methods.split(",") + ["hf_generate"]]
    assert report.report_main(["--base", str(out / "vanilla.jsonl"), *files]) == 0
    text = capsys.readouterr().out
    assert "overall" in text and "speculative (ref)" in text and "hf_generate" in text and "100%" in text

    # the too-short filter and the context limit
    assert bench.bench_main(["--bench", qfile, "--methods", "vanilla", "--backend", "ref",
                             "--min-prompt-tokens", "100000", "--out-dir", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "no question left" in capsys.readouterr().err


@pytest.mark.skipif(not _embedded("default"), reason="the embedded default model is not shipped in shared/assets/default yet")
def test_bench_prompt_warmup_runs_every_method_on_every_first_turn_before_timing(tmp_path, monkeypatch):
    """With a warm-up, each method runs on every question's first-turn prompt (PROMPT_WARMUP_TOKENS new tokens)
    before its first timed turn, so neither the target's nor a draft model's per-length setup is timed;
    --warmup 0 skips every warm-up call."""
    calls = []
    real, real_question = bench.SpecdecRunner.generate, bench._run_question

    def spy(self, prompt_ids, max_new_tokens, seed):
        calls.append((self.method, list(prompt_ids), max_new_tokens))
        return real(self, prompt_ids, max_new_tokens, seed)

    def timed(runner, *a, **k):
        calls.append(("timed", runner.method, None))
        return real_question(runner, *a, **k)

    monkeypatch.setattr(bench.SpecdecRunner, "generate", spy)
    monkeypatch.setattr(bench, "_run_question", timed)
    qs = sorted(bench.load_questions("stdlib_code"), key=lambda q: q["prompt_tokens"])[:2]
    qs.append({"question_id": 99, "category": "chat", "turns": ["def add(a, b):", "\ndef mul(a, b):"]})
    qfile = _write(tmp_path / "q.jsonl", qs)
    n_new, n_warm = 12, bench.PROMPT_WARMUP_TOKENS
    assert n_warm < n_new
    args = ["--bench", qfile, "--methods", "speculative", "--backend", "ref", "--max-new-tokens", str(n_new), "--no-progress"]
    assert bench.bench_main(args + ["--out-dir", str(tmp_path / "a")]) == 0
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer("default")
    firsts = [encode_prompt(tok, bench.conversation_prompt(tok, q["turns"], [], None)) for q in qs]
    for method in ("vanilla", "speculative"):
        mine = [c for c in calls if c[1 if c[0] == "timed" else 0] == method]
        first_timed = mine.index(("timed", method, None))
        warm = [(ids, n) for m, ids, n in mine[:first_timed]]
        assert all((ids, n_warm) in warm for ids in firsts), method
        assert not any(n == n_warm for m, ids, n in mine[first_timed:] if m != "timed"), method   # never timed
    timed_out = report.load_answers(str(tmp_path / "a" / "speculative.jsonl"))
    assert timed_out[0]["choices"][0]["output_ids"] == report.load_answers(str(tmp_path / "a" / "vanilla.jsonl"))[0]["choices"][0]["output_ids"]
    calls.clear()
    assert bench.bench_main(args + ["--out-dir", str(tmp_path / "b"), "--warmup", "0"]) == 0
    generated = [n for m, _, n in calls if m != "timed"]
    assert generated == [n_new] * (2 * 4)   # vanilla + speculative: 2 + 2 turns each, timed only


@pytest.mark.skipif(not _embedded("default"), reason="the embedded default model is not shipped in shared/assets/default yet")
def test_bench_tree_shape_and_gamma_auto_are_resolved_once_and_recorded(tmp_path, fixed_cost_model, monkeypatch):
    """--tree-shape auto / --gamma auto: chosen once per method (from the fixed CPU-like cost curve) as the CLI
    chooses them, recorded as concrete options with an 'auto' marker, passed concrete to every turn; --gamma auto
    leaves the draft-model chain at its default; lossless."""
    import specdec.ref.glide as ref_glide

    short = min(bench.load_questions("stdlib_code"), key=lambda q: q["prompt_tokens"])
    qfile, out = _write(tmp_path / "q.jsonl", [short]), tmp_path / "out"
    chosen, real_shape, real_gamma = [], ref_glide.resolve_tree_shape, ref_glide.resolve_gamma
    # the decoders resolve their concrete knob too (a validation): count the calls that choose
    monkeypatch.setattr(ref_glide, "resolve_tree_shape", lambda *a, **k: (a[2] == "auto" and chosen.append("shape")) or real_shape(*a, **k))
    monkeypatch.setattr(ref_glide, "resolve_gamma", lambda *a, **k: (a[2] == "auto" and chosen.append("gamma")) or real_gamma(*a, **k))
    seen = []
    real_generate = bench.SpecdecRunner.generate

    def spy(self, prompt_ids, max_new_tokens, seed):
        seen.append((self.method, dict(self.options)))
        return real_generate(self, prompt_ids, max_new_tokens, seed)

    monkeypatch.setattr(bench.SpecdecRunner, "generate", spy)
    assert bench.bench_main(["--bench", qfile, "--methods", "tree_spec,spec,speculative", "--backend", "ref", "--tree-shape", "auto",
                             "--gamma", "auto", "--max-new-tokens", "6", "--out-dir", str(out), "--no-progress"]) == 0
    assert sorted(chosen) == ["gamma", "shape"]                                     # once each, not per turn
    tree = report.load_answers(str(out / "tree_spec.jsonl"))[0]
    shape = tree["meta"]["options"]["tree_shape"]
    assert tree["meta"]["auto"] == ["tree_shape"] and all(isinstance(n, int) and n >= 1 for n in shape)
    assert shape != [4, 16, 16, 16, 16]                                             # the steep curve picks a small tree
    spec = report.load_answers(str(out / "spec.jsonl"))[0]
    assert spec["meta"]["auto"] == ["gamma"] and isinstance(spec["meta"]["options"]["gamma"], int)
    speculative = report.load_answers(str(out / "speculative.jsonl"))[0]
    assert "auto" not in speculative["meta"] and speculative["meta"]["options"]["gamma"] == 5
    assert all(o.get("tree_shape") != "auto" and o.get("gamma") != "auto" for _, o in seen)
    vanilla_ids = report.load_answers(str(out / "vanilla.jsonl"))[0]["choices"][0]["output_ids"]
    for rec in (tree, spec, speculative):
        assert rec["choices"][0]["output_ids"] == vanilla_ids
    with pytest.raises(SystemExit):
        bench.bench_main(["--bench", qfile, "--methods", "tree_spec", "--tree-shape", "4,x", "--out-dir", str(out)])


@pytest.mark.skipif(not _embedded("default"), reason="the embedded default model is not shipped in shared/assets/default yet")
def test_bench_logitspec_capacity_auto_is_resolved_once_and_recorded(tmp_path, fixed_cost_model):
    """--draft-tree-capacity auto: chosen once before the turns (from the fixed, CPU-like cost curve of
    tests/app/conftest.py: a small tree), recorded as the concrete capacity with an 'auto' marker; lossless."""
    short = min(bench.load_questions("stdlib_code"), key=lambda q: q["prompt_tokens"])
    qfile, out = _write(tmp_path / "q.jsonl", [short]), tmp_path / "out"
    assert bench.bench_main(["--bench", qfile, "--methods", "logitspec", "--backend", "ref", "--draft-tree-capacity", "auto",
                             "--max-new-tokens", "6", "--out-dir", str(out), "--no-progress"]) == 0
    rec = report.load_answers(str(out / "logitspec.jsonl"))[0]
    cap = rec["meta"]["options"]["draft_tree_capacity"]
    assert isinstance(cap, int) and 1 <= cap < 64 and rec["meta"]["auto"] == ["draft_tree_capacity"]
    assert rec["choices"][0]["output_ids"] == report.load_answers(str(out / "vanilla.jsonl"))[0]["choices"][0]["output_ids"]
    with pytest.raises(SystemExit):
        bench.bench_main(["--bench", qfile, "--methods", "logitspec", "--draft-tree-capacity", "wide", "--out-dir", str(out)])
