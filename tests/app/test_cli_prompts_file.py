"""``specdec generate --prompts-file``: several prompts decoded as one batch (issue 19, the app part)."""

from __future__ import annotations

import json

import pytest

from specdec.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = ["def fibonacci(n):", "import os", "class Stack:\n    def push(self, x):"]


def _json_lines(capsys, *argv):
    rc = main(["generate", "--backend", "ref", "--json", "-n", "8", "--eos", "", *argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("method", ["vanilla", "pld", "tree_spec"])
def test_each_request_equals_its_prompt_decoded_alone(capsys, tmp_path, method):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    lines = _json_lines(capsys, "--method", method, "--prompts-file", str(path), "--compare")
    *requests, total = lines
    assert [r["request"] for r in requests] == [1, 2, 3]
    assert total["total"]["requests"] == 3 and total["total"]["tokens"] == sum(r["tokens"] for r in requests)
    for r, prompt in zip(requests, PROMPTS):
        alone = _json_lines(capsys, "--method", method, prompt)[0]
        assert r["output_ids"] == alone["output_ids"], prompt
        assert r["same_output_as_vanilla"] is True


def test_plain_text_file_one_prompt_per_line(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("def fibonacci(n):\n\nimport os\n")
    rc = main(["generate", "--backend", "ref", "-n", "4", "--method", "vanilla", "--prompts-file", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "--- request 1" in out and "--- request 2" in out and "--- request 3" not in out
    assert "2 requests in one batch" in out and "total" in out


def test_bad_prompts_files(capsys, tmp_path):
    def err_of(*argv):
        assert main(["generate", "--backend", "ref", *argv]) == 2
        return capsys.readouterr().err

    assert "no such file" in err_of("--prompts-file", str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "holds no prompt" in err_of("--prompts-file", str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{"prompt": \n')
    assert "bad.jsonl:2: not valid JSON" in err_of("--prompts-file", str(bad))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"question": "x"}\n')
    assert "needs a non-empty 'prompt'" in err_of("--prompts-file", str(nofield))
    assert "not both" in err_of("--prompts-file", str(empty), "def f():")


def test_batch_speedup_note():
    from specdec.cli import batch_speedup_note

    note = batch_speedup_note(0.61, 4)
    assert note.startswith("specdec: note: batched vanilla was faster here (0.61x)") and "--method vanilla" in note
    assert "for 4 requests" in note
    assert batch_speedup_note(1.3, 4) is None     # speculation won: nothing to explain
    assert batch_speedup_note(0.8, 1) is None     # one request: not a batch


def test_a_batched_run_that_lost_prints_the_note(capsys, tmp_path, monkeypatch):
    import specdec.cli as cli

    path = tmp_path / "prompts.txt"
    path.write_text("def fibonacci(n):\nimport os\n")
    seen = []
    real = cli.batch_speedup_note
    # the run's own speedup is timing: record it, and show the note as for a run that lost
    monkeypatch.setattr(cli, "batch_speedup_note", lambda s, n: seen.append((s, n)) or real(0.5, n))
    rc = main(["generate", "--backend", "ref", "-n", "4", "--eos", "", "--method", "pld", "--prompts-file", str(path),
               "--compare"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(seen) == 1 and seen[0][1] == 2 and seen[0][0] > 0
    assert "batched vanilla was faster here (0.50x)" in err and "speedup over batched vanilla" in out
    assert main(["generate", "--backend", "ref", "-n", "4", "--eos", "", "--method", "pld", "--prompts-file", str(path)]) == 0
    assert len(seen) == 1                          # without --compare there is no speedup and no note
