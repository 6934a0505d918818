"""Choosing the GLIDE beam's ``tree_shape`` (and the chain's ``gamma``) for a device (docs/design.md §12).

Pure and model-free: the decoders (``tree_shape="auto"``, ``gamma="auto"``) feed it measured acceptance
statistics and a measured round-cost curve; nothing here runs a model.

**Expected tokens of a shape** (:class:`AcceptanceStats`). The GLIDE beam keeps, at level k+1, the best
``tree_shape[k]`` (node, token) pairs among the children of level k's nodes by cumulative draft
log-probability, best first; call a pair's position in that order its *rank*. ``A_k(p, w)`` is the chance
that the accepted path continues into the first w ranks of level k+1 given that it reached level k, which
holds p nodes (the root level holds one). The expected tokens of one round are then::

    E(shape) = 1 + A_0(s_0) (1 + A_1(s_0, s_1) (1 + ... (1 + A_{D-1}(s_{D-2}, s_{D-1}))))

(the 1 is the target's own token; term k is P(the path reaches level k)). ``A_k`` depends on p because a
level's competitors are the children of ALL the nodes above: for the default draft, the path's node at level 5
is the best candidate in 41% of the rounds that reach level 4 of a 16-wide beam, in 77% for a chain
(BENCHMARKS.md, "Session 8: acceptance by depth and rank"). So the
statistics are measured per p: one wide tree per round is decoded (``scripts/measure_acceptance.py``) and,
inside it, the beam that keeps p nodes per level is simulated for every p (:func:`_narrow_levels`; exact
while the wide tree holds the narrow beam's candidates, else a lower bound), giving ``accept[k][p - 1][r]``.
Under greedy acceptance the accepted path is the target's own continuation, so a narrower tree accepts
exactly the part of it that it holds. Approximation (documented, like Sequoia's positional acceptance):
``A_k`` depends on the widths above only through p = s_{k-1}, measured with every level above p wide. A
simpler table by rank alone (``sum_k sum_{r < s_k} P(path passes level-k rank r)``) would also count a
deep node whose ancestor's rank does not fit and would score narrow beams by a wide beam's ranks.

**Round cost** (:class:`CostModel`): ``t(shape) = verify(n) + sum_{k < D-1} (level_fixed + level_per_node *
s_k)`` with ``n = 1 + sum(shape)`` verified nodes. ``verify(n)`` is the measured cost of a whole round of a
one-level tree ``(n - 1,)`` (root draft forward, beam, target verification of n nodes, acceptance, host
work; at a 512-token context by default), piecewise linear between the measured sizes; every further level is one draft forward over the
previous level's nodes, affine in their number (the last level needs no forward). It is fitted from whole
rounds timed on the device (:func:`measure_cost_model`, driven by the paths' decoders) and cached per
(path, device, model) in ``$XDG_CACHE_HOME/specdec/cost_models.json`` (:func:`cached_cost_model`).

**The search** (:func:`best_tree_shape`): maximise ``E(shape) / t(shape)`` (tokens per second) exactly,
over every shape of depth <= ``max_depth`` with ``sum(shape) <= max_nodes`` and widths <= what the stats
resolve (a level wider than its measured ranks and than the next level's measured rows adds no expected
tokens, and cost never falls with width, so nothing is lost) and <= ``vocab_size``. For a depth D and a last
width w the cost depends only on ``m = sum(shape[:-1])``; a dynamic programme over the levels from the
deepest up, with state (width of the level, nodes left), finds for every m the widths with the largest E
(``H_k(p, m) = max_q A_{k+1}(p, q) (1 + H_{k+1}(q, m - q))``: every factor is >= 0 and increasing in
the inner value, so the best inner value for each (q, m - q) is all an outer level needs). Each (D, w, m) is
then scored exactly; the best ratio wins, ties to fewer nodes, then fewer levels. Brute force agrees on small
cases (tests/shared/test_tree_search.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from specdec.shared.tree import validate_tree_shape
from specdec.shared.validate import check_positive_int

__all__ = [
    "ACCEPTANCE_FILE",
    "AcceptanceStats",
    "CostModel",
    "DEFAULT_PRIOR",
    "MAX_AUTO_NODES",
    "acceptance_of",
    "best_gamma",
    "best_tree_shape",
    "cached_cost_model",
    "CALIBRATION_SHAPES",
    "calibration_shapes",
    "cost_cache_key",
    "cost_cache_path",
    "device_description",
    "is_auto",
    "measure_cost_model",
    "round_timer",
    "tokens_per_second",
]

ACCEPTANCE_FILE = "acceptance.json"
"""Where a GLIDE checkpoint directory keeps its :class:`AcceptanceStats` (next to the weights)."""

ACCEPTANCE_FORMAT = "specdec_acceptance/1"
COST_FORMAT = "specdec_cost/4"
# Bump it whenever a path's round costs change: cached cost models of an older format are measured again.
# /2: each shape the fastest of its repeats; /3: the reference attention without per-head K/V copies (session 19);
# /4: the reference's in-place compaction and fused drafter passes (session 20).

MAX_AUTO_NODES = 127
"""Draft nodes an automatic shape may use: the fast path verifies at most 128 nodes (root included)."""


def is_auto(name: str, value) -> bool:
    """True for the string ``"auto"``; False for anything else that is not a string (checked later by the
    usual validation); ValueError naming the argument for any other string."""
    if isinstance(value, str):
        if value == "auto":
            return True
        raise ValueError(f"{name} must be 'auto' or {'a sequence of ints' if name == 'tree_shape' else 'an int'}, got {value!r}")
    return False


def _finite(name: str, x, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {x}")
    return x


# ---------------------------------------------------------------------------------------------
# Acceptance by level, width and rank
# ---------------------------------------------------------------------------------------------


def _narrow_levels(levels: list[list[int]], parents: Sequence[int], p: int, depth: int):
    """Simulate, inside a measured (wide) beam tree, the beam that keeps ``p`` nodes at every level.

    Yields ``(j, in_level, candidates)`` for j = 0, 1, ...: the simulated level j (a set of node ids; level 0
    = the root) and the wide tree's level-(j+1) nodes whose parent is in it, best first. The narrow level
    j+1 is the first p candidates -- exactly the narrow beam's choice when there are at least p of them
    (any pair outside the wide level scores no higher than all pairs in it); with fewer, the narrow level
    would also hold pairs the wide tree has no room for, which are unknown and count as not accepted."""
    in_level = {0}
    for j in range(depth):
        cands = [x for x in levels[j + 1] if parents[x] in in_level]
        yield j, in_level, cands
        in_level = set(cands[:p])


@dataclass(frozen=True)
class AcceptanceStats:
    """Acceptance of the GLIDE beam's nodes by level, width and rank (see the module docstring).

    ``accept[k][p - 1][r]``: P(the accepted path continues into the level-(k+1) node of rank r | it reached
    level k of a beam that keeps p nodes per level), where the rank counts the beam's candidates for level
    k+1 (children of the p level-k nodes) best first. Level 0 is the root: ``accept[0]`` has one row (p = 1).
    Rows beyond the last measured p repeat the last row; ranks beyond a row's end have probability 0. Each
    row sums to <= 1 (the rest: the path stops there).

    Attributes:
        accept: the probabilities, ``[level][p - 1][rank]``.
        rounds: rounds measured (0 for a prior).
        reached, through: the counts ``accept`` came from, when measured: ``reached[k][p - 1]`` rounds whose
            path reached level k of the p-wide beam while level k+1 was drafted, ``through[k][p - 1][r]`` of
            them continued through rank r.
        meta: where the numbers come from (draft, prompts, tree, device, ...); not compared.
    """

    accept: tuple[tuple[tuple[float, ...], ...], ...]
    rounds: int = 0
    reached: tuple[tuple[int, ...], ...] = ()
    through: tuple[tuple[tuple[int, ...], ...], ...] = ()
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def seq(x, what):
            if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
                raise TypeError(f"stats: {what} must be a list, got {type(x).__name__}")
            return list(x)

        acc = []
        for k, level in enumerate(seq(self.accept, "accept")):
            rows = []
            for i, row in enumerate(seq(level, f"accept[{k}]")):
                row = tuple(_finite(f"stats: accept[{k}][{i}][{r}]", q) for r, q in enumerate(seq(row, f"accept[{k}][{i}]")))
                if not row:
                    raise ValueError(f"stats: accept[{k}][{i}] is empty (a row needs at least rank 0)")
                if any(q > 1 for q in row) or sum(row) > 1 + 1e-9:
                    raise ValueError(f"stats: the probabilities of accept[{k}][{i}] must lie in [0, 1] and sum to <= 1, "
                                     f"got sum {sum(row):.6f}")
                rows.append(row)
            if not rows:
                raise ValueError(f"stats: accept[{k}] has no rows (level {k + 1} needs at least the row p = 1)")
            acc.append(tuple(rows))
        if not acc:
            raise ValueError("stats: no levels (empty acceptance statistics); measure them (scripts/measure_acceptance.py) "
                             "or use DEFAULT_PRIOR")
        object.__setattr__(self, "accept", tuple(acc))
        object.__setattr__(self, "reached", tuple(tuple(int(x) for x in lv) for lv in self.reached))
        object.__setattr__(self, "through", tuple(tuple(tuple(int(x) for x in row) for row in lv) for lv in self.through))
        if isinstance(self.rounds, bool) or int(self.rounds) < 0:
            raise ValueError(f"stats: rounds must be >= 0, got {self.rounds!r}")
        object.__setattr__(self, "rounds", int(self.rounds))

    # -- reading -------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Levels measured (deeper levels count as never accepted)."""
        return len(self.accept)

    @property
    def widths(self) -> tuple[int, ...]:
        """Ranks measured per level (a wider level adds nothing under these stats)."""
        return tuple(max(len(row) for row in level) for level in self.accept)

    def level_mass(self, k: int, p: int, width: int) -> float:
        """``A_k(p, width)``: P(the path continues into the first ``width`` candidates of level k+1 | it reached
        level k, which holds ``p`` nodes); ``p`` is ignored at the root (k = 0)."""
        if k >= self.depth or width < 1:
            return 0.0
        rows = self.accept[k]
        row = rows[0] if k == 0 else rows[min(max(p, 1), len(rows)) - 1]
        return min(sum(row[:width]), 1.0)

    def expected_tokens(self, tree_shape: Sequence[int]) -> float:
        """Expected tokens emitted by one round of a beam tree of this shape (the target's own token included):
        ``1 + A_0(s_0) (1 + A_1(s_0, s_1) (1 + ... A_{D-1}(s_{D-2}, s_{D-1})))``."""
        shape = validate_tree_shape(tree_shape)
        inner = 0.0
        for k in reversed(range(len(shape))):
            inner = self.level_mass(k, shape[k - 1] if k else 1, shape[k]) * (1.0 + inner)
        return 1.0 + inner

    def table(self, p: int | None = None, max_rank: int = 8) -> str:
        """A markdown table, one line per level: ``accept[k][p - 1]`` for ranks 0..max_rank-1, the rest, the
        total and the rounds behind it (``p`` None: the beam of width max_rank)."""
        p = max_rank if p is None else p
        lines = [f"| level | rounds | " + " | ".join(f"r{r}" for r in range(max_rank)) + " | rest | total |",
                 "|" + "---|" * (max_rank + 4)]
        for k, level in enumerate(self.accept):
            i = 0 if k == 0 else min(p, len(level)) - 1
            row = level[i]
            n = str(self.reached[k][i]) if k < len(self.reached) and i < len(self.reached[k]) else "-"
            cells = [f"{row[r]:.3f}" if r < len(row) else "0" for r in range(max_rank)]
            lines.append(f"| {k + 1} | {n} | " + " | ".join(cells) + f" | {sum(row[max_rank:]):.3f} | {sum(row):.3f} |")
        return "\n".join(lines)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_counts(cls, reached: Sequence[Sequence[int]], through: Sequence[Sequence[Sequence[int]]], rounds: int = 0,
                    meta: Mapping | None = None) -> "AcceptanceStats":
        """From counts: ``accept[k][i][r] = through[k][i][r] / reached[k][i]`` (0 where nothing was reached);
        trailing levels that no round reached are dropped."""
        reached = [[int(x) for x in lv] for lv in reached]
        through = [[[int(x) for x in row] for row in lv] for lv in through]
        if len(reached) != len(through) or any(len(a) != len(b) for a, b in zip(reached, through)):
            raise ValueError("stats: reached and through must have the same levels and rows")
        for k, (lv_n, lv_c) in enumerate(zip(reached, through)):
            for i, (n, row) in enumerate(zip(lv_n, lv_c)):
                if n < 0 or any(c < 0 for c in row) or sum(row) > n:
                    raise ValueError(f"stats: level {k}, row {i}: counts must be >= 0 and sum to <= reached ({sum(row)} > {n})")
        while reached and not any(reached[-1]):
            reached.pop()
            through.pop()
        if not reached:
            raise ValueError("stats: no round reached a drafted level (empty acceptance statistics)")
        accept = [tuple(tuple(c / n if n else 0.0 for c in (row or [0])) for n, row in zip(lv_n, lv_c))
                  for lv_n, lv_c in zip(reached, through)]
        return cls(tuple(accept), rounds, tuple(map(tuple, reached)), tuple(tuple(map(tuple, lv)) for lv in through),
                   dict(meta or {}))

    @classmethod
    def from_rounds(cls, records: Iterable, meta: Mapping | None = None, max_width: int | None = None) -> "AcceptanceStats":
        """Measure from ``RoundRecord`` s (the decoders' ``on_round``) of a wide beam tree, greedy.

        A node's level is its depth and the beam lists a level best first. For every width p up to the
        widest level (or ``max_width``) the p-wide beam is simulated inside each round's tree
        (:func:`_narrow_levels`) and the accepted path followed through it: a round counts for
        ``reached[k][p - 1]`` if its path reached level k of that beam while level k+1 was drafted, and for
        ``through[k][p - 1][r]`` if the path's next node is the r-th candidate. (Under greedy acceptance the
        accepted path is the target's own continuation, so a narrower tree accepts exactly the part of it
        that it holds.) Rounds cut short by the budget count only for the levels they drafted."""
        reached: list[list[int]] = []
        through: list[list[list[int]]] = []
        rounds = 0
        for rec in records:
            parents = list(rec.draft.tree.parents)
            depth = rec.draft.tree.depth
            path = list(rec.path)
            if not path or path[0] != 0:
                raise ValueError(f"records: an accepted path starts at the root (node 0), got {path}")
            for k, node in enumerate(path):
                if depth[node] != k:
                    raise ValueError(f"records: accepted path node {node} has depth {depth[node]}, expected {k}")
            rounds += 1
            levels_n = max(depth)  # levels drafted this round
            levels: list[list[int]] = [[] for _ in range(levels_n + 1)]
            for i, d in enumerate(depth):
                levels[d].append(i)
            widest = max(len(lv) for lv in levels[1:]) if levels_n else 0
            pmax = min(widest, max_width or widest)
            while len(reached) < levels_n:
                reached.append([0])
                through.append([[]])
            for p in range(1, pmax + 1):
                for j, in_level, cands in _narrow_levels(levels, parents, p, levels_n):
                    if j == 0 and p > 1:
                        continue  # the root's row is the same for every p
                    if len(path) - 1 < j or path[j] not in in_level:
                        break  # the path left this beam above level j+1
                    lv_n, lv_c = reached[j], through[j]
                    while len(lv_n) < p:
                        lv_n.append(0)
                        lv_c.append([])
                    i = 0 if j == 0 else p - 1
                    lv_n[i] += 1
                    if len(path) - 1 >= j + 1 and path[j + 1] in cands:
                        r = cands.index(path[j + 1])
                        row = lv_c[i]
                        row.extend([0] * (r + 1 - len(row)))
                        row[r] += 1
        if rounds == 0:
            raise ValueError("records: no rounds to measure (empty acceptance statistics)")
        return cls.from_counts(reached, through, rounds, meta)

    @classmethod
    def prior(cls, depth: int = 8, width: int = 16, mass: float = 0.8, ratio: float = 0.4) -> "AcceptanceStats":
        """A geometric prior for a draft without measurements, the same at every level and width: the path
        continues with probability ``mass`` in all, into rank r with ``mass (1 - ratio) ratio^r`` (renormalised
        over ``width`` ranks): with the defaults 0.48 for the beam's best, 0.19, 0.08, ... (:data:`DEFAULT_PRIOR`)."""
        w = [(1 - ratio) * ratio ** r for r in range(width)]
        z = sum(w)
        row = tuple(mass * x / z for x in w)
        return cls(((row,),) * depth, meta={"prior": {"depth": depth, "width": width, "mass": mass, "ratio": ratio}})

    # -- files -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the counts when measured (the probabilities follow from them), else the probabilities."""
        d: dict[str, Any] = {"format": ACCEPTANCE_FORMAT, "rounds": self.rounds}
        if self.reached:
            d["reached"] = [list(lv) for lv in self.reached]
            d["through"] = [[list(row) for row in lv] for lv in self.through]
        else:
            d["accept"] = [[list(row) for row in lv] for lv in self.accept]
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "AcceptanceStats":
        if not isinstance(d, Mapping) or d.get("format") != ACCEPTANCE_FORMAT:
            raise ValueError(f"stats: not a specdec acceptance file (format {d.get('format') if isinstance(d, Mapping) else None!r}, "
                             f"expected {ACCEPTANCE_FORMAT!r})")
        if d.get("reached"):
            return cls.from_counts(d["reached"], d["through"], d.get("rounds", 0), d.get("meta"))
        return cls(d.get("accept", ()), d.get("rounds", 0), meta=dict(d.get("meta") or {}))

    def save(self, path: str | os.PathLike) -> str:
        """Write JSON to ``path`` (a directory: ``path/acceptance.json``). Returns the file written."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, ACCEPTANCE_FILE)
        with open(path, "w") as f:
            f.write(_compact_json(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AcceptanceStats":
        """Read a file written by :meth:`save` (a directory: its ``acceptance.json``)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, ACCEPTANCE_FILE)
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)


