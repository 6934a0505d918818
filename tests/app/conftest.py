"""Fixtures of the app tests (CLI, bench, report).

The CLI runs the GLIDE decoders with ``tree_shape="auto"`` / ``gamma="auto"`` and LogitSpec with
``draft_tree_capacity="auto"`` by default, whose first call
per (device, model) would time a one-off round-cost calibration. The app tests are about the CLI, not the
calibration (tests/shared/test_tree_search.py and the decoder tests cover that), so every app test gets a
fixed cost curve instead -- steep, as on a CPU -- which keeps them quick and their shapes machine-independent.
"""

from __future__ import annotations

import pytest

import specdec.ref.glide as ref_glide
import specdec.ref.logitspec as ref_logitspec
from specdec.shared.tree_search import CostModel

try:
    import specdec.fast.glide.decoders as fast_glide_decoders
    import specdec.fast.logitspec as fast_logitspec
except ImportError:  # pragma: no cover - fast path not importable on this machine
    fast_glide_decoders = fast_logitspec = None

STEEP_CPU_COSTS = CostModel.fit([((1,), 0.010), ((4,), 0.020), ((16,), 0.060), ((64,), 0.220), ((4, 4), 0.035)])


@pytest.fixture(autouse=True)
def fixed_cost_model(monkeypatch):
    """Round costs from a fixed curve (no device calibration) for the ref and fast GLIDE decoders and LogitSpec's
    capacity (the same curve: verified nodes 2, 5, 17, 65)."""
    def cost(target, glide=None, cache=True):
        return STEEP_CPU_COSTS
    for mod, name in ((ref_glide, "device_cost_model"), (fast_glide_decoders, "device_cost_model"),
                      (ref_logitspec, "device_capacity_cost"), (fast_logitspec, "device_capacity_cost")):
        if mod is not None:
            monkeypatch.setattr(mod, name, cost)
    return STEEP_CPU_COSTS
