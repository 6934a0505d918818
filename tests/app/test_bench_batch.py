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
