"""Fast prompt lookup decoding: the reference's n-gram drafter (host-side, pure Python, shared
pool in :mod:`specdec.shared.ngram`) with the fast verification engine. The chain is padded to
``num_pred_tokens + 1`` nodes so one CUDA graph serves every round.

Must match :func:`specdec.ref.pld.pld_generate` token for token (greedy)."""

from __future__ import annotations

import torch

from specdec.fast.engine import HostDrafter, check_drafts_fit, run_speculative_fast
from specdec.fast.model import as_fast_model
from specdec.shared.ngram import check_ngram_args
from specdec.shared.result import GenerationResult
from specdec.shared.retrieval import PromptLookupDrafter

__all__ = ["pld_generate"]


def pld_generate(
    target,
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
    """Same contract as :func:`specdec.ref.pld_generate`; ``num_pred_tokens`` <= 127 here."""
    check_ngram_args(max_ngram_size, num_pred_tokens)
    check_drafts_fit("num_pred_tokens", num_pred_tokens)
    fm = as_fast_model(target)
    return run_speculative_fast(fm, lambda: HostDrafter(PromptLookupDrafter(max_ngram_size, num_pred_tokens), reads_last_logits=False), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="prompt lookup decoding", tree_size=num_pred_tokens + 1,
                                sampling=sampling, seed=seed)
