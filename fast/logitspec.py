"""Fast LogitSpec: the reference drafter (n-gram pool + next-next-token guesses, branches merged
into a trie; host-side, :mod:`specdec.shared.ngram`) with the fast verification engine. Every
round's tree is padded to ``draft_tree_capacity + 1`` nodes with masked dummy nodes, so one CUDA
graph serves all rounds whatever the tree looks like.

Must match :func:`specdec.ref.logitspec.logitspec_generate` token for token (greedy)."""

from __future__ import annotations

import torch

from specdec.fast.engine import check_drafts_fit, run_speculative_fast
from specdec.fast.model import as_fast_model
from specdec.shared.ngram import check_ngram_args
from specdec.shared.result import GenerationResult
from specdec.shared.retrieval import LogitSpecDrafter
from specdec.shared.validate import check_positive_int

__all__ = ["logitspec_generate"]


def logitspec_generate(
    target,
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
    """Same contract as :func:`specdec.ref.logitspec_generate`; ``draft_tree_capacity`` <= 127 here."""
    check_ngram_args(max_ngram_size, num_pred_tokens)
    check_positive_int("draft_tree_capacity", draft_tree_capacity)
    check_drafts_fit("draft_tree_capacity", draft_tree_capacity)
    fm = as_fast_model(target)
    return run_speculative_fast(fm, lambda: LogitSpecDrafter(max_ngram_size, num_pred_tokens, draft_tree_capacity), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="LogitSpec", tree_size=draft_tree_capacity + 1, first_target=first_target,
                                sampling=sampling, seed=seed)
