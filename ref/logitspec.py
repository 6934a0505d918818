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
from specdec.shared.ngram import check_ngram_args
from specdec.shared.result import GenerationResult
from specdec.shared.retrieval import LogitSpecDrafter, guess_branch_length  # noqa: F401  (steps 1-4: host-side, shared by both paths)
from specdec.shared.validate import check_positive_int

__all__ = ["LogitSpecDrafter", "logitspec_generate", "guess_branch_length"]


def logitspec_generate(
    target: Model,
    input_ids: torch.Tensor,
    prompt_length: int,
    max_ngram_size: int = 3,
    num_pred_tokens: int = 20,
    draft_tree_capacity: int = 64,
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
        draft_tree_capacity: draft nodes per round at most, root not counted (>= 1).
        Others: as :func:`specdec.ref.vanilla.vanilla_generate`.
    """
    check_ngram_args(max_ngram_size, num_pred_tokens)
    check_positive_int("draft_tree_capacity", draft_tree_capacity)
    # One drafter (its own n-gram pool) per row; every row's trie is padded to draft_tree_capacity + 1
    # nodes with masked dummy nodes, so each round verifies one fixed shape.
    return run_speculative(target, lambda: LogitSpecDrafter(max_ngram_size, num_pred_tokens, draft_tree_capacity),
                           input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p, generator,
                           method="LogitSpec", first_target=first_target, sampling=sampling, seed=seed,
                           tree_size=draft_tree_capacity + 1)
