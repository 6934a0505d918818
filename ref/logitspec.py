"""LogitSpec: retrieval drafting plus "next next token" guesses from the last logit (Liu et al. 2025).

Prompt lookup (:mod:`specdec.ref.pld`) only helps when the context's suffix occurred before.
LogitSpec adds a second source: the target's logit that produced the root already ranks good
candidates for the token *after* the root (its runner-up tokens), and each such guess can be
used as a new retrieval key. One round, read top to bottom:

1. **Pool.** Learn the newly emitted tokens: every l-gram (l = 1..``max_ngram_size``) of prompt
   and output maps to the up to ``num_pred_tokens`` tokens after its latest occurrence
   (:class:`specdec.shared.ngram.NgramPool`).
2. **Branch 0.** The root is the token the target just emitted (its argmax, or its bonus /
   correction when sampling). Branch 0 is the continuation of the longest suffix of
   (context + root) found in the pool.
3. **Guess branches.** Rank the other tokens of the same last logit (``state.last_logits``, the
   logit that produced the root; the root itself is skipped). The guess ``g`` of rank ``k``
   (k = 1, 2, ...) becomes the branch ``[g] + continuation of (context + root + g)``, cut to
   4 tokens for k <= 8, 3 tokens for k <= 32, and 1 token beyond.
4. **Trie.** Branches are inserted in that order into a trie below the root (shared prefixes are
   merged, so no two siblings carry the same token) until ``draft_tree_capacity`` draft nodes
   are used (the root is not counted). Any ``num_pred_tokens`` works: the tree is built from
   the branches, not from a fixed table of mask shapes.
5. **Verify** (:func:`specdec.ref.engine.run_speculative`): one target pass over the tree.
   Greedy keeps the deepest path that matches the target's argmax; sampling uses the
   deterministic-candidate tree rule (children tried in insertion order, each accepted with
   the residual target probability of its token), so the output distribution is exact.
"""

from __future__ import annotations

import torch

from specdec.ref.engine import run_speculative
from specdec.ref.model import Model
from specdec.shared import tree_search
from specdec.shared.capacity import CALIBRATION_CAPACITIES, CapacityStats, choose_capacity
from specdec.shared.ngram import check_ngram_args
from specdec.shared.result import GenerationResult
from specdec.shared.retrieval import LogitSpecDrafter, guess_branch_length  # noqa: F401  (steps 1-4: host-side, shared by both paths)
from specdec.shared.tree_search import CostModel

__all__ = ["LogitSpecDrafter", "logitspec_generate", "guess_branch_length", "measure_capacity_cost", "device_capacity_cost",
           "resolve_capacity"]


# ---------------------------------------------------------------------------------------------
# "auto": the capacity for this device (specdec.shared.capacity)
# ---------------------------------------------------------------------------------------------


def measure_capacity_cost(target: Model, reps: int = 2, capacities=CALIBRATION_CAPACITIES, max_gen_len: int = 24,
                          prompt_length: int = 512) -> CostModel:
    """Time whole rounds of :func:`logitspec_generate` at each calibration capacity on the target's device
    (a random prompt of ``prompt_length`` tokens, greedy; every round verifies ``capacity + 1`` nodes) and
    fit the cost curve (:class:`~specdec.shared.tree_search.CostModel`, point ``(capacity + 1, seconds)``)."""
    c = target.config
    timer = tree_search.round_timer(
        lambda ids, p, tree_shape, on_round=None, **kw: logitspec_generate(target, ids, p, draft_tree_capacity=tree_shape[0], **kw),
        c.vocab_size, c.max_position_embeddings, max_gen_len=max_gen_len, prompt_length=prompt_length)
    timer((1,))  # warm-up (allocator, first-call overheads)
    meta = {"path": "ref", "method": "logitspec", "device": tree_search.device_description(target.device),
            "dtype": str(target.dtype), "reps": reps, "prompt_length": prompt_length}
    return tree_search.measure_cost_model(timer, [(k,) for k in capacities], reps=reps, meta=meta)


def device_capacity_cost(target: Model, cache: bool = True) -> CostModel:
    """:func:`measure_capacity_cost`, once per process and (``cache``) per device and model in
    ``$XDG_CACHE_HOME/specdec/cost_models.json``."""
    key = tree_search.cost_cache_key("ref.logitspec", target.device, target.dtype, target.config)
    return tree_search.cached_cost_model(key, lambda: measure_capacity_cost(target), cache=cache)


def resolve_capacity(target: Model, draft_tree_capacity: int | str = "auto", stats: CapacityStats | None = None,
                     cost: CostModel | None = None, cache: bool = True) -> int:
    """The capacity :func:`logitspec_generate` runs for ``draft_tree_capacity``: an int is checked (>= 1);
    ``"auto"`` is the capacity with the most expected tokens per second
    (:func:`specdec.shared.capacity.best_capacity`) under ``stats`` (default: the target's stored
    ``logitspec_acceptance.json``, else the embedded model's) and ``cost`` (default: :func:`device_capacity_cost`)."""
    return choose_capacity(draft_tree_capacity, target, stats, cost, lambda: device_capacity_cost(target, cache=cache))


def logitspec_generate(
    target: Model,
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
    """LogitSpec decoding of ``input_ids[:, :prompt_length]`` (a batch of prompts, :mod:`specdec.shared.batch`), greedy or sampling (lossless).

    Args:
        max_ngram_size: longest n-gram in the pool (>= 1).
        num_pred_tokens: longest continuation a pool entry gives (>= 1).
        draft_tree_capacity: draft nodes per round at most, root not counted (>= 1; the seed's 64 by
            default), or ``"auto"``: the capacity with the most expected tokens per second on this device
            (:func:`resolve_capacity`; the result's ``draft_tree_capacity`` says which ran).
        Others: as :func:`specdec.ref.vanilla.vanilla_generate`.
    """
    check_ngram_args(max_ngram_size, num_pred_tokens)
    draft_tree_capacity = resolve_capacity(target, draft_tree_capacity)
    # One drafter (its own n-gram pool) per row; every row's trie is padded to draft_tree_capacity + 1
    # nodes with masked dummy nodes, so each round verifies one fixed shape.
    res = run_speculative(target, lambda: LogitSpecDrafter(max_ngram_size, num_pred_tokens, draft_tree_capacity),
                           input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p, generator,
                           method="LogitSpec", first_target=first_target, sampling=sampling, seed=seed,
                           tree_size=draft_tree_capacity + 1)
    res.draft_tree_capacity = draft_tree_capacity
    return res
