"""``--draft-window N`` of ``specdec generate`` and ``specdec bench``: passed to the speculative method only (the
output stays vanilla's), recorded in bench's answer files, a bad value is one line with exit code 2, and a window
that fits the draft model's context lifts that context's limit on the prompt (the draft reads only the window)."""

from __future__ import annotations

import json

import pytest

from specdec import bench, cli, report
from specdec.cli import main
from specdec.shared.assets import resolve_model_path
from helpers import run_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "import os\n\n\ndef list_files(root):\n"


run = run_generate   # tests/helpers.py


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv", [("generate", "--method", "speculative", "--draft-window", "0", PROMPT),
                                  ("generate", "--method", "speculative", "--draft-window", "-3", PROMPT),
                                  ("generate", "--method", "speculative", "--draft-window", "1.5", PROMPT),
                                  ("generate", "--method", "pld", "--draft-window", "8", PROMPT),
                                  ("bench", "--methods", "speculative", "--draft-window", "0")])
def test_bad_draft_window_is_one_line_exit_2(capsys, argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2 and "--draft-window" in one_line(err)


def test_generate_passes_the_window_and_keeps_vanillas_output(capsys, monkeypatch):
    seen = []
    import specdec.ref as R

    real = R.speculative_generate
    monkeypatch.setattr(R, "speculative_generate", lambda *a, **kw: seen.append(kw.get("draft_window")) or real(*a, **kw))
    rc, out, err = run(capsys, "--method", "speculative", "--draft-window", "6", "-n", "8", "--compare", "--json", PROMPT)
    assert rc == 0, err
    obj = json.loads(out)
    assert seen == [6] and obj["same_output_as_vanilla"] is True


def test_a_window_that_fits_lifts_the_draft_models_context_limit(capsys, monkeypatch):
    rc, out, err = run(capsys, "--method", "speculative", "-n", "2", PROMPT)   # loads (and caches) both models
    assert rc == 0, err
    draft_dir = resolve_model_path("default-draft")
    drafts = [m for k, m in cli._MODEL_CACHE.items() if k[:2] == ("ref", "model") and k[4] is None and draft_dir in k]
    assert len(drafts) == 1
    monkeypatch.setattr(drafts[0].config, "max_position_embeddings", 16)   # a draft with a short context
    text = "\n".join(f"x{i} = {i}" for i in range(12))   # ~50 tokens: over the draft's context, not the target's
    rc, out, err = run(capsys, "--method", "speculative", "-n", "4", text)
    assert rc == 2 and "the draft model's max_position_embeddings" in one_line(err)
    rc, out, err = run(capsys, "--method", "speculative", "-n", "4", "--draft-window", "13", text)   # 13 + 4 > 16
    assert rc == 2 and "the draft model's max_position_embeddings" in one_line(err)
    rc, out, err = run(capsys, "--method", "speculative", "-n", "4", "--draft-window", "12", "--compare", "--json", text)
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["prompt_tokens"] > 16 and obj["same_output_as_vanilla"] is True


def test_bench_passes_the_window_to_speculative_only_and_records_it(tmp_path):
    short = min(bench.load_questions("stdlib_code"), key=lambda q: q["prompt_tokens"])
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps(short) + "\n")
    out = tmp_path / "out"
    assert bench.bench_main(["--bench", str(qfile), "--methods", "speculative,pld", "--backend", "ref", "--draft-window", "16",
                             "--max-new-tokens", "4", "--warmup", "0", "--out-dir", str(out), "--no-progress"]) == 0
    spec = report.load_answers(str(out / "speculative.jsonl"))[0]
    assert spec["meta"]["options"] == {"gamma": 5, "draft_window": 16}
    assert "draft_window" not in report.load_answers(str(out / "pld.jsonl"))[0]["meta"]["options"]
    base = report.load_answers(str(out / "vanilla.jsonl"))[0]
    assert spec["choices"][0]["output_ids"] == base["choices"][0]["output_ids"]
