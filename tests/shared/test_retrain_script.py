"""scripts/retrain_default.sh end to end on the CPU with tiny shapes: the stages wire the training commands
together as the GPU run does (two target phases with fixed step counts, the draft LM, the GLIDE phases,
`ship` staging the last GLIDE phase that ran) -- a wiring bug found here costs seconds, not a device call."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "retrain_default.sh")
TINY = '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}'

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")]


def _default_corpus():
    spec = importlib.util.spec_from_file_location("default_corpus", os.path.join(ROOT, "scripts", "default_corpus.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def tiny_stdlib(tmp_path):
    """A few real stdlib modules of this interpreter: four training files and two held-out ones."""
    dc = _default_corpus()
    src = sysconfig.get_paths()["stdlib"]
    train, held = [], []
    for name in sorted(os.listdir(src)):
        if not name.endswith(".py") or os.path.getsize(os.path.join(src, name)) > 40_000:
            continue
        (held if dc.is_heldout(name) else train).append(name)
    if len(held) < 2:
        pytest.skip("this interpreter's stdlib has fewer than two small held-out top-level modules")
    root = tmp_path / "stdlib"
    root.mkdir()
    for name in train[:4] + held[:2]:
        shutil.copy(os.path.join(src, name), root / name)
    return str(root)


def _run(tmp_path, stdlib: str, *stages: str, rc: int = 0, **env: str) -> str:
    e = dict(os.environ, PYTHON=sys.executable, RUN=str(tmp_path / "run"), SOURCES="stdlib", STDLIB_ROOT=stdlib,
             SEQ="128", MAXPOS="128", TARGET_SEQ1="64", TARGET_STEPS1="2", TARGET_STEPS2="2", DRAFT_STEPS="2",
             GLIDE_SHORT_STEPS="2", GLIDE_LONG_STEPS="1", LM_TOKENS="256", GLIDE_TOKENS="256", GLIDE_SEQ1="64",
             EVAL_TOKENS="256", TARGET_ARCH=TINY, DRAFT_ARCH=TINY.replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'),
             DEVICE="cpu", OMP_NUM_THREADS="1", **env)
    e.pop("OUT", None)
    p = subprocess.run(["bash", SCRIPT, *stages], cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == rc, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def _same_weights(a: str, b: str) -> bool:
    x, y = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


def test_retrain_stages_wire_phases_and_ship_the_last_glide(tmp_path, tiny_stdlib):
    run = tmp_path / "run"
    _run(tmp_path, tiny_stdlib, "corpus", "target", "draft", "glide", "ship", GLIDE_MORE_STEPS="1")
    # the two target phases ran exactly the fixed step counts, the second at SEQ with MAXPOS positions
    phase1 = json.load(open(run / "lm_phase1" / "target_summary.json"))[0]
    phase2 = json.load(open(run / "lm" / "target_summary.json"))[0]
    assert (phase1["steps"], phase1["seq"], phase1["max_positions"]) == (2, 64, 64)
    assert (phase2["steps"], phase2["seq"], phase2["max_positions"]) == (2, 128, 128)
    assert json.load(open(run / "lm" / "draft_summary.json"))[-1]["model"] == "draft"
    # three GLIDE phases; ship stages the third, with its log, and says so in the summary
    ship = run / "ship"
    assert _same_weights(ship / "glide", run / "glide_more" / "glide")
    assert not _same_weights(ship / "glide", run / "glide_long" / "glide")
    assert (ship / "logs" / "glide_more_log.jsonl").is_file() and (ship / "logs" / "target_phase1_log.jsonl").is_file()
    names = [s["model"] for s in json.load(open(ship / "logs" / "summary.json"))]
    assert names[-1] == "glide (64-token windows, distilled further, shipped)", names
    assert "glide (128-token windows)" in names
    for sub in ("target", "draft"):
        assert _same_weights(ship / sub, run / "lm" / sub)
    # rerun without a third phase: the stale one is removed and the long phase is shipped
    _run(tmp_path, tiny_stdlib, "glide", "ship")
    assert not (run / "glide_more").exists()
    assert _same_weights(ship / "glide", run / "glide_long" / "glide")
    names = [s["model"] for s in json.load(open(ship / "logs" / "summary.json"))]
    assert names[-1] == "glide (128-token windows, shipped)", names
    # the third phase alone, on the existing run (more training for a draft already trained)
    long_before = load_file(str(run / "glide_long" / "glide" / "model.safetensors"))
    _run(tmp_path, tiny_stdlib, "glide-more", "ship", GLIDE_MORE_STEPS="1")
    assert _same_weights(ship / "glide", run / "glide_more" / "glide")
    after = load_file(str(run / "glide_long" / "glide" / "model.safetensors"))
    assert all((long_before[k] == after[k]).all() for k in after)   # the long phase itself is untouched
    assert "glide-more needs GLIDE_MORE_MIN" in _run(tmp_path, tiny_stdlib, "glide-more", rc=2)
    # GLIDE_MORE_FROM=last continues that third phase (kept as glide_more.1, its log shipped), twice in a row
    first = load_file(str(run / "glide_more" / "glide" / "model.safetensors"))
    out = _run(tmp_path, tiny_stdlib, "glide-more", "ship", GLIDE_MORE_STEPS="1", GLIDE_MORE_FROM="last")
    assert "from " + str(run / "glide_more.1" / "glide") in out
    kept = load_file(str(run / "glide_more.1" / "glide" / "model.safetensors"))
    assert all((first[k] == kept[k]).all() for k in first)
    assert not _same_weights(run / "glide_more" / "glide", run / "glide_more.1" / "glide")
    assert json.load(open(run / "glide_more" / "glide_summary.json"))["init"] == str(run / "glide_more.1" / "glide")
    _run(tmp_path, tiny_stdlib, "glide-more", "ship", GLIDE_MORE_STEPS="1", GLIDE_MORE_FROM="last")
    assert (run / "glide_more.2").is_dir() and _same_weights(ship / "glide", run / "glide_more" / "glide")
    assert (ship / "logs" / "glide_more.1_log.jsonl").is_file() and (ship / "logs" / "glide_more.2_log.jsonl").is_file()
    names = [s["model"] for s in json.load(open(ship / "logs" / "summary.json"))]
    assert names[-3:] == ["glide (64-token windows, distilled further (glide_more.1))",
                          "glide (64-token windows, distilled further (glide_more.2))",
                          "glide (64-token windows, distilled further, shipped)"], names
    # from the long phase again (the default): the continuations are dropped
    _run(tmp_path, tiny_stdlib, "glide-more", GLIDE_MORE_STEPS="1")
    assert not (run / "glide_more.1").exists() and not (run / "glide_more.2").exists()
    assert json.load(open(run / "glide_more" / "glide_summary.json"))["init"] == str(run / "glide_long" / "glide")
    assert "GLIDE_MORE_FROM must be long or last" in _run(tmp_path, tiny_stdlib, "glide-more", rc=2, GLIDE_MORE_FROM="x")
    # the target continued (target-more): the run's target changes, the log and summary ship with it
    target_before = load_file(str(run / "lm" / "target" / "model.safetensors"))
    _run(tmp_path, tiny_stdlib, "target-more", "ship", TARGET_MORE_STEPS="2")
    more = json.load(open(run / "lm" / "target_more_summary.json"))[0]
    assert (more["steps"], more["seq"], more["max_positions"]) == (2, 128, 128)
    target_after = load_file(str(run / "lm" / "target" / "model.safetensors"))
    assert target_after.keys() == target_before.keys()
    assert not all((target_before[k] == target_after[k]).all() for k in target_after)
    assert not (run / "lm_more").exists()
    assert _same_weights(ship / "target", run / "lm" / "target")
    assert (ship / "logs" / "target_more_log.jsonl").is_file()
    assert "target-more needs TARGET_MORE_MIN" in _run(tmp_path, tiny_stdlib, "target-more", rc=2)
