"""Choosing the GLIDE beam's ``tree_shape`` (and the chain's ``gamma``) for a device (docs/design.md §12).

Pure and model-free: the decoders (``tree_shape="auto"``, ``gamma="auto"``) feed it measured acceptance
statistics and a measured round-cost curve; nothing here runs a model.

**Expected tokens of a shape** (:class:`AcceptanceStats`). The GLIDE beam keeps, at level k, the best
``tree_shape[k]`` (node, token) pairs by cumulative draft log-probability, best first; call a node's
position in its level its *rank*. Measured with a wide reference tree, ``accept[k][r]`` is the fraction of
rounds whose accepted path passes through the level-(k+1) node of rank r **among the rounds whose path
reached level k** (level 0 = the root, always reached). With ``A_k(w) = sum(accept[k][:w])`` (the chance
the path continues into the first w ranks of level k+1) the expected tokens of one round are::

    E(shape) = 1 + A_0(s_0) + A_0(s_0) A_1(s_1) + ... + A_0(s_0) ... A_{D-1}(s_{D-1})
             = 1 + A_0(s_0) (1 + A_1(s_1) (1 + ... (1 + A_{D-1}(s_{D-1}))))

(the 1 is the target's own token; every further term is P(the path reaches that level)). Why these
numbers describe a narrower beam: a narrower beam ranks a subset of the wide beam's candidates with the same
scores, so a node the wide tree ranks r is ranked <= r there, and a path whose ranks fit the narrow shape
level by level is in the narrow tree too. Two approximations, both documented: the product treats the rank
at one level as independent of the ranks above it (as Sequoia's positional acceptance does), and a narrow
beam can hold nodes the wide one had no room for, so E is if anything an underestimate. The conditional form
is deliberate: the simpler marginal sum ``sum_k sum_{r < s_k} P(path passes level-k rank r)`` counts a
deep node even when its ancestor's rank does not fit (e.g. ``(1, 16, 16)`` scored with paths whose first
node had rank 2), and overrates shapes with a narrow top.

**Round cost** (:class:`CostModel`): ``t(shape) = verify(n) + sum_{k < D-1} (level_fixed + level_per_node *
s_k)`` with ``n = 1 + sum(shape)`` verified nodes. ``verify(n)`` is the measured cost of a whole round of a
one-level tree ``(n - 1,)`` (root draft forward, beam, target verification of n nodes, acceptance, host
work), piecewise linear between the measured sizes; every further level is one draft forward over the
previous level's nodes, affine in their number (the last level needs no forward). It is fitted from whole
rounds timed on the device (:func:`measure_cost_model`, driven by the paths' decoders) and cached per
(path, device, model) in ``$XDG_CACHE_HOME/specdec/cost_models.json`` (:func:`cached_cost_model`).

**The search** (:func:`best_tree_shape`): maximise ``E(shape) / t(shape)`` (tokens per second) exactly,
over every shape of depth <= ``max_depth`` with ``sum(shape) <= max_nodes`` and widths <= the measured
widths (a wider level adds no expected tokens under the stats and cost never falls with width, so nothing
is lost) and <= ``vocab_size``. For a depth D and a last width w, the cost depends only on ``m =
sum(shape[:-1])``; for every m a dynamic programme over the levels, from the deepest up, finds the widths
with the largest E (``X_k(m) = max_s A_k(s) (1 + X_{k+1}(m - s))``: every factor is >= 0 and increasing
in the inner value, so the best inner value for each m is all an outer level needs). Each (D, w, m) is then
scored exactly; the best ratio wins, ties to fewer nodes, then fewer levels.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from specdec.shared.tree import validate_tree_shape

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
    "calibration_shapes",
    "cost_cache_key",
    "cost_cache_path",
    "device_description",
    "is_auto",
    "measure_cost_model",
    "tokens_per_second",
]

ACCEPTANCE_FILE = "acceptance.json"
"""Where a GLIDE checkpoint directory keeps its :class:`AcceptanceStats` (next to the weights)."""

ACCEPTANCE_FORMAT = "specdec_acceptance/1"
COST_FORMAT = "specdec_cost/1"

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
# Acceptance by depth and rank
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptanceStats:
    """P(the accepted path continues into the level-(k+1) node of beam rank r | it reached level k).

    Attributes:
        accept: ``accept[k][r]`` for levels k = 0..D-1 (k = 0: the root's children) and ranks r (0 = the
            beam's best); each level sums to <= 1 (the rest: the path stops there).
        rounds: rounds measured (0 for a prior).
        reached, through: the counts ``accept`` came from, when measured: ``reached[k]`` rounds whose path
            reached level k while level k+1 was drafted, ``through[k][r]`` of them continued through rank r.
        meta: where the numbers come from (draft, prompts, tree, device, ...); not compared.
    """

    accept: tuple[tuple[float, ...], ...]
    rounds: int = 0
    reached: tuple[int, ...] = ()
    through: tuple[tuple[int, ...], ...] = ()
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.accept, (str, bytes)) or not hasattr(self.accept, "__iter__"):
            raise TypeError(f"stats: accept must be a list of levels (lists of probabilities), got {type(self.accept).__name__}")
        acc = []
        for k, level in enumerate(self.accept):
            if isinstance(level, (str, bytes)) or not hasattr(level, "__iter__"):
                raise TypeError(f"stats: accept[{k}] must be a list of probabilities, got {type(level).__name__}")
            row = tuple(_finite(f"stats: accept[{k}][{r}]", p) for r, p in enumerate(level))
            if not row:
                raise ValueError(f"stats: accept[{k}] is empty (a level needs at least rank 0)")
            if any(p > 1 for p in row) or sum(row) > 1 + 1e-9:
                raise ValueError(f"stats: the probabilities of level {k} must lie in [0, 1] and sum to <= 1, got sum {sum(row):.6f}")
            acc.append(row)
        if not acc:
            raise ValueError("stats: no levels (empty acceptance statistics); measure them (scripts/measure_acceptance.py) "
                             "or use DEFAULT_PRIOR")
        object.__setattr__(self, "accept", tuple(acc))
        object.__setattr__(self, "reached", tuple(int(x) for x in self.reached))
        object.__setattr__(self, "through", tuple(tuple(int(x) for x in row) for row in self.through))
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
        """Ranks measured per level (wider levels add nothing under these stats)."""
        return tuple(len(level) for level in self.accept)

    def level_mass(self, k: int, width: int) -> float:
        """``A_k(width)``: P(the path continues into the first ``width`` ranks of level k+1 | it reached level k)."""
        if k >= self.depth or width < 1:
            return 0.0
        return min(sum(self.accept[k][:width]), 1.0)

    def expected_tokens(self, tree_shape: Sequence[int]) -> float:
        """Expected tokens emitted by one round of a beam tree of this shape (bonus token included)."""
        shape = validate_tree_shape(tree_shape)
        inner = 0.0
        for k in reversed(range(len(shape))):
            inner = self.level_mass(k, shape[k]) * (1.0 + inner)
        return 1.0 + inner

    def table(self, max_rank: int = 8) -> str:
        """A markdown table: one row per level, conditional acceptance of ranks 0..max_rank-1, the rest, total."""
        head = "| level | reached | " + " | ".join(f"r{r}" for r in range(max_rank)) + " | rest | total |"
        lines = [head, "|" + "---|" * (max_rank + 4)]
        for k, level in enumerate(self.accept):
            reached = str(self.reached[k]) if k < len(self.reached) else "-"
            cells = [f"{level[r]:.3f}" if r < len(level) else "" for r in range(max_rank)]
            lines.append(f"| {k + 1} | {reached} | " + " | ".join(cells) + f" | {sum(level[max_rank:]):.3f} | {sum(level):.3f} |")
        return "\n".join(lines)

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_counts(cls, reached: Sequence[int], through: Sequence[Sequence[int]], rounds: int = 0,
                    meta: Mapping | None = None) -> "AcceptanceStats":
        """From counts: ``accept[k][r] = through[k][r] / reached[k]``; trailing levels never reached are dropped."""
        reached, through = [int(x) for x in reached], [[int(x) for x in row] for row in through]
        if len(reached) != len(through):
            raise ValueError(f"stats: reached has {len(reached)} levels but through has {len(through)}")
        for k, (n, row) in enumerate(zip(reached, through)):
            if n < 0 or any(c < 0 for c in row) or sum(row) > n:
                raise ValueError(f"stats: level {k}: counts must be >= 0 and sum to <= reached ({sum(row)} > {n})")
        while reached and reached[-1] == 0:
            reached.pop()
            through.pop()
        if not reached:
            raise ValueError("stats: no round drafted a level (empty acceptance statistics)")
        accept = [[c / n if n else 0.0 for c in (row or [0])] for n, row in zip(reached, through)]
        return cls(tuple(map(tuple, accept)), rounds, tuple(reached), tuple(map(tuple, through)), dict(meta or {}))

    @classmethod
    def from_rounds(cls, records: Iterable, meta: Mapping | None = None) -> "AcceptanceStats":
        """Measure from ``RoundRecord`` s (the decoders' ``on_round``): each record's draft tree and accepted path.

        A node's level is its depth and its rank its position among the nodes of that depth in index order
        (the beam lists a level best first). A round counts for level k+1 only if it drafted that level
        (rounds cut short by the budget draft fewer)."""
        reached: list[int] = []
        through: list[list[int]] = []
        rounds = 0
        for rec in records:
            depth = rec.draft.tree.depth
            path = list(rec.path)
            if not path or path[0] != 0:
                raise ValueError(f"records: an accepted path starts at the root (node 0), got {path}")
            rounds += 1
            first: dict[int, int] = {}
            for i, d in enumerate(depth):
                first.setdefault(d, i)
            levels = max(depth)  # levels drafted this round
            while len(reached) < levels:
                reached.append(0)
                through.append([])
            for k in range(levels):  # level k+1 was drafted
                if len(path) - 1 < k:
                    break  # the path stopped above level k
                reached[k] += 1
                if len(path) - 1 >= k + 1:
                    node = path[k + 1]
                    if depth[node] != k + 1:
                        raise ValueError(f"records: path node {node} has depth {depth[node]}, expected {k + 1}")
                    rank = node - first[k + 1]
                    row = through[k]
                    row.extend([0] * (rank + 1 - len(row)))
                    row[rank] += 1
        if rounds == 0:
            raise ValueError("records: no rounds to measure (empty acceptance statistics)")
        return cls.from_counts(reached, through, rounds, meta)

    @classmethod
    def prior(cls, depth: int = 8, width: int = 16, mass: float = 0.8, ratio: float = 0.4) -> "AcceptanceStats":
        """A geometric prior for a draft without measurements: at every level the path continues with
        probability ``mass`` in all, into rank r with ``mass (1 - ratio) ratio^r`` (renormalised over
        ``width`` ranks): with the defaults 0.48 for the beam's best, 0.19, 0.08, ... (:data:`DEFAULT_PRIOR`)."""
        w = [(1 - ratio) * ratio ** r for r in range(width)]
        z = sum(w)
        level = tuple(mass * x / z for x in w)
        return cls((level,) * depth, meta={"prior": {"depth": depth, "width": width, "mass": mass, "ratio": ratio}})

    # -- files -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": ACCEPTANCE_FORMAT, "rounds": self.rounds,
                             "accept": [[round(p, 6) for p in level] for level in self.accept]}
        if self.reached:
            d["reached"], d["through"] = list(self.reached), [list(r) for r in self.through]
        d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "AcceptanceStats":
        if not isinstance(d, Mapping) or d.get("format") != ACCEPTANCE_FORMAT:
            raise ValueError(f"stats: not a specdec acceptance file (format {d.get('format') if isinstance(d, Mapping) else None!r}, "
                             f"expected {ACCEPTANCE_FORMAT!r})")
        if d.get("reached"):
            return cls.from_counts(d["reached"], d["through"], d.get("rounds", 0), d.get("meta"))
        return cls(tuple(tuple(level) for level in d.get("accept", ())), d.get("rounds", 0), meta=dict(d.get("meta") or {}))

    def save(self, path: str | os.PathLike) -> str:
        """Write JSON to ``path`` (a directory: ``path/acceptance.json``). Returns the file written."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, ACCEPTANCE_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
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
        stats: acceptance by level and rank; cost: seconds per round.
        max_nodes: most draft nodes (``sum(shape)``; 127 = the fast path's limit).
        max_depth: most levels (default: the levels ``stats`` measured).
        vocab_size: caps every width (level 1 is a top-k of the root's vocabulary; capping every level keeps
            ``s_k <= s_{k-1} * vocab`` without coupling levels -- it only matters for toy vocabularies).
    """
    _check_search_args(stats, cost, max_nodes, max_depth)
    depth_cap = min(stats.depth, max_depth or stats.depth, max_nodes)
    caps = [max(1, min(w, max_nodes, vocab_size or w)) for w in stats.widths]
    big = max_nodes
    verify = [0.0] + [cost.verify_time(n) for n in range(1, big + 2)]  # verify[n], n verified nodes
    best = None  # (ratio, n, D, w, m, choices)
    for D in range(1, depth_cap + 1):
        wl = caps[D - 1]
        # X[b, m]: best nested value of levels j..D-1 with last width b + 1 and m nodes in levels j..D-2
        last = torch.tensor([stats.level_mass(D - 1, w) for w in range(1, wl + 1)], dtype=torch.float64)
        X = torch.full((wl, big + 1), -math.inf, dtype=torch.float64)
        X[:, 0] = last
        choices = []
        for j in range(D - 2, -1, -1):
            bestX = torch.full_like(X, -math.inf)
            arg = torch.zeros(X.shape, dtype=torch.long)
            for s in range(1, caps[j] + 1):
                a = stats.level_mass(j, s)
                shifted = torch.full_like(X, -math.inf)
                shifted[:, s:] = X[:, : big + 1 - s]
                cand = torch.where(torch.isfinite(shifted), a * (1.0 + shifted), shifted)
                better = cand > bestX
                bestX = torch.where(better, cand, bestX)
                arg = torch.where(better, torch.full_like(arg, s), arg)
            X = bestX
            choices.append(arg)
        choices.reverse()  # choices[j] for level j = 0..D-2
        for b in range(wl):
            w = b + 1
            for mi in range(big + 1 - w):
                x = float(X[b, mi])
                if not math.isfinite(x):
                    continue
                n = 1 + mi + w
                t = verify[n] + (D - 1) * cost.level_fixed + cost.level_per_node * mi
                ratio = (1.0 + x) / t
                if best is None or ratio > best[0] * (1 + 1e-12) or (ratio >= best[0] * (1 - 1e-12) and (n, D) < (best[1], best[2])):
                    best = (ratio, n, D, w, mi, choices)
    _, _, D, w, mi, choices = best
    shape = []
    for j in range(D - 1):
        s = int(choices[j][w - 1, mi])
        shape.append(s)
        mi -= s
    return tuple(shape) + (w,)


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


def calibration_shapes(vocab_size: int, max_nodes: int = MAX_AUTO_NODES) -> list[tuple[int, ...]]:
    """:data:`CALIBRATION_SHAPES` that a model with ``vocab_size`` tokens really drafts (level 1 <= vocab,
    level k <= level k-1 * vocab) within ``max_nodes`` draft nodes."""
    out = []
    for s in CALIBRATION_SHAPES:
        if sum(s) <= max_nodes and s[0] <= vocab_size and all(b <= a * vocab_size for a, b in zip(s, s[1:])):
            out.append(s)
    return out


def measure_cost_model(time_round: Callable[[tuple[int, ...]], float], shapes: Sequence[Sequence[int]],
                       reps: int = 2, warmup: int = 0, meta: Mapping | None = None) -> CostModel:
    """Time rounds of each shape with ``time_round(shape) -> seconds per round`` (a path runs its decoder),
    ``warmup`` untimed calls then the median of ``reps``, and fit a :class:`CostModel`."""
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an int >= 1, got {reps!r}")
    rows = []
    for shape in shapes:
        shape = validate_tree_shape(shape)
        for _ in range(warmup):
            time_round(shape)
        rows.append((shape, statistics.median(time_round(shape) for _ in range(reps))))
    return CostModel.fit(rows, meta)


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
    """``path | device | dtype | hash of the configs`` (the target's and the draft's)."""
    parts = [asdict(c) if is_dataclass(c) else c for c in configs]
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{path}|{device_description(device)}|{str(dtype).replace('torch.', '')}|{h}"


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