def _compact_json(d: Mapping) -> str:
    """One key per line, each list of numbers on one line (small files, readable diffs)."""
    return "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, separators=(',', ':')) if k != 'meta' else json.dumps(v)}"
                               for k, v in d.items()) + "\n}\n"


DEFAULT_PRIOR = AcceptanceStats.prior()
"""What ``"auto"`` assumes for a GLIDE draft with no measured statistics (see :meth:`AcceptanceStats.prior`)."""


def acceptance_file_for(checkpoint: str | os.PathLike) -> str:
    """Where a checkpoint's statistics live: ``<dir>/acceptance.json`` for an HF-format directory,
    ``<file without extension>.acceptance.json`` next to a state_dict file."""
    p = os.fspath(checkpoint)
    return os.path.join(p, ACCEPTANCE_FILE) if os.path.isdir(p) else os.path.splitext(p)[0] + "." + ACCEPTANCE_FILE


def acceptance_of(glide) -> AcceptanceStats | None:
    """The statistics stored with a GLIDE draft: its ``acceptance`` field, else the file next to its
    checkpoint (``glide.source``; how the fast path's fused weights find them), else None."""
    stats = getattr(glide, "acceptance", None)
    if stats is not None:
        return stats
    src = getattr(glide, "source", "") or ""
    if not src or not os.path.exists(src):
        return None
    f = acceptance_file_for(src)
    return AcceptanceStats.load(f) if os.path.isfile(f) else None


