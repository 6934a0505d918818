"""What a new user meets on the command line: the fast path on a CPU (refused unless forced), --echo,
long prompts (--max-context, --truncate), bench skipping questions that cannot run, --method vanilla
--compare, short model reprs, and bad inputs as one line with exit code 2.

Everything runs the embedded default model on the ref backend with a few new tokens."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch

from specdec import bench, report
from specdec.cli import main
from specdec.shared.assets import ASSETS_DIR, EMBEDDED_MODELS
from helpers import run_generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "import os\n\n\ndef list_files(root):"
# the embedded target's trained context (8192 positions since session 22's model; 2048 before)
with open(os.path.join(ASSETS_DIR, "default", "target", "config.json")) as _f:
    MAXPOS = json.load(_f)["max_position_embeddings"]
LONG = "x = 1\n" * (MAXPOS // 3)  # 4 tokens a line: ~1.3x the embedded model's context


run = run_generate   # tests/helpers.py


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _embedded(name: str) -> bool:
    d = os.path.join(ASSETS_DIR, EMBEDDED_MODELS[name])
    return os.path.isdir(d) and any(f.endswith((".safetensors", ".pth", ".bin")) for f in os.listdir(d))


# ---------------------------------------------------------------------------------------------
# 1. --backend fast on the CPU
# ---------------------------------------------------------------------------------------------


def test_fast_backend_on_cpu_is_refused_in_one_line(capsys):
    rc, out, err = run(capsys, "--backend", "fast", "--device", "cpu", "-n", "1", PROMPT)
    line = one_error_line(err)
    assert rc == 2 and out == ""
    assert "interpreter" in line and "--force-interpreter" in line and "--backend ref" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the fast path on a CUDA machine")
def test_auto_backend_is_ref_without_cuda(capsys):
    rc, out, err = run(capsys, "--backend", "auto", "--method", "vanilla", "-n", "2", "--json", PROMPT)
    assert rc == 0, err
    assert json.loads(out)["backend"] == "ref"


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton interpreter is the fast path's CPU mode only on a machine without CUDA")
def test_force_interpreter_runs_the_fast_path(capsys):
    # -n 1: the prefill alone (one interpreted forward) -- a real decode step takes seconds per token
    rc, out, err = run(capsys, "--backend", "fast", "--force-interpreter", "--method", "vanilla", "-n", "1", "--json", PROMPT)
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["backend"] == "fast" and obj["tokens"] == 1 and obj["device"] == "cpu"


def test_bench_fast_backend_on_cpu_is_refused(tmp_path, capsys):
    rc = main(["bench", "--backend", "fast", "--device", "cpu", "--methods", "vanilla", "--out-dir", str(tmp_path)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--force-interpreter" in line
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 2. --echo
# ---------------------------------------------------------------------------------------------


def test_echo_plain_color_and_json(capsys):
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "4", "--json", PROMPT)
    completion = json.loads(out)["completion"]
    assert "prompt" not in json.loads(out)  # only with --echo
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "4", "--echo", PROMPT)
    assert rc == 0, err
    assert out.startswith(PROMPT + completion + "\n\n")
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "4", "--echo", "--color", "always", PROMPT)
    assert out.startswith("\x1b[2m" + PROMPT + "\x1b[0m")  # the prompt dimmed, then the completion
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "4", "--echo", "--json", PROMPT)
    obj = json.loads(out)
    assert obj["prompt"] == PROMPT and obj["completion"] == completion


# ---------------------------------------------------------------------------------------------
# 3. Long prompts: --max-context, --truncate
# ---------------------------------------------------------------------------------------------


def test_long_prompt_is_one_line_naming_limit_tokens_and_flags(capsys):
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "8", LONG)
    line = one_error_line(err)
    assert rc == 2 and out == ""
    n = int(line.split("the prompt is ")[1].split()[0])
    assert n > MAXPOS
    for frag in (str(MAXPOS), "max_position_embeddings", "--max-new-tokens is 8", "--truncate left", "--max-context"):
        assert frag in line, (frag, line)


def test_truncate_left_keeps_the_last_tokens_that_fit(capsys):
    # a lowered limit keeps this fast: 40 positions, 4 new tokens -> 36 prompt tokens kept (the BOS first)
    text = "\n".join(f"x{i} = {i}" for i in range(30))
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "4", "--max-context", "40", "--json", text)
    line = one_error_line(err)
    assert rc == 2 and "context of 40 (--max-context)" in line
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "4", "--max-context", "40", "--truncate", "left", "--json", "--echo", text)
    assert rc == 0, err
    note = one_error_line(err)
    assert "--truncate left" in note and "kept 36" in note
    obj = json.loads(out)
    assert obj["prompt_tokens"] == 36 and obj["prompt_tokens_dropped"] > 0 and obj["tokens"] == 4
    assert text.endswith(obj["prompt"].lstrip())  # --echo shows what the model saw: the prompt's end
    # the same ids as running the kept tail directly (BOS + the last 35 tokens)
    from specdec.shared.tokenizer import load_tokenizer

    tok = load_tokenizer("default")
    ids = tok(text)["input_ids"]
    kept = [ids[0]] + ids[-35:] if ids[0] == tok.bos_token_id else ids[-36:]
    import specdec.ref as R

    res = R.vanilla_generate(R.load_model("default"), torch.tensor([kept]), len(kept), max_gen_len=4)
    assert res.output_ids[0].tolist() == obj["output_ids"]


def test_max_context_raises_the_limit(capsys):
    from specdec import cli

    raised = 2 * MAXPOS
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "2", "--max-context", str(raised), "--json", PROMPT)
    assert rc == 0, err
    models = [m for k, m in cli._MODEL_CACHE.items() if k[:2] == ("ref", "model") and k[4] == raised]
    assert models and all(m.config.max_position_embeddings == raised for m in models)
    # the cached model without --max-context keeps the trained limit
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "8", LONG)
    assert rc == 2 and str(MAXPOS) in err
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "2", "--max-context", "1", PROMPT)
    assert rc == 2 and "--max-context" in one_error_line(err)


# ---------------------------------------------------------------------------------------------
# 4. bench: questions that cannot run are skipped, never an empty answer file
# ---------------------------------------------------------------------------------------------


def _questions(path, qs):
    with open(path, "w") as f:
        for q in qs:
            f.write(json.dumps(q) + "\n")
    return str(path)


@pytest.mark.skipif(not _embedded("default"), reason="the embedded default model is not shipped")
def test_bench_skips_questions_over_the_context(tmp_path, capsys):
    qfile = _questions(tmp_path / "q.jsonl", [
        {"question_id": "ok", "category": "c", "turns": ["def add(a, b):"]},
        {"question_id": "long", "category": "c", "turns": [LONG]},
        # turn 2 (with turn 1 and its answer) exceeds the context: found while running
        {"question_id": "grows", "category": "c", "turns": ["def mul(a, b):", LONG]},
    ])
    out = tmp_path / "out"
    rc = main(["bench", "--bench", qfile, "--methods", "vanilla", "--backend", "ref", "--max-new-tokens", "2",
               "--warmup", "0", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [r["question_id"] for r in report.load_answers(str(out / "vanilla.jsonl"))] == ["ok"]
    long_lines = [ln for ln in err.splitlines() if "question long" in ln]
    assert len(long_lines) == 1 and f"context of {MAXPOS}" in long_lines[0] and "--max-context" in long_lines[0]
    grows = [ln for ln in err.splitlines() if "question grows" in ln]
    assert len(grows) == 1 and "turn 2" in grows[0]
    assert "Traceback" not in err
    assert any(ln.startswith("[bench] done:") for ln in err.splitlines())

    # nothing can run: exit 2, one error line, no answer file
    qfile = _questions(tmp_path / "q2.jsonl", [{"question_id": "long", "category": "c", "turns": [LONG]}])
    rc = main(["bench", "--bench", qfile, "--methods", "vanilla", "--backend", "ref", "--max-new-tokens", "2",
               "--warmup", "0", "--out-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "no question left" in errors[0]
    assert not (tmp_path / "none" / "vanilla.jsonl").exists()

    qfile = _questions(tmp_path / "q3.jsonl", [{"question_id": "grows", "category": "c", "turns": ["def mul(a, b):", LONG]}])
    rc = main(["bench", "--bench", qfile, "--methods", "vanilla", "--backend", "ref", "--max-new-tokens", "2",
               "--warmup", "0", "--out-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert rc == 2 and "no question finished" in err and "Traceback" not in err
    assert not (tmp_path / "none" / "vanilla.jsonl").exists()


def test_bench_progress_bar_only_on_a_terminal(tmp_path, capsys, monkeypatch):
    seen = {}
    import tqdm

    real = tqdm.tqdm

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(tqdm, "tqdm", spy)
    qfile = _questions(tmp_path / "q.jsonl", [{"question_id": 1, "category": "c", "turns": ["def add(a, b):"]}])
    assert main(["bench", "--bench", qfile, "--methods", "vanilla", "--backend", "ref", "--max-new-tokens", "1",
                 "--warmup", "0", "--out-dir", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert seen["disable"] is None and seen["file"] is not None  # tqdm: off when stderr is not a TTY
    assert "\r" not in err  # the captured stderr is not a terminal: no bar drawn


# ---------------------------------------------------------------------------------------------
# 5. --method vanilla --compare
# ---------------------------------------------------------------------------------------------


def test_vanilla_compare_prints_vanilla_once(capsys, monkeypatch):
    import specdec.ref as R

    calls = []
    real = R.vanilla_generate

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(R, "vanilla_generate", counting)
    rc, out, err = run(capsys, "--method", "vanilla", "--compare", "-n", "3", PROMPT)
    assert rc == 0 and len(calls) == 1
    table = out.split("\n\n", 1)[1]
    assert sum(ln.startswith("vanilla") for ln in table.splitlines()) == 1
    assert "speedup over vanilla" not in out and "same output as vanilla" not in out
    rc, out, err = run(capsys, "--method", "vanilla", "--compare", "-n", "3", "--json", PROMPT)
    obj = json.loads(out)
    assert obj["speedup"] == 1.0 and obj["same_output_as_vanilla"] is True and "vanilla" not in obj


# ---------------------------------------------------------------------------------------------
# 6. Short reprs
# ---------------------------------------------------------------------------------------------


def _short(text: str, *frags: str) -> None:
    assert "\n" not in text and "tensor(" not in text and len(text) < 400, text
    for f in frags:
        assert f in text, (f, text)


def test_model_and_glide_reprs_are_one_line():
    import specdec.ref as R
    from specdec.shared.weights import Model

    m = R.load_model("default")
    c = m.config
    common = (f"layers={c.num_layers}", f"hidden={c.hidden_size}", f"vocab={c.vocab_size}", "dtype=torch.float32", "device=cpu")
    _short(repr(m), "Model(llama", *common)
    _short(str(Model(c, {})), "Model(llama")  # no weights: still a repr, not a KeyError
    if _embedded("default-glide"):
        g = R.load_glide("default-glide", m)
        _short(repr(g), "Glide(GLIDE draft layer", "layers=1", f"hidden={c.hidden_size}", f"vocab={c.vocab_size}", "dtype=", "device=cpu")
        from specdec.ref import LlamaGlide
        from specdec.shared.assets import resolve_model_path

        lg = LlamaGlide(None, resolve_model_path("default"), resolve_model_path("default-glide"))
        _short(repr(lg), "LlamaGlide(target=Model(llama", "glide=Glide(")
    import specdec.fast as F

    fm = F.load_model("default", dtype=torch.float32, device="cpu")
    _short(repr(fm), "FastModel(llama", *common)
    if _embedded("default-glide"):
        fg = F.load_glide("default-glide", fm)
        _short(repr(fg), "FastGlide(GLIDE draft layer", "layers=1", f"hidden={c.hidden_size}", f"vocab={c.vocab_size}", "device=cpu")


# ---------------------------------------------------------------------------------------------
# 7. Bad inputs: one line, exit code 2, naming the option
# ---------------------------------------------------------------------------------------------


def test_non_utf8_stdin_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"def f(x):\n\xff\xfe return x\n"), encoding="utf-8"))
    rc, out, err = run(capsys, "-n", "2")
    line = one_error_line(err)
    assert rc == 2 and "stdin" in line and "UTF-8" in line and "0xff" in line
    # a UTF-8 stdin read as bytes: the same prompt as the argument, CRLF read as LF
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(PROMPT.replace("\n", "\r\n").encode()), encoding="utf-8"))
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "2", "--json", "--echo")
    assert rc == 0, err
    assert json.loads(out)["prompt"] == PROMPT


def test_trailing_newline_is_dropped_with_a_note_unless_kept(capsys, monkeypatch):
    """`echo 'def f(x):' | specdec generate`: the newline echo adds is dropped (a bare newline token would steer
    the model to column 0 / the end of the file), so stdin gives the argument's tokens; the note comes after a
    successful run only; --keep-newline keeps it; a prompt of newlines alone is one error line."""
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "6", "--json", PROMPT)
    plain = json.loads(out)
    assert rc == 0 and "newline" not in err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO((PROMPT + "\n").encode()), encoding="utf-8"))
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "6", "--json")
    piped = json.loads(out)
    assert rc == 0 and piped["output_ids"] == plain["output_ids"] and piped["prompt_tokens"] == plain["prompt_tokens"]
    assert "dropped the prompt's trailing newline" in one_error_line(err) and "--keep-newline" in err
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "6", "--json", "--keep-newline", PROMPT + "\n\n")
    kept = json.loads(out)
    assert rc == 0 and err == "" and kept["prompt_tokens"] > plain["prompt_tokens"]
    # a long prompt over the context still fails with ONE line (the note is not printed before an error)
    rc, out, err = run(capsys, "--method", "vanilla", "-n", "8", LONG + "\n")
    assert rc == 2 and "newline" not in one_error_line(err)
    rc, out, err = run(capsys, "-n", "2", "\n\n")
    assert rc == 2 and "only newlines" in one_error_line(err)


def test_non_utf8_prompt_argument_is_one_line(capsys):
    bad = os.fsdecode(b"def \xff(x):")  # how undecodable argv bytes arrive
    rc, out, err = run(capsys, "-n", "2", bad)
    assert rc == 2 and "UTF-8" in one_error_line(err)


@pytest.mark.parametrize("shape", ["4,x", "0,4", ","])
def test_bench_bad_tree_shape_is_one_line(capsys, shape):
    rc = main(["bench", "--tree-shape", shape])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--tree-shape" in line and "4,16,16,16,16" in line and "lambda" not in line


def test_report_on_a_non_answer_file_names_file_and_line(tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f(x):\n")
    rc = main(["report", "--base", str(prompt)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "--base" in line and str(prompt) in line and "line 1" in line and "not a bench answer file" in line
    questions = tmp_path / "question.jsonl"
    questions.write_text('\n{"question_id": 1, "turns": ["hi"]}\n')
    assert main(["report", "--base", str(questions)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "line 2" in line and "not an answer record" in line and "question" in line
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00")
    assert main(["report", "--base", str(binary)]) == 2
    assert "not UTF-8" in one_error_line(capsys.readouterr().err)
    assert main(["report", "--base", str(tmp_path)]) == 2
    assert "folder" in one_error_line(capsys.readouterr().err)
    assert main(["report", "--base", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in one_error_line(capsys.readouterr().err)
    assert report.report_main(["--base", str(prompt)]) == 2  # python -m specdec.report: the same message
    assert "not a bench answer file" in capsys.readouterr().err
