"""`specdec generate --sampling keyed --seed N`: a sampled speculative output equal to vanilla's; bad values
are one line and exit code 2. `specdec bench --sampling keyed` records the mode."""

from __future__ import annotations

import json

import pytest

from helpers import run_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "import os\n\n\ndef list_files(root):\n"


run = run_generate   # tests/helpers.py


def test_keyed_generate_equals_vanilla_and_follows_the_seed(capsys):
    args = ("--method", "speculative", "-n", "6", "--temperature", "0.9", "--sampling", "keyed", "--json", PROMPT)
    rc, out, err = run(capsys, *args, "--compare", "--seed", "3")
    assert rc == 0, err
    a = json.loads(out)
    assert a["sampling"] == "keyed" and a["seed"] == 3
    assert a["same_output_as_vanilla"] is True
    seeds = [json.loads(run(capsys, *args, "--seed", str(s))[1])["output_ids"] for s in (4, 5)]
    assert any(ids != a["output_ids"] for ids in seeds)


@pytest.mark.parametrize("argv, fragment", [
    (["--sampling", "bogus"], "--sampling"),
    (["--temperature", "0.8", "--sampling", "keyed", "--seed", "-1"], "--seed"),
])
def test_bad_sampling_arguments_one_line_exit_2(capsys, argv, fragment):
    rc, out, err = run(capsys, "-n", "2", *argv, PROMPT)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and fragment in lines[0], err
    assert "Traceback" not in err and out == ""


def test_bench_keyed_sampling_matches_vanilla(tmp_path):
    import argparse

    from specdec import bench, report

    ap = bench.add_bench_args(argparse.ArgumentParser())
    assert ap.parse_args([]).sampling == "rejection"
    with pytest.raises(SystemExit):
        ap.parse_args(["--sampling", "bogus"])
    short = min(bench.load_questions("stdlib_code"), key=lambda q: q["prompt_tokens"])
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps(short) + "\n")
    out = tmp_path / "out"
    rc = bench.bench_main(["--bench", str(qfile), "--methods", "pld", "--backend", "ref", "--max-new-tokens", "6",
                           "--temperature", "0.9", "--sampling", "keyed", "--seed", "5", "--warmup", "0",
                           "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    base, pld = (report.load_answers(str(out / f"{m}.jsonl"))[0] for m in ("vanilla", "pld"))
    assert pld["choices"][0]["output_ids"] == base["choices"][0]["output_ids"]
    assert pld["meta"]["sampling"]["mode"] == "keyed"