# ---------------------------------------------------------------------------------------------
# Round cost
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Seconds per round of a beam tree on one device (see the module docstring).

    Attributes:
        verify: ``(n, seconds)`` points: a round of the one-level tree ``(n - 1,)`` (n verified nodes, root
            included). Piecewise linear between points, flat below the first, the last segment's slope
            beyond the last; made non-decreasing (measurement noise must not make a bigger tree look cheaper).
        level_fixed, level_per_node: each level but the last costs one draft forward over its nodes:
            ``level_fixed + level_per_node * width`` seconds.
        meta: where the numbers come from; not compared.
    """

    verify: tuple[tuple[int, float], ...]
    level_fixed: float = 0.0
    level_per_node: float = 0.0
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.verify, (str, bytes)) or not hasattr(self.verify, "__iter__"):
            raise TypeError(f"cost: verify must be a list of (n_nodes, seconds) pairs, got {type(self.verify).__name__}")
        pts: dict[int, list[float]] = {}
        for i, item in enumerate(self.verify):
            try:
                n, s = item
            except (TypeError, ValueError):
                raise TypeError(f"cost: verify[{i}] must be an (n_nodes, seconds) pair, got {item!r}") from None
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"cost: verify[{i}]: n_nodes must be an int >= 1, got {n!r}")
            pts.setdefault(n, []).append(_finite(f"cost: verify[{i}] seconds", s, 0.0, strict=True))
        if not pts:
            raise ValueError("cost: verify needs at least one (n_nodes, seconds) point")
        out, best = [], 0.0
        for n in sorted(pts):
            best = max(best, sum(pts[n]) / len(pts[n]))
            out.append((n, best))
        object.__setattr__(self, "verify", tuple(out))
        object.__setattr__(self, "level_fixed", _finite("cost: level_fixed", self.level_fixed))
        object.__setattr__(self, "level_per_node", _finite("cost: level_per_node", self.level_per_node))

    def verify_time(self, n: int) -> float:
        """Seconds of a round of the one-level tree with ``n`` verified nodes (see :attr:`verify`)."""
        pts = self.verify
        if n <= pts[0][0] or len(pts) == 1:
            if n > pts[-1][0]:
                return pts[-1][1]
            return pts[0][1]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:]):
            if n <= n1:
                return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) * (n - n1) / (n1 - n0)

    def round_time(self, tree_shape: Sequence[int]) -> float:
        """Seconds per round of a beam tree of this shape."""
        shape = validate_tree_shape(tree_shape)
        drafted = shape[:-1]  # every level but the last is one draft forward over its nodes
        return self.verify_time(1 + sum(shape)) + len(drafted) * self.level_fixed + self.level_per_node * sum(drafted)

    @classmethod
    def fit(cls, rows: Iterable[tuple[Sequence[int], float]], meta: Mapping | None = None) -> "CostModel":
        """From timed rounds ``(tree_shape, seconds per round)``: one-level shapes ``(w,)`` give the verify
        points ``(w + 1, seconds)``; the deeper shapes' excess over ``verify(n)`` fits ``level_fixed`` and
        ``level_per_node`` by least squares with both >= 0 (zero if no deeper shape was timed)."""
        rows = [(validate_tree_shape(s), _finite("cost: seconds", t, 0.0, strict=True)) for s, t in rows]
        one = [(1 + s[0], t) for s, t in rows if len(s) == 1]
        if not one:
            raise ValueError("cost: rows need at least one one-level shape (w,) to measure verification")
        base = cls(tuple(one))
        deep = [(len(s) - 1, sum(s[:-1]), t - base.verify_time(1 + sum(s))) for s, t in rows if len(s) > 1]
        a, b = _nnls2(deep)
        return cls(base.verify, a, b, dict(meta or {}, rows=[[list(s), t] for s, t in rows]))

    def to_dict(self) -> dict[str, Any]:
        return {"format": COST_FORMAT, "verify": [[n, t] for n, t in self.verify], "level_fixed": self.level_fixed,
                "level_per_node": self.level_per_node, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "CostModel":
        if not isinstance(d, Mapping) or d.get("format") != COST_FORMAT:
            raise ValueError(f"cost: not a specdec cost model (expected format {COST_FORMAT!r})")
        return cls(tuple((int(n), float(t)) for n, t in d["verify"]), float(d.get("level_fixed", 0.0)),
                   float(d.get("level_per_node", 0.0)), dict(d.get("meta") or {}))


def _nnls2(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares ``y ~ a x1 + b x2`` with ``a, b >= 0`` (two unknowns: try the interior and both edges)."""
    if not rows:
        return 0.0, 0.0

    def sse(a: float, b: float) -> float:
        return sum((y - a * x1 - b * x2) ** 2 for x1, x2, y in rows)

    s11 = sum(x1 * x1 for x1, _, _ in rows)
    s22 = sum(x2 * x2 for _, x2, _ in rows)
    s12 = sum(x1 * x2 for x1, x2, _ in rows)
    s1y = sum(x1 * y for x1, _, y in rows)
    s2y = sum(x2 * y for _, x2, y in rows)
    cands = [(0.0, 0.0)]
    if s11 > 0:
        cands.append((max(s1y / s11, 0.0), 0.0))
    if s22 > 0:
        cands.append((0.0, max(s2y / s22, 0.0)))
    det = s11 * s22 - s12 * s12
    if det > 1e-12 * max(s11 * s22, 1e-300):
        a, b = (s1y * s22 - s2y * s12) / det, (s2y * s11 - s1y * s12) / det
        if a >= 0 and b >= 0:
            cands.append((a, b))
    return min(cands, key=lambda ab: sse(*ab))


