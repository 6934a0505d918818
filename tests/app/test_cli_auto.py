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
def steep_costs(monkeypatch):
    """Verification cost grows steeply with the tree, as on a CPU: auto must choose a small tree."""
    cost = CostModel.fit([((1,), 0.010), ((4,), 0.020), ((16,), 0.060), ((64,), 0.220), ((4, 4), 0.035)])
    monkeypatch.setattr(ref_glide, "device_cost_model", lambda target, glide, cache=True: cost)
    return cost


def test_tree_shape_auto_is_printed_and_in_json(capsys, steep_costs):
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "--tree-shape", "auto", "-n", "6", PROMPT])
    out, err = capsys.readouterr()
    assert rc == 0, err
    line = [ln for ln in out.splitlines() if ln.startswith("tree shape (auto): ")]
    assert len(line) == 1, out
    shape = tuple(int(x) for x in line[0].split(": ")[1].split(","))
    assert 1 + sum(shape) < 69  # smaller than the default (4, 16, 16, 16, 16) under steep costs
    rc = main(["generate", "--backend", "ref", "--method", "tree_spec", "--tree-shape", "auto", "-n", "6", "--json", PROMPT])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 0 and tuple(obj["tree_shape"]) == shape


def test_gamma_auto_only_for_the_glide_chain(capsys, steep_costs):
    rc = main(["generate", "--backend", "ref", "--method", "spec", "--gamma", "auto", "-n", "6", PROMPT])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "tree shape (auto): " in out
    rc = main(["generate", "--backend", "ref", "--method", "speculative", "--gamma", "auto", "-n", "4", PROMPT])
    err = capsys.readouterr().err
    assert rc == 2 and "--gamma auto applies to --method spec" in err and len(err.strip().splitlines()) == 1
    rc = main(["generate", "--backend", "ref", "--method", "spec", "--gamma", "x", "-n", "4", PROMPT])
    err = capsys.readouterr().err
    assert rc == 2 and "--gamma" in err and "auto" in err
