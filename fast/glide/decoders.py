"""The GLIDE decoders of the fast path: :func:`tree_spec_generate` (beam trees) and
:func:`spec_generate` (chains), same contracts as :mod:`specdec.ref.glide`'s, and their ``"auto"``
shapes (:func:`resolve_tree_shape`, :func:`resolve_gamma`: docs/design.md §12) with this path's own
round costs (:func:`measure_cost_model`, :func:`device_cost_model`)."""

from __future__ import annotations

import itertools

from collections.abc import Callable, Sequence

import torch
from specdec.fast.engine import check_drafts_fit, run_speculative_fast
from specdec.fast.glide.drafter import FastGlideDrafter
from specdec.fast.glide.weights import as_fast_glide
from specdec.fast.kernels.rowgemm import row_tile_limits
from specdec.fast.model import as_fast_model
from specdec.shared import tree_search
from specdec.shared.result import GenerationResult
from specdec.shared.round import RoundRecord
from specdec.shared.tree import tree_shape_num_nodes
from specdec.shared.tree_search import AcceptanceStats, CostModel

__all__ = ["spec_generate", "tree_spec_generate", "resolve_tree_shape", "resolve_gamma", "device_cost_model",
           "measure_cost_model", "DEFAULT_TREE_SHAPE"]

DEFAULT_TREE_SHAPE = tree_search.DEFAULT_TREE_SHAPE  # LongSpec's beam tree
"""LongSpec's beam: 68 drafts + root = 69 verified positions (``tree_shape=None`` means this)."""

CPU_CALIBRATION_SHAPES = ((1,), (15,), (63,), (1, 1, 1, 1), (1, 16, 1))
"""Without CUDA the kernels run in the Triton interpreter (about a second per round): a reduced calibration."""


def calibration_shapes(vocab_size: int, cpu: bool) -> list[tuple[int, ...]]:
    """The shapes this path's :func:`measure_cost_model` times. On a CPU: :data:`CPU_CALIBRATION_SHAPES`. On
    CUDA: :data:`~specdec.shared.tree_search.CALIBRATION_SHAPES` plus the one-level shapes verifying ``r`` and
    ``r + 1`` nodes at every row-tile limit ``r`` of the row GEMM (:func:`~specdec.fast.kernels.rowgemm.row_tile_limits`):
    past each limit every weight takes the next tile, so the verification's cost steps there. A cost model
    interpolated between 32 and 64 nodes priced a 33-node tree's round 10 % low (BENCHMARKS "Session 36: the
    GLIDE tree's frontier")."""
    if cpu:
        return tree_search.calibration_shapes(vocab_size, shapes=CPU_CALIBRATION_SHAPES)
    steps = tuple((n - 1,) for r in row_tile_limits() for n in (r, r + 1))
    shapes = tree_search.CALIBRATION_SHAPES + tuple(s for s in steps if s not in tree_search.CALIBRATION_SHAPES)
    return tree_search.calibration_shapes(vocab_size, shapes=shapes)


def measure_cost_model(target, glide, reps: int | None = None, shapes: Sequence[Sequence[int]] | None = None,
                       max_gen_len: int | None = None, prompt_length: int = 512) -> CostModel:
    """Time rounds of this path's :func:`tree_spec_generate` on the target's device (a random prompt of
    ``prompt_length`` tokens, greedy, one untimed call per shape first: CUDA graphs and kernels are built there) and fit a
    :class:`~specdec.shared.tree_search.CostModel`. On a CPU (Triton interpreter) a reduced set of shapes,
    one call each: what it measures is the interpreter's cost."""
    fm, fg = _target_and_glide(target, glide, None)
    c, cpu = fm.config, fm.device.type == "cpu"
    if shapes is None:
        shapes = calibration_shapes(c.vocab_size, cpu)
    reps = reps or (1 if cpu else 3)
    gen = max_gen_len or (6 if cpu else 32)
    timer = tree_search.round_timer(lambda *a, **kw: tree_spec_generate(fm, fg, *a, **kw), c.vocab_size,
                                    c.max_position_embeddings, stamps=False, max_gen_len=gen, prompt_length=prompt_length)
    meta = {"path": "fast", "device": tree_search.device_description(fm.device), "dtype": str(fm.dtype), "reps": reps,
            "graphs": bool(fm.use_graphs), "prompt_length": prompt_length}
    return tree_search.measure_cost_model(timer, shapes, reps=reps, warmup=0 if cpu else 1, meta=meta)


def device_cost_model(target, glide, cache: bool = True) -> CostModel:
    """:func:`measure_cost_model`, once per process and (``cache``) per device and model in
    ``$XDG_CACHE_HOME/specdec/cost_models.json`` (:func:`specdec.shared.tree_search.cached_cost_model`)."""
    fm, fg = _target_and_glide(target, glide, None)
    extra = {"graphs": bool(fm.use_graphs), "row_tiles": row_tile_limits()}  # (a new tile rule measures anew)
    if fg.vocab_map is not None:  # a smaller lm_head costs less
        extra["draft_vocab"] = fg.draft_vocab_size
    key = tree_search.cost_cache_key("fast.glide", fm.device, fm.dtype, fm.config, fg.config, extra)
    return tree_search.cached_cost_model(key, lambda: measure_cost_model(fm, fg), cache=cache)