def tokens_per_second(stats: AcceptanceStats, cost: CostModel, tree_shape: Sequence[int]) -> float:
    """The objective: expected tokens per round / seconds per round."""
    return stats.expected_tokens(tree_shape) / cost.round_time(tree_shape)


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def _check_search_args(stats, cost, max_nodes: int, max_depth: int | None) -> None:
    if not isinstance(stats, AcceptanceStats):
        raise TypeError(f"stats must be an AcceptanceStats, got {type(stats).__name__}")
    if not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1:
        raise ValueError(f"max_nodes must be an int >= 1, got {max_nodes!r}")
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1):
        raise ValueError(f"max_depth must be None or an int >= 1, got {max_depth!r}")


def best_tree_shape(stats: AcceptanceStats, cost: CostModel, max_nodes: int = MAX_AUTO_NODES, max_depth: int | None = None,
                    vocab_size: int | None = None) -> tuple[int, ...]:
    """The beam shape with the most expected tokens per second (exact over the space in the module docstring).

    Args:
        stats: acceptance by level, width and rank; cost: seconds per round.
        max_nodes: most draft nodes (``sum(shape)``; 127 = the fast path's limit).
        max_depth: most levels (default: the levels ``stats`` measured).
        vocab_size: caps every width (level 1 is a top-k of the root's vocabulary; capping every level keeps
            ``s_k <= s_{k-1} * vocab`` without coupling levels -- it only matters for toy vocabularies).
    """
    _check_search_args(stats, cost, max_nodes, max_depth)
    key = (stats, cost, max_nodes, max_depth, vocab_size)
    if key not in _SEARCHED:
        _SEARCHED[key] = _search(stats, cost, max_nodes, max_depth, vocab_size)
    return _SEARCHED[key]


