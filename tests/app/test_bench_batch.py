"""``specdec bench --batch-size N`` (issue 19, the app part): groups of N questions decoded together, turn by
turn; greedy answers are the unbatched run's."""

from __future__ import annotations

import json

import pytest

from specdec import bench

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _answers(path) -> dict:
    with open(path) as f:
        return {r["question_id"]: r for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "question.jsonl"
    qs = [{"question_id": 1, "category": "code", "turns": ["def fibonacci(n):"]},
          {"question_id": 2, "category": "code", "turns": ["import os", "class Stack:"]},   # two turns
          {"question_id": 3, "category": "code", "turns": ["for i in range(10):"]}]
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return str(path)


def test_batched_answers_equal_unbatched(questions, tmp_path):
    common = ["--bench", questions, "--methods", "vanilla,pld", "--backend", "ref", "--max-new-tokens", "8",
              "--warmup", "0", "--no-progress"]
    assert bench.bench_main([*common, "--out-dir", str(tmp_path / "one")]) == 0
    assert bench.bench_main([*common, "--batch-size", "2", "--out-dir", str(tmp_path / "two")]) == 0
    for method in ("vanilla", "pld"):
        one, two = _answers(tmp_path / "one" / f"{method}.jsonl"), _answers(tmp_path / "two" / f"{method}.jsonl")
        assert sorted(one) == sorted(two) == [1, 2, 3]
        for qid in one:
            assert two[qid]["choices"][0]["output_ids"] == one[qid]["choices"][0]["output_ids"], (method, qid)
            assert len(two[qid]["choices"][0]["turns"]) == len(one[qid]["choices"][0]["turns"])
        assert two[1]["batch_size"] == 2 and two[3]["batch_size"] == 1   # groups {1, 2} and {3}
        # the rows of one batched turn share its wall time
        assert two[1]["choices"][0]["wall_time"][0] == two[2]["choices"][0]["wall_time"][0]


def test_batch_size_errors(questions, tmp_path, capsys):
    out = ["--bench", questions, "--backend", "ref", "--out-dir", str(tmp_path), "--no-progress", "--warmup", "0"]
    assert bench.bench_main([*out, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    assert bench.bench_main([*out, "--batch-size", "2", "--peers", "hf_generate"]) == 2
    assert "batches the specdec methods only" in capsys.readouterr().err


def test_repeats_time_every_turn_n_times_and_record_the_median_run(questions, tmp_path, monkeypatch, capsys):
    """``--repeats 3``: every turn runs three times in a row (batched or not); the record keeps the median-wall
    run's times and all three walls, the outputs equal a single run's, and equal repeats are confirmed."""
    calls = []
    real = bench.SpecdecRunner.generate
    walls = iter([0.5, 0.1, 0.3] * 100)   # the median of each turn's three runs is its third (0.3)

    def spy(self, prompt_ids, max_new_tokens, seed):
        calls.append((self.method, tuple(prompt_ids), seed))
        r = real(self, prompt_ids, max_new_tokens, seed)
        return bench.TurnResult(r.output_ids, next(walls), r.prefill_time, r.accept_lengths)

    common = ["--bench", questions, "--methods", "pld", "--backend", "ref", "--max-new-tokens", "6", "--warmup", "0",
              "--no-progress"]
    assert bench.bench_main([*common, "--out-dir", str(tmp_path / "one")]) == 0
    monkeypatch.setattr(bench.SpecdecRunner, "generate", spy)
    assert bench.bench_main([*common, "--repeats", "3", "--out-dir", str(tmp_path / "three")]) == 0
    err = capsys.readouterr().err
    assert "every turn timed 3 times" in err and "outputs equal across the repeats" in err
    # vanilla + pld, 4 turns each, three times each, the same prompt and seed three times in a row
    assert len(calls) == 2 * 4 * 3
    assert all(calls[i] == calls[i + 1] == calls[i + 2] for i in range(0, len(calls), 3))
    one, three = _answers(tmp_path / "one" / "pld.jsonl"), _answers(tmp_path / "three" / "pld.jsonl")
    for qid in one:
        ch1, ch3 = one[qid]["choices"][0], three[qid]["choices"][0]
        assert ch3["output_ids"] == ch1["output_ids"]
        assert ch3["wall_time"] == [0.3] * len(ch1["turns"])
        assert ch3["wall_time_repeats"] == [[0.5, 0.1, 0.3]] * len(ch1["turns"])
        assert ch3["repeats_equal"] == [True] * len(ch1["turns"])
        assert "wall_time_repeats" not in ch1 and "repeats_equal" not in ch1
    assert three[1]["meta"]["repeats"] == 3 and one[1]["meta"]["repeats"] == 1


def test_repeats_report_turns_whose_outputs_differ(questions, tmp_path, monkeypatch, capsys):
    """A decoder whose repeated runs disagree is reported (stderr and the record), not hidden; batched runs too."""
    real = bench.SpecdecRunner.generate_batch
    n = {"calls": 0}

    def flaky(self, prompts, max_new_tokens, seed):
        n["calls"] += 1
        rs = real(self, prompts, max_new_tokens, seed)
        if n["calls"] % 2 == 0:   # every second repeat answers one token differently in its first row
            r = rs[0]
            rs[0] = bench.TurnResult(r.output_ids[:-1] + [r.output_ids[-1] + 1], r.wall_time, r.prefill_time, r.accept_lengths)
        return rs

    monkeypatch.setattr(bench.SpecdecRunner, "generate_batch", flaky)
    args = ["--bench", questions, "--methods", "vanilla", "--backend", "ref", "--max-new-tokens", "4", "--warmup", "0",
            "--no-progress", "--batch-size", "2", "--repeats", "2", "--out-dir", str(tmp_path)]
    assert bench.bench_main(args) == 0
    err = capsys.readouterr().err
    assert "gave different outputs" in err and "3 turn(s) with different outputs" in err
    ans = _answers(tmp_path / "vanilla.jsonl")
    # groups {1, 2} and {3}; each second repeat changes its first row: q1's turn 0, q2's turn 1 (alone), q3's turn 0
    assert [ans[q]["choices"][0]["repeats_equal"] for q in (1, 2, 3)] == [[False], [True, False], [False]]


def test_repeats_must_be_positive(questions, tmp_path, capsys):
    out = ["--bench", questions, "--backend", "ref", "--out-dir", str(tmp_path), "--no-progress", "--warmup", "0"]
    assert bench.bench_main([*out, "--repeats", "0"]) == 2
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
