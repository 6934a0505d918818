"""Prompt lookup decoding (PLD): draft by copying from the text itself, no draft model.

Long outputs often repeat their input (code edits, summaries, quotes). One round:

1. **Look up.** Take the longest suffix of the context (``max_ngram_size`` tokens down to 1) that
   occurred earlier; the draft is the chain of up to ``num_pred_tokens`` tokens that followed its
   most recent earlier occurrence (:class:`specdec.shared.ngram.NgramPool`, the same pool
   LogitSpec uses). No match: the draft is just the root and the round is a plain decoding step.
2. **Verify** (:func:`specdec.ref.engine.run_speculative`): the target scores the chain in one
   pass. Greedy keeps the drafts that equal its argmax; when sampling, the drafts are
   deterministic candidates and each is accepted with the target's (residual) probability of
   that token, which keeps the output distribution exact.
3. **Remember.** The pool learns the newly emitted tokens before the next round.
"""

from __future__ import annotations

import torch

from specdec.ref.engine import run_speculative
from specdec.ref.model import Model
from specdec.shared.ngram import check_ngram_args
from specdec.shared.result import GenerationResult
from specdec.shared.retrieval import PromptLookupDrafter  # steps 1 and 3: host-side, the same drafter on both paths

__all__ = ["PromptLookupDrafter", "pld_generate"]


def pld_generate(
    target: Model,
    input_ids: torch.Tensor,
    prompt_length: int,
    max_ngram_size: int = 3,
    num_pred_tokens: int = 10,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Prompt lookup decoding of a batch of prompts (:mod:`specdec.shared.batch`; each row looks up
    its own text).

    ``max_ngram_size`` (>= 1): longest suffix looked up; ``num_pred_tokens`` (>= 1): drafts per round
    at most. Other arguments as :func:`specdec.ref.vanilla.vanilla_generate`; greedy output is
    identical to it, sampling has the same distribution.
    """
    check_ngram_args(max_ngram_size, num_pred_tokens)
    # One drafter (its own n-gram pool) per row; a round verifies the rows' chains padded only to the
    # round's longest (a round whose lookups all miss verifies the roots alone). The fast path pads every
    # round to num_pred_tokens + 1 for its fixed-shape CUDA graphs; the tokens are the same.
    return run_speculative(target, lambda: PromptLookupDrafter(max_ngram_size, num_pred_tokens), input_ids, prompt_length,
                           max_gen_len, eos_id, temperature, top_k, top_p, generator, method="prompt lookup decoding",
                           sampling=sampling, seed=seed)