_SEARCHED: dict[tuple, tuple[int, ...]] = {}  # the decoders resolve "auto" on every call: search once per process


def _search(stats: AcceptanceStats, cost: CostModel, max_nodes: int, max_depth: int | None, vocab_size: int | None) -> tuple[int, ...]:
    depth_cap = min(stats.depth, max_depth or stats.depth, max_nodes)
    # a level wider than its measured ranks and than the next level's measured rows changes nothing
    rows_next = [len(level) for level in stats.accept[1:]] + [1]
    caps = [max(1, min(max(w, r), max_nodes, vocab_size or max(w, r))) for w, r in zip(stats.widths, rows_next)]
    M, P = max_nodes, max(caps)
    verify = torch.tensor([0.0] + [cost.verify_time(n) for n in range(1, M + 2)], dtype=torch.float64)  # verify[n]
    ninf = -math.inf

    # A[k][p - 1, q - 1] = A_k(p, q) for p, q <= P (cumulative sums of each row, saturating past its end)
    A = []
    for k, level in enumerate(stats.accept):
        rows = torch.zeros(len(level), P, dtype=torch.float64)
        for i, row in enumerate(level):
            c = torch.tensor(row[:P], dtype=torch.float64).cumsum(0).clamp(max=1.0)
            rows[i, : len(c)] = c
            rows[i, len(c):] = c[-1]
        A.append(rows[0:1].expand(P, P) if k == 0 else rows[torch.arange(P).clamp(max=len(level) - 1)])

    def mass(k: int, p: int, q: int) -> float:
        return float(A[k][p - 1, q - 1])

    results = []  # (D, ratio [B, M + 1], top arg [B, M + 1], args per level)
    for D in range(1, depth_cap + 1):
        B = caps[D - 1]  # the last level's width w = b + 1
        if D == 1:
            T = torch.full((B, M + 1), ninf, dtype=torch.float64)
            T[:, 0] = A[0][0, :B]
            top_arg, args = None, []
        else:
            # H[b, p - 1, m]: the best nested tail after a level of width p, m nodes in the levels between it and the last
            H = torch.full((B, P, M + 1), ninf, dtype=torch.float64)
            H[:, : caps[D - 2], 0] = A[D - 1][: caps[D - 2], :B].T
            args = []
            for k in range(D - 3, -1, -1):  # H_k from H_{k+1}: choose the width q of level k + 1
                Ak = A[k + 1]
                best = torch.full_like(H, ninf)
                arg = torch.zeros(H.shape, dtype=torch.long)
                for q in range(1, caps[k + 1] + 1):
                    inner = torch.full((B, M + 1), ninf, dtype=torch.float64)
                    inner[:, q:] = H[:, q - 1, : M + 1 - q]
                    cand = Ak[:, q - 1][None, :, None] * (1.0 + inner[:, None, :])
                    cand = torch.where(torch.isfinite(inner)[:, None, :], cand, ninf)
                    better = cand > best
                    best = torch.where(better, cand, best)
                    arg = torch.where(better, q, arg)
                best[:, caps[k]:, :] = ninf  # level k is at most caps[k] wide
                H = best
                args.append(arg)
            args.reverse()  # args[k] chose level k + 1's width
            T = torch.full((B, M + 1), ninf, dtype=torch.float64)
            top_arg = torch.zeros((B, M + 1), dtype=torch.long)
            for s0 in range(1, caps[0] + 1):
                inner = torch.full((B, M + 1), ninf, dtype=torch.float64)
                inner[:, s0:] = H[:, s0 - 1, : M + 1 - s0]
                cand = torch.where(torch.isfinite(inner), mass(0, 1, s0) * (1.0 + inner), ninf)
                better = cand > T
                T = torch.where(better, cand, T)
                top_arg = torch.where(better, s0, top_arg)
        m = torch.arange(M + 1, dtype=torch.float64)[None, :]
        w = torch.arange(1, B + 1)[:, None]
        n = 1 + m.long() + w  # verified nodes
        feasible = torch.isfinite(T) & (n <= M + 1)
        t = verify[n.clamp(max=M + 1)] + (D - 1) * cost.level_fixed + cost.level_per_node * m
        ratio = torch.where(feasible, (1.0 + T) / t, ninf)
        results.append((D, ratio, n, top_arg, args))

    best_ratio = max(float(r.max()) for _, r, _, _, _ in results)
    pick = None  # ties: fewer nodes, then fewer levels, then a narrower last level
    for D, ratio, n, top_arg, args in results:
        near = ratio >= best_ratio * (1 - 1e-12)
        if not bool(near.any()):
            continue
        n_min = int(torch.where(near, n, M + 2).min())
        if pick is None or n_min < pick[1]:
            b, mi = (near & (n == n_min)).nonzero()[0].tolist()
            pick = (D, n_min, b, mi, top_arg, args)
    D, _, b, mi, top_arg, args = pick
    if D == 1:
        return (b + 1,)
    shape = [int(top_arg[b, mi])]
    mi -= shape[0]
    for k in range(D - 2):
        q = int(args[k][b, shape[-1] - 1, mi])
        shape.append(q)
        mi -= q
    return tuple(shape) + (b + 1,)


