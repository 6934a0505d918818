"""Choosing LogitSpec's ``draft_tree_capacity`` for a device (``"auto"``; docs/design.md §12).

LogitSpec verifies a trie of ``capacity`` draft nodes every round (padded to that size), so the capacity
trades expected tokens per round against the cost of verifying ``capacity + 1`` nodes. On a GPU at small
batch a wider tree costs little; on a CPU every verified row costs real time (BENCHMARKS.md, "Session 15:
LogitSpec's tree capacity": 8 drafts beat the seed's 64 by 38 % on a 2-core CPU). ``"auto"`` picks the
capacity with the most expected tokens per second, as ``tree_shape="auto"`` does for the GLIDE beam.

**Expected tokens of a capacity** (:class:`CapacityStats`). The drafter inserts branches into its trie in a
fixed order and stops when the capacity is used up, so the tree of capacity ``c`` is exactly the first ``c``
nodes the trie of any larger capacity ``C`` created (the guess order, the branches and where each insertion
stops do not depend on the capacity until it is reached; ``tests/shared/test_capacity.py`` checks it). Under
greedy acceptance the accepted path is the target's own continuation, so a round run at ``C`` also says what
every ``c <= C`` would have accepted: the path's nodes with insertion index ``<= c`` (a child is always
inserted after its parent, so these are a prefix of the path). One run at the largest capacity therefore
measures the whole curve ``E(c) = 1 + E[accepted drafts | c]`` (``scripts/measure_acceptance.py --method
logitspec``), stored with the target as ``logitspec_acceptance.json``.

**Round cost**: a :class:`~specdec.shared.tree_search.CostModel` whose ``verify(c + 1)`` points are whole
LogitSpec rounds timed on the device at the capacities :data:`CALIBRATION_CAPACITIES` (drafting, padding,
verification, acceptance, host work), piecewise linear between them; measured by the paths'
``measure_capacity_cost`` and cached per (path, device, model) next to the GLIDE cost models.

**The choice** (:func:`best_capacity`): the capacity among :data:`CAPACITY_CHOICES` (and the measured ones)
with the largest ``E(c) / t(c)``; ties go to the smaller tree.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from specdec.shared.assets import ASSETS_DIR, EMBEDDED_MODELS
from specdec.shared.tree_search import MAX_AUTO_NODES, CostModel, is_auto
from specdec.shared.validate import check_positive_int

__all__ = ["CAPACITY_FILE", "CAPACITY_FORMAT", "CAPACITY_CHOICES", "CALIBRATION_CAPACITIES", "CapacityStats",
           "accepted_by_capacity", "capacity_file_for", "capacity_stats_of", "default_capacity_stats", "best_capacity",
           "choose_capacity"]

CAPACITY_FILE = "logitspec_acceptance.json"
"""Where a target's checkpoint directory keeps its :class:`CapacityStats` (next to the weights)."""

CAPACITY_FORMAT = "specdec_logitspec_acceptance/1"

CAPACITY_CHOICES: tuple[int, ...] = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 127)
"""The capacities ``"auto"`` considers (127 = the most the fast path verifies, root included: 128 nodes)."""

CALIBRATION_CAPACITIES: tuple[int, ...] = (1, 4, 16, 64, 127)
"""The capacities whose rounds are timed to fit the cost curve (verified nodes 2, 5, 17, 65, 128)."""


def accepted_by_capacity(insertion_ids: Sequence[int], capacities: Sequence[int]) -> list[int]:
    """Drafts a round would have accepted at each capacity: ``insertion_ids`` are the accepted drafts'
    insertion indices along the path (root excluded, increasing), so capacity ``c`` keeps those ``<= c``."""
    return [bisect.bisect_right(insertion_ids, c) for c in capacities]


