"""`specdec generate --tree-shape auto` / `--gamma auto`: the decoder picks the shape, the CLI prints it.

The device's round-cost calibration is replaced by a fixed cost curve (the search itself is tested in
tests/shared/test_tree_search.py), so the test is quick and its answer does not depend on the machine."""

from __future__ import annotations

import json

import pytest

import specdec.ref.glide as ref_glide
from specdec.cli import main
from specdec.shared.tree_search import CostModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPT = "import os\n\n\ndef list_files(root):\n"


@pytest.fixture
def steep_costs(fixed_cost_model):
    """Verification cost grows steeply with the tree, as on a CPU (tests/app/conftest.py): auto must choose a
    small tree."""
    return fixed_cost_model


@pytest.fixture
def flat_costs(monkeypatch):
    """Verification costs barely grow with the tree, as on a GPU: auto must choose a wide one."""
    cost = CostModel.fit([((1,), 0.010), ((4,), 0.0101), ((16,), 0.0102), ((64,), 0.0105), ((4, 4), 0.0102)])
    monkeypatch.setattr(ref_glide, "device_cost_model", lambda target, glide, cache=True: cost)
    return cost


def _auto_line(out: str, what: str = "tree shape") -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith(f"{what} (auto, chosen for this device): ")]
    assert len(lines) == 1, out
    return lines[0].split(": ")[1]


def test_tree_shape_auto_is_printed_and_in_json(capsys, steep_costs):
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "--tree-shape", "auto", "-n", "6", PROMPT])
    out, err = capsys.readouterr()
    assert rc == 0, err
    shape = tuple(int(x) for x in _auto_line(out).split(","))
    assert 1 + sum(shape) < 69  # smaller than the default (4, 16, 16, 16, 16) under steep costs
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "--tree-shape", "auto", "-n", "6", "--json", PROMPT])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and tuple(obj["tree_shape"]) == shape


def test_gamma_auto_only_for_the_glide_chain(capsys, steep_costs):
    rc = main(["generate", "--backend", "ref", "--method", "spec", "--gamma", "auto", "-n", "6", PROMPT])
    out, err = capsys.readouterr()
    assert rc == 0, err
    gamma = int(_auto_line(out, "gamma"))
    assert 1 <= gamma < 8
    rc = main(["generate", "--backend", "ref", "--method", "speculative", "--gamma", "auto", "-n", "4", PROMPT])
    err = capsys.readouterr().err
    assert rc == 2 and "--gamma auto applies to --method spec" in err and len(err.strip().splitlines()) == 1
    rc = main(["generate", "--backend", "ref", "--method", "spec", "--gamma", "x", "-n", "4", PROMPT])
    err = capsys.readouterr().err
    assert rc == 2 and "--gamma" in err and "auto" in err


def test_cli_default_is_auto_and_printed(capsys, steep_costs):
    """Without --tree-shape / --gamma the CLI runs the GLIDE decoders with auto (the shape printed); an explicit
    shape runs as given and prints no auto line."""
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "-n", "6", "--json", PROMPT])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0
    auto_shape = tuple(obj["tree_shape"])
    assert auto_shape != (4, 16, 16, 16, 16) and 1 + sum(auto_shape) < 69
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "-n", "6", PROMPT])
    out = capsys.readouterr().out
    assert rc == 0 and tuple(int(x) for x in _auto_line(out).split(",")) == auto_shape
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "--tree-shape", "4,16,16,16,16", "-n", "6", "--json", PROMPT])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and tuple(obj["tree_shape"]) == (4, 16, 16, 16, 16)
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "--tree-shape", "4,16,16,16,16", "-n", "6", PROMPT])
    out = capsys.readouterr().out
    assert rc == 0 and "(auto, chosen for this device)" not in out
    rc = main(["generate", "--backend", "ref", "--method", "spec", "-n", "6", PROMPT])
    out = capsys.readouterr().out
    assert rc == 0 and int(_auto_line(out, "gamma")) >= 1


def test_cli_auto_follows_the_cost_curve(capsys, flat_costs):
    """Cheap verification (a GPU-like curve): the CLI's default tree is wider than under CPU-like costs."""
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "-n", "6", "--json", PROMPT])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and 1 + sum(obj["tree_shape"]) > 20, obj["tree_shape"]


def test_logitspec_capacity_auto_is_the_cli_default_and_printed(capsys):
    """LogitSpec: the CLI's default capacity is auto (printed, in --json); under CPU-like costs it is smaller than
    the API's 64; an explicit capacity runs as given; a bad one or one for another method is one line, exit 2."""
    rc = main(["generate", "--backend", "ref", "--method", "logitspec", "-n", "8", PROMPT])
    out, err = capsys.readouterr()
    assert rc == 0, err
    cap = int(_auto_line(out, "draft tree capacity"))
    assert 1 <= cap < 64
    rc = main(["generate", "--backend", "ref", "--method", "logitspec", "-n", "8", "--json", PROMPT])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and obj["draft_tree_capacity"] == cap
    rc = main(["generate", "--backend", "ref", "--method", "logitspec", "--draft-tree-capacity", "9", "-n", "8", "--json", PROMPT])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and obj["draft_tree_capacity"] == 9
    for argv, fragment in ((["--method", "logitspec", "--draft-tree-capacity", "0"], "--draft-tree-capacity must be >= 1"),
                           (["--method", "logitspec", "--draft-tree-capacity", "wide"], "--draft-tree-capacity"),
                           (["--method", "pld", "--draft-tree-capacity", "8"], "--draft-tree-capacity applies to --method logitspec")):
        rc = main(["generate", "--backend", "ref", "-n", "4", *argv, PROMPT])
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