def best_gamma(stats: AcceptanceStats, cost: CostModel, max_gamma: int = MAX_AUTO_NODES) -> int:
    """The chain length (``tree_shape = (1,) * gamma``) with the most expected tokens per second
    (every length up to ``min(max_gamma, stats.depth)`` is scored; ties to the shorter chain)."""
    _check_search_args(stats, cost, max_gamma, None)
    best_g, best_r = 1, -1.0
    for g in range(1, min(max_gamma, stats.depth) + 1):
        r = tokens_per_second(stats, cost, (1,) * g)
        if r > best_r * (1 + 1e-12):
            best_g, best_r = g, r
    return best_g


# ---------------------------------------------------------------------------------------------
# Measuring the cost on a device, and its cache
# ---------------------------------------------------------------------------------------------

CALIBRATION_SHAPES: tuple[tuple[int, ...], ...] = (
    (1,), (3,), (7,), (15,), (31,), (63,), (127,),   # verify(n) at n = 2, 4, ..., 128
    (1, 1, 1, 1), (1,) * 8, (1, 16, 1), (1, 64, 1),  # level forwards: 3 and 7 of width 1, widths 1 + 16, 1 + 64
)
"""The shapes :func:`measure_cost_model` times (filtered by :func:`calibration_shapes`)."""