def resolve_tree_shape(target, glide, tree_shape: Sequence[int] | str | None = "auto", stats: AcceptanceStats | None = None,
                       cost: CostModel | None = None, cache: bool = True) -> tuple[int, ...]:
    """Same contract as :func:`specdec.ref.glide.resolve_tree_shape`, with this path's round costs: a shape
    is validated, None is :data:`DEFAULT_TREE_SHAPE`, ``"auto"`` the shape (at most 127 draft nodes) with
    the most expected tokens per second under ``stats`` (default: the draft's measured acceptance --
    ``Glide.acceptance``, or ``acceptance.json`` next to its checkpoint -- else the documented prior) and
    ``cost`` (default: :func:`device_cost_model`)."""
    return tree_search.choose_tree_shape(tree_shape, glide, _target_and_glide(target, glide, None)[1].draft_vocab_size, stats, cost,
                                         lambda: device_cost_model(target, glide, cache=cache))


def resolve_gamma(target, glide, gamma: int | str = "auto", stats: AcceptanceStats | None = None,
                  cost: CostModel | None = None, cache: bool = True) -> int:
    """Same contract as :func:`specdec.ref.glide.resolve_gamma`, with this path's round costs."""
    return tree_search.choose_gamma(gamma, glide, stats, cost, lambda: device_cost_model(target, glide, cache=cache))


def _target_and_glide(target, glide, auto: str | None) -> tuple:
    """``(fast target, fast GLIDE draft)`` for a call; on a tensor-parallel target the draft is this rank's
    slice of the layer (:func:`specdec.fast.glide.shard_glide`). ``auto``: the name of the argument set to
    ``"auto"``, if any -- refused under tensor parallelism, where every rank must run the same shape and a
    shape chosen from per-process timings could differ between ranks."""
    fm = as_fast_model(target)
    if fm.tp is not None and auto is not None:
        raise ValueError(f"{auto}='auto' is not supported on a tensor-parallel target ({fm.tp}): the ranks could "
                         f"choose different shapes from their own timings; pass an explicit {auto}")
    return fm, as_fast_glide(glide, tp=fm.tp)


def _drafter_per_row(fm, fg, shape: tuple[int, ...]) -> Callable[[], FastGlideDrafter]:
    """A factory the engine calls once per batch row: the k-th call drafts for row k (its own sliding cache
    and graphs on ``fg``; a batch of one uses row 0, the runtime every call shares)."""
    rows = itertools.count()
    return lambda: FastGlideDrafter(fm, fg, shape, row=next(rows))


def tree_spec_generate(
    target,
    glide,
    input_ids: torch.Tensor,
    prompt_length: int,
    tree_shape: Sequence[int] | str | None = (4, 16, 16, 16, 16),
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.tree_spec_generate` (at most 127 draft nodes on the fast path;
    ``"auto"``: :func:`resolve_tree_shape`, with this path's round costs; the result's ``tree_shape`` says
    which shape ran).

    ``sampling="keyed"``: the output is exactly vanilla keyed sampling's (keyed verification), and the beam
    is ranked by the draft's processed log-probs plus the same keyed noise as the reference's
    (:meth:`FastGlideDrafter._scores`, on the device: the key and positions travel in the round's pack, so
    the captured round graphs serve every seed) -- in fp32 the same trees and acceptance as the reference."""
    fm, fg = _target_and_glide(target, glide, "tree_shape" if tree_search.is_auto("tree_shape", tree_shape) else None)
    shape = resolve_tree_shape(target, glide, tree_shape)
    size = tree_shape_num_nodes(shape)
    check_drafts_fit(f"the number of draft nodes of tree_shape {list(shape)}", size - 1)
    drafter = _drafter_per_row(fm, fg, shape)
    res = run_speculative_fast(fm, drafter, input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                               generator, method="tree_spec_generate", tree_size=size, on_round=on_round,
                               sampling=sampling, seed=seed)
    res.tree_shape = shape
    return res


def spec_generate(
    target,
    glide,
    input_ids: torch.Tensor,
    prompt_length: int,
    gamma: int | str = 4,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.spec_generate` (``gamma`` <= 127 on the fast path; ``"auto"``:
    :func:`resolve_gamma`); keyed sampling as in :func:`tree_spec_generate` (each draft the draft's keyed
    choice, as on the reference)."""
    fm, fg = _target_and_glide(target, glide, "gamma" if tree_search.is_auto("gamma", gamma) else None)
    gamma = resolve_gamma(target, glide, gamma)
    check_drafts_fit("gamma", gamma)
    drafter = _drafter_per_row(fm, fg, (1,) * gamma)
    res = run_speculative_fast(fm, drafter, input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                               generator, method="spec_generate", tree_size=gamma + 1, on_round=on_round,
                               sampling=sampling, seed=seed)
    res.tree_shape = (1,) * gamma
    return res