@dataclass(frozen=True)
class CapacityStats:
    """Drafts accepted per LogitSpec round at each capacity, from one run at the largest.

    Attributes:
        capacities: increasing capacities (ints >= 1).
        accepted: drafts accepted in all ``rounds`` together had the tree held ``capacities[i]`` nodes
            (non-decreasing: a larger tree holds every smaller one).
        rounds: rounds measured (>= 1).
        meta: where the numbers come from; not compared.
    """

    capacities: tuple[int, ...]
    accepted: tuple[int, ...]
    rounds: int
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        caps, acc = tuple(self.capacities), tuple(self.accepted)
        if not caps or len(caps) != len(acc):
            raise ValueError(f"stats: capacities and accepted must be non-empty and of equal length, got {len(caps)} and {len(acc)}")
        for name, xs in (("capacities", caps), ("accepted", acc)):
            for x in xs:
                if isinstance(x, bool) or not isinstance(x, int) or x < (1 if name == "capacities" else 0):
                    raise ValueError(f"stats: {name} must be ints >= {1 if name == 'capacities' else 0}, got {x!r}")
        if any(b <= a for a, b in zip(caps, caps[1:])):
            raise ValueError(f"stats: capacities must be strictly increasing, got {list(caps)}")
        if any(b < a for a, b in zip(acc, acc[1:])):
            raise ValueError(f"stats: accepted must not decrease with the capacity, got {list(acc)}")
        check_positive_int("stats: rounds", self.rounds)
        object.__setattr__(self, "capacities", caps)
        object.__setattr__(self, "accepted", acc)

    @classmethod
    def measure(cls, rounds: Iterable[Sequence[int]], capacities: Sequence[int] = CAPACITY_CHOICES,
                meta: Mapping | None = None) -> "CapacityStats":
        """From the accepted drafts' insertion indices of each round (run at a capacity >= every one of
        ``capacities``; :func:`accepted_by_capacity`)."""
        caps = sorted(set(capacities))
        totals, n = [0] * len(caps), 0
        for ids in rounds:
            totals = [t + a for t, a in zip(totals, accepted_by_capacity(ids, caps))]
            n += 1
        if n == 0:
            raise ValueError("stats: no rounds to measure")
        return cls(tuple(caps), tuple(totals), n, dict(meta or {}))

    def expected_tokens(self, capacity: int) -> float:
        """``1 + mean accepted drafts`` at ``capacity``: piecewise linear between the measured capacities,
        from (0 drafts, 0 accepted) up to the first, flat beyond the last (nothing measured there)."""
        c = check_positive_int("capacity", capacity)
        pts = [(0, 0.0)] + [(k, a / self.rounds) for k, a in zip(self.capacities, self.accepted)]
        if c >= pts[-1][0]:
            return 1.0 + pts[-1][1]
        for (c0, a0), (c1, a1) in zip(pts, pts[1:]):
            if c <= c1:
                return 1.0 + a0 + (a1 - a0) * (c - c0) / (c1 - c0)
        raise AssertionError("unreachable")

    def to_dict(self) -> dict[str, Any]:
        return {"format": CAPACITY_FORMAT, "capacities": list(self.capacities), "accepted": list(self.accepted),
                "rounds": self.rounds, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CapacityStats":
        if not isinstance(d, Mapping) or d.get("format") != CAPACITY_FORMAT:
            raise ValueError(f"stats: not a specdec LogitSpec acceptance file (format "
                             f"{d.get('format') if isinstance(d, Mapping) else None!r}, expected {CAPACITY_FORMAT!r})")
        try:
            return cls(tuple(d["capacities"]), tuple(d["accepted"]), d["rounds"], dict(d.get("meta") or {}))
        except KeyError as e:
            raise ValueError(f"stats: the LogitSpec acceptance file has no {e.args[0]!r} field") from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CapacityStats":
        try:
            with open(path) as f:
                d = json.load(f)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: not JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None


def capacity_file_for(checkpoint: str | os.PathLike) -> str:
    """``<dir>/logitspec_acceptance.json`` for an HF-format directory, ``<file>.logitspec_acceptance.json`` else."""
    p = os.fspath(checkpoint)
    return os.path.join(p, CAPACITY_FILE) if os.path.isdir(p) else os.path.splitext(p)[0] + "." + CAPACITY_FILE


def capacity_stats_of(target) -> CapacityStats | None:
    """The statistics stored with a target: the file next to its checkpoint (``target.source``), else None."""
    src = getattr(target, "source", "") or ""
    if not src or not os.path.exists(src):
        return None
    f = capacity_file_for(src)
    return CapacityStats.load(f) if os.path.isfile(f) else None


def default_capacity_stats() -> CapacityStats:
    """For a target without its own file: the embedded default model's curve (a stand-in, documented as such;
    measure your model's with ``scripts/measure_acceptance.py --method logitspec``)."""
    return CapacityStats.load(capacity_file_for(os.path.join(ASSETS_DIR, EMBEDDED_MODELS["default"])))


def best_capacity(stats: CapacityStats, cost: CostModel, max_capacity: int = MAX_AUTO_NODES,
                  choices: Sequence[int] = CAPACITY_CHOICES) -> int:
    """The capacity with the most expected tokens per second, ``stats.expected_tokens(c) / cost.verify_time(c + 1)``,
    among ``choices`` and the measured capacities up to ``max_capacity`` (ties: the smaller)."""
    if not isinstance(stats, CapacityStats):
        raise TypeError(f"stats must be a CapacityStats, got {type(stats).__name__}")
    if not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
    check_positive_int("max_capacity", max_capacity)
    cands = sorted({c for c in (*choices, *stats.capacities) if 1 <= c <= max_capacity}) or [1]
    best_c, best_r = cands[0], -1.0
    for c in cands:
        r = stats.expected_tokens(c) / cost.verify_time(c + 1)
        if r > best_r * (1 + 1e-12):
            best_c, best_r = c, r
    return best_c


def choose_capacity(capacity: int | str, target, stats: CapacityStats | None, cost: CostModel | None,
                    measure: Callable[[], CostModel], max_capacity: int = MAX_AUTO_NODES) -> int:
    """The concrete ``draft_tree_capacity``: an int is checked (>= 1), ``"auto"`` is :func:`best_capacity`
    under ``stats`` (default: the target's stored file, else :func:`default_capacity_stats`) and ``cost``
    (default: ``measure()``, the path's own round costs). One rule for ``resolve_capacity`` of both paths."""
    if not is_auto("draft_tree_capacity", capacity):
        return check_positive_int("draft_tree_capacity", capacity)
    stats = stats or capacity_stats_of(target) or default_capacity_stats()
    return best_capacity(stats, cost or measure(), max_capacity)