def calibration_shapes(vocab_size: int, max_nodes: int = MAX_AUTO_NODES,
                       shapes: Sequence[tuple[int, ...]] = CALIBRATION_SHAPES) -> list[tuple[int, ...]]:
    """The ``shapes`` (default :data:`CALIBRATION_SHAPES`) that a model with ``vocab_size`` tokens really
    drafts (level 1 <= vocab, level k <= level k-1 * vocab) within ``max_nodes`` draft nodes."""
    out = []
    for s in shapes:
        if sum(s) <= max_nodes and s[0] <= vocab_size and all(b <= a * vocab_size for a, b in zip(s, s[1:])):
            out.append(s)
    return out


def measure_cost_model(time_round: Callable[[tuple[int, ...]], float], shapes: Sequence[Sequence[int]],
                       reps: int = 2, warmup: int = 0, meta: Mapping | None = None) -> CostModel:
    """Time rounds of each shape with ``time_round(shape) -> seconds per round`` (a path runs its decoder),
    ``warmup`` untimed calls each, then ``reps`` passes over all the shapes, and fit a :class:`CostModel` to each
    shape's FASTEST call.

    The fastest, not the median: other work on the machine only ever adds time, and the level costs are fitted
    from small differences between shapes, so one slowed call moved them several-fold. Passes, not a shape's
    repeats back to back: a slow spell of the machine then slows one call of several shapes rather than every call
    of one (measured: BENCHMARKS "Session 14: calibrating `auto`" and "Session 15")."""
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    shapes = [validate_tree_shape(s) for s in shapes]
    for shape in shapes:
        for _ in range(warmup):
            time_round(shape)
    best: dict[tuple[int, ...], float] = {}
    for _ in range(reps):
        for shape in shapes:
            t = time_round(shape)
            best[shape] = min(best.get(shape, t), t)
    return CostModel.fit([(s, best[s]) for s in shapes], meta)


