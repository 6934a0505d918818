"""`specdec generate` (specdec.cli.main called in-process) on the embedded default model, ref backend."""

from __future__ import annotations

import importlib.util
import io
import json

import pytest
import torch

from specdec import cli
from specdec.cli import main
from helpers import run_generate

PROMPT = "import os\n\n\ndef list_files(root):\n"
# method -> the reference module that implements it (its tests are skipped until it exists)
METHOD_MODULES = {
    "vanilla": "specdec.ref.vanilla",
    "speculative": "specdec.ref.speculative",
    "spec": "specdec.ref.glide",
    "tree_spec": "specdec.ref.glide",
    "logitspec": "specdec.ref.logitspec",
    "magicdec": "specdec.ref.magicdec",
    "pld": "specdec.ref.pld",
}


def need(method: str) -> None:
    mod = METHOD_MODULES[method]
    if importlib.util.find_spec(mod) is None:
        pytest.skip(f"{mod} (the decoder of --method {method}) has not landed yet")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


run = run_generate   # tests/helpers.py


@pytest.mark.parametrize("method", list(METHOD_MODULES))
def test_every_method_json(capsys, method):
    need(method)
    rc, out, err = run(capsys, "--method", method, "-n", "5", "--json", PROMPT)
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["method"] == method and obj["backend"] == "ref"
    assert 1 <= obj["tokens"] == len(obj["output_ids"]) == len(obj["spec_mask"]) <= 5
    assert obj["accepted_drafts"] == sum(obj["spec_mask"])
    assert obj["tau"] >= 1.0 and obj["target_passes"] >= 1
    assert set(obj) >= {"tokens_per_s", "ttft_ms", "completion", "prompt_tokens"}
    if method == "vanilla":
        assert obj["accepted_drafts"] == 0


def test_text_output_and_table(capsys):
    need("tree_spec")
    rc, out, err = run(capsys, "--method", "tree_spec", "-n", "12", PROMPT)
    assert rc == 0, err
    assert "\x1b[" not in out  # not a terminal: plain text
    for col in ("method", "backend", "tokens", "tau", "tokens/s", "TTFT (ms)"):
        assert col in out
    assert "tree" in out and "ref" in out


def test_color_highlights_accepted_drafts(capsys):
    need("magicdec")
    # MagicDec drafts with the target itself over a window that holds the whole short prompt: drafts are accepted.
    # (The prompt ends inside the body: after a bare "def ...:\n" the embedded model may close the file at once.)
    body = PROMPT + "    "
    rc, out, err = run(capsys, "--method", "magicdec", "-n", "10", "--color", "always", "--json", body)
    obj = json.loads(out)
    assert obj["accepted_drafts"] > 0
    rc, out, err = run(capsys, "--method", "magicdec", "-n", "10", "--color", "always", body)
    assert rc == 0 and "\x1b[32m" in out
    plain = out.rsplit("\n\nmethod ", 1)[0].replace("\x1b[32m", "").replace("\x1b[0m", "")
    assert plain == obj["completion"]


def test_compare_prints_speedup_and_is_lossless(capsys):
    need("tree_spec")
    rc, out, err = run(capsys, "--method", "tree_spec", "-n", "8", "--compare", PROMPT)
    assert rc == 0, err
    assert "speedup over vanilla:" in out and "vanilla" in out
    assert out.rstrip("\n").endswith("same output as vanilla: yes")   # the table's proof line (greedy)
    rc, out, err = run(capsys, "--method", "tree_spec", "-n", "8", "--compare", "--json", PROMPT)
    obj = json.loads(out)
    assert obj["speedup"] > 0 and obj["vanilla"]["method"] == "vanilla"
    assert obj["same_output_as_vanilla"] is True  # greedy speculative decoding is lossless


def test_stdin_prompt(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "3", "--json")
    assert rc == 0, err
    a = json.loads(out)
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPT))
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "3", "--json", "-")
    b = json.loads(out)
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "3", "--json", PROMPT)
    c = json.loads(out)
    assert a["output_ids"] == b["output_ids"] == c["output_ids"]


def test_sampling_is_seeded(capsys):
    need("speculative")
    args = ("--method", "speculative", "-n", "6", "--temperature", "0.8", "--top-p", "0.9", "--json", PROMPT)
    r1 = json.loads(run(capsys, *args, "--seed", "3")[1])
    r2 = json.loads(run(capsys, *args, "--seed", "3")[1])
    assert r1["output_ids"] == r2["output_ids"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--method", "tree_spec", "--tree-shape", "0,1"], "--tree-shape"),
        (["--method", "tree_spec", "--tree-shape", "4,x"], "--tree-shape"),
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "abc"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--method", "speculative", "--gamma", "0"], "--gamma"),
        (["--method", "nope"], "--method"),
        (["--target", "/nonexistent/model/dir"], "/nonexistent/model/dir"),
        (["--method", "speculative", "--target", "/nonexistent/model/dir"], "does not exist"),
        (["--method", "tree_spec", "--glide", "/nonexistent/glide"], "/nonexistent/glide"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nodevice"], "--device"),
        (["--opt", "novalue"], "key=value"),
        (["--method", "pld", "-O", "no_such_kwarg=1"], "no_such_kwarg"),
    ],
)
def test_bad_arguments_one_line_exit_2(capsys, argv, fragment):
    rc, out, err = run(capsys, "-n", "2", *argv, PROMPT)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and fragment in lines[0]
    assert "Traceback" not in err and out == ""


def test_internal_error_is_one_line(capsys, monkeypatch):
    import specdec.ref as R

    def boom(*a, **k):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(R, "pld_generate", boom)
    rc, out, err = run(capsys, "--method", "pld", "-n", "2", PROMPT)
    assert rc == 1 and err.count("\n") == 1 and "RuntimeError: kernel exploded second line" in err
    monkeypatch.setenv("SPECDEC_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["generate", "--backend", "ref", "--method", "pld", "-n", "2", PROMPT])


def test_empty_stdin_is_an_error(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    rc, out, err = run(capsys, "-n", "2", "-")
    assert rc == 2 and "empty prompt" in err


def test_register_subcommand(capsys):
    seen = {}

    def add_args(p):
        p.add_argument("--x", type=int, default=1)

    def run_fn(args):
        seen["x"] = args.x
        print("plugged in")
        return 0

    cli.register_subcommand("unittest-plugin", add_args, run_fn, help="test")
    try:
        assert main(["unittest-plugin", "--x", "7"]) == 0
        assert seen["x"] == 7 and "plugged in" in capsys.readouterr().out
        assert main(["unittest-plugin", "--x", "no"]) == 2
    finally:
        cli.SUBCOMMANDS.pop("unittest-plugin", None)


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert main([]) == 2


def test_same_output_note_says_why_tokens_may_differ():
    """``--compare``'s last line: "yes"; under rejection sampling a difference is expected (same distribution, own
    draws) and said so; under greedy or keyed decoding a difference is a bug and is flagged."""
    from types import SimpleNamespace

    from specdec.cli import _same_output_note

    greedy = SimpleNamespace(temperature=0.0, sampling="rejection")
    sampled = SimpleNamespace(temperature=0.8, sampling="rejection")
    keyed = SimpleNamespace(temperature=0.8, sampling="keyed")
    assert _same_output_note(True, greedy) == _same_output_note(True, sampled) == "yes"
    assert _same_output_note(False, sampled).startswith("no (rejection sampling")
    for a in (greedy, keyed):
        assert _same_output_note(False, a).startswith("NO -- greedy and keyed decoding must reproduce")
