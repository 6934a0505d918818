"""Fast LogitSpec: the reference drafter (n-gram pool + next-next-token guesses, branches merged
into a trie; host-side, :mod:`specdec.shared.ngram`) with the fast verification engine. Every
round's tree is padded to ``draft_tree_capacity + 1`` nodes with masked dummy nodes, so one CUDA
graph serves all rounds whatever the tree looks like.

Must match :func:`specdec.ref.logitspec.logitspec_generate` token for token (greedy)."""

from __future__ import annotations

import torch

from specdec.fast.engine import MAX_TREE_NODES, check_drafts_fit, run_speculative_fast
from specdec.fast.model import as_fast_model
from specdec.shared import tree_search
from specdec.shared.capacity import CALIBRATION_CAPACITIES, CapacityStats, choose_capacity
from specdec.shared.ngram import check_ngram_args
from specdec.shared.result import GenerationResult
from specdec.shared.retrieval import LogitSpecDrafter
from specdec.shared.tree_search import CostModel

__all__ = ["logitspec_generate", "measure_capacity_cost", "device_capacity_cost", "resolve_capacity"]

CPU_CALIBRATION_CAPACITIES = (1, 16, 64)
"""Without CUDA the kernels run in the Triton interpreter (about a second per round): a reduced calibration."""


def measure_capacity_cost(target, reps: int | None = None, capacities=None, max_gen_len: int | None = None,
                          prompt_length: int = 512) -> CostModel:
    """Time whole rounds of this path's :func:`logitspec_generate` at each calibration capacity on the target's
    device (a random prompt of ``prompt_length`` tokens, greedy, one untimed call per capacity first: CUDA graphs
    and kernels are built there) and fit the cost curve, point ``(capacity + 1, seconds)``; the same contract
    as :func:`specdec.ref.logitspec.measure_capacity_cost`."""
    fm = as_fast_model(target)
    c, cpu = fm.config, fm.device.type == "cpu"
    capacities = capacities or (CPU_CALIBRATION_CAPACITIES if cpu else CALIBRATION_CAPACITIES)
    reps = reps or (1 if cpu else 3)
    gen = max_gen_len or (6 if cpu else 32)
    timer = tree_search.round_timer(
        lambda ids, p, tree_shape, on_round=None, **kw: logitspec_generate(fm, ids, p, draft_tree_capacity=tree_shape[0], **kw),
        c.vocab_size, c.max_position_embeddings, max_gen_len=gen, prompt_length=prompt_length)
    meta = {"path": "fast", "method": "logitspec", "device": tree_search.device_description(fm.device), "dtype": str(fm.dtype),
            "reps": reps, "graphs": bool(fm.use_graphs), "prompt_length": prompt_length}
    return tree_search.measure_cost_model(timer, [(k,) for k in capacities], reps=reps, warmup=0 if cpu else 1, meta=meta)


def device_capacity_cost(target, cache: bool = True) -> CostModel:
    """:func:`measure_capacity_cost`, once per process and (``cache``) per device and model in
    ``$XDG_CACHE_HOME/specdec/cost_models.json``."""
    fm = as_fast_model(target)
    key = tree_search.cost_cache_key("fast.logitspec", fm.device, fm.dtype, fm.config, {"graphs": bool(fm.use_graphs)})
    return tree_search.cached_cost_model(key, lambda: measure_capacity_cost(fm), cache=cache)


def resolve_capacity(target, draft_tree_capacity: int | str = "auto", stats: CapacityStats | None = None,
                     cost: CostModel | None = None, cache: bool = True) -> int:
    """Same contract as :func:`specdec.ref.logitspec.resolve_capacity`, with this path's round costs
    (:func:`device_capacity_cost`) and at most 127 drafts. ``"auto"`` is refused on a tensor-parallel target:
    every rank must verify the same tree size, and sizes chosen from per-process timings could differ."""
    if tree_search.is_auto("draft_tree_capacity", draft_tree_capacity) and getattr(target, "tp", None) is not None:
        raise ValueError(f"draft_tree_capacity='auto' is not supported on a tensor-parallel target ({target.tp}): the ranks "
                         f"could choose different capacities from their own timings; pass an explicit draft_tree_capacity")
    return choose_capacity(draft_tree_capacity, target, stats, cost, lambda: device_capacity_cost(target, cache=cache),
                           max_capacity=MAX_TREE_NODES - 1)


def logitspec_generate(
    target,
    input_ids: torch.Tensor,
    prompt_length: int,
    max_ngram_size: int = 3,
    num_pred_tokens: int = 20,
    draft_tree_capacity: int | str = 64,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    first_target: bool = True,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.logitspec_generate`; ``draft_tree_capacity`` <= 127 here (``"auto"``:
    :func:`resolve_capacity` with this path's costs)."""
    check_ngram_args(max_ngram_size, num_pred_tokens)
    fm = as_fast_model(target)
    draft_tree_capacity = resolve_capacity(fm, draft_tree_capacity)
    check_drafts_fit("draft_tree_capacity", draft_tree_capacity)
    res = run_speculative_fast(fm, lambda: LogitSpecDrafter(max_ngram_size, num_pred_tokens, draft_tree_capacity), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="LogitSpec", tree_size=draft_tree_capacity + 1, first_target=first_target,
                                sampling=sampling, seed=seed)
    res.draft_tree_capacity = draft_tree_capacity
    return res