def round_timer(generate: Callable[..., Any], vocab_size: int, max_position: int, stamps: bool = False,
                prompt_length: int = 512, max_gen_len: int = 24, seed: int = 0) -> Callable[[tuple[int, ...]], float]:
    """``time_round(shape) -> seconds per round`` for :func:`measure_cost_model`, from a path's decoder:
    ``generate(input_ids, prompt_length, tree_shape=, max_gen_len=, eos_id=, on_round=)`` (its
    ``tree_spec_generate`` with the target and draft bound) on a random prompt of ``prompt_length`` tokens
    (at most what the model's positions allow), EOS off, greedy. Costs grow with the context (on a CPU the
    verification's attention does): 512 is the middle of the shipped short prompts; for long-context use,
    measure at that length and pass the cost model explicitly.

    ``stamps=False``: the call's decode time over its rounds (``elapsed_time / (num - 1)``). ``stamps=True``:
    the median time between the ``on_round`` callbacks of rounds that drafted every level -- leaves out the
    first round (where a drafter without a prefill hook catches up on the prompt) and the budget-cut last
    ones, and a round slowed by other work, at the price of the callback's own host work (the reference path,
    whose rounds are slow anyway)."""
    p = max(1, min(prompt_length, max_position - max_gen_len - 16))
    ids = torch.randint(0, vocab_size, (1, p), generator=torch.Generator().manual_seed(seed))

    def time_round(shape: tuple[int, ...]) -> float:
        marks: list[tuple[float, int]] = []
        hook = (lambda r: marks.append((time.perf_counter(), max(r.draft.tree.depth)))) if stamps else None
        res = generate(ids, p, tree_shape=shape, max_gen_len=max_gen_len, eos_id=[], on_round=hook)
        if stamps:
            gaps = [t1 - t0 for (t0, _), (t1, d) in zip(marks, marks[1:]) if d == len(shape)]
            if gaps:
                return statistics.median(gaps)
        return res.elapsed_time / max(res.num - 1, 1)

    return time_round


def device_description(device) -> str:
    """A readable name of the device costs are measured on (CPU: model name and torch threads)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{dev.type}: {name}, {torch.get_num_threads()} threads"


def cost_cache_key(path: str, device, dtype, *configs) -> str:
    """``path | device | dtype | hash of the configs (the target's and the draft's) | cost format``."""
    parts = [asdict(c) if is_dataclass(c) else c for c in configs]
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{path}|{device_description(device)}|{str(dtype).replace('torch.', '')}|{h}|{COST_FORMAT}"


def cost_cache_path() -> str:
    """``$XDG_CACHE_HOME/specdec/cost_models.json`` (``~/.cache/specdec/...`` without XDG_CACHE_HOME)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "specdec", "cost_models.json")


_PROCESS_COSTS: dict[str, CostModel] = {}


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_cost_model(key: str, measure: Callable[[], CostModel], cache: bool = True) -> CostModel:
    """The cost model for ``key``: measured once per process, and with ``cache`` read from / written to
    :func:`cost_cache_path` (a corrupt or unreadable cache is ignored and rewritten). ``cache=False``
    measures afresh and touches neither the file nor the process memo."""
    if not cache:
        return measure()
    if key in _PROCESS_COSTS:
        return _PROCESS_COSTS[key]
    path = cost_cache_path()
    entry = _read_cache(path).get(key)
    if entry is not None:
        try:
            _PROCESS_COSTS[key] = CostModel.from_dict(entry)
            return _PROCESS_COSTS[key]
        except (ValueError, TypeError, KeyError):
            pass  # stale or corrupt entry: measure again
    cost = measure()
    _PROCESS_COSTS[key] = cost
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        d = _read_cache(path)
        d[key] = cost.to_dict()
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(d, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: keep the process memo only
    return cost


DEFAULT_TREE_SHAPE = (4, 16, 16, 16, 16)
"""LongSpec's beam tree (69 verified nodes): what ``tree_shape=None`` means on both paths."""


def choose_tree_shape(tree_shape: Sequence[int] | str | None, glide, vocab_size: int, stats: AcceptanceStats | None,
                      cost: CostModel | None, measure: Callable[[], CostModel]) -> tuple[int, ...]:
    """The concrete beam shape for ``tree_shape``: a shape is validated, None is :data:`DEFAULT_TREE_SHAPE`,
    ``"auto"`` is :func:`best_tree_shape` under ``stats`` (default: the draft's measured acceptance, else
    :data:`DEFAULT_PRIOR`) and ``cost`` (default: ``measure()``, the path's own round costs). One rule for
    ``resolve_tree_shape`` of both paths."""
    if not is_auto("tree_shape", tree_shape):
        return validate_tree_shape(DEFAULT_TREE_SHAPE if tree_shape is None else tree_shape)
    stats = stats or acceptance_of(glide) or DEFAULT_PRIOR
    return best_tree_shape(stats, cost or measure(), vocab_size=vocab_size)


def choose_gamma(gamma: int | str, glide, stats: AcceptanceStats | None, cost: CostModel | None,
                 measure: Callable[[], CostModel]) -> int:
    """The GLIDE chain length for ``gamma``: an int is checked (>= 1), ``"auto"`` is :func:`best_gamma`
    (stats and cost as in :func:`choose_tree_shape`)."""
    if not is_auto("gamma", gamma):
        return check_positive_int("gamma", gamma)
    stats = stats or acceptance_of(glide) or DEFAULT_PRIOR
    return best_gamma(stats, cost or measure())
