"""MagicDec: self-speculation over a StreamingLLM cache (the target drafts for itself).

Long contexts make decoding memory-bound on the KV cache. MagicDec lets the *target itself* draft
while reading only a small, fixed part of its cache -- the first ``sink_tokens`` positions
("attention sinks") and the last ``window`` positions of the verified sequence -- and then verifies
the drafts with the full cache. The drafts are only as good as the compressed view, but verification
keeps the output exactly the target's.

One round, step by step (L = verified cache length, the root sits at position L):

1. Build a *scratch* cache holding, in every layer, only the rows of the compressed view: positions
   ``[0, sink_tokens)`` and ``[L - window, L)`` (true positions are kept: the cache stores keys after
   RoPE, so a row keeps its position however the rows are packed).
2. Draft ``gamma`` tokens: feed the root at position L, then each draft at the next position,
   through the full target over the scratch cache (the draft's own tokens are appended to the
   scratch cache, so each sees the sinks, the window and the earlier drafts). Greedy: the argmax.
   Sampling: draw from the processed distribution ``q`` of the compressed view and keep ``q``.
3. Throw the scratch cache away (nothing to roll back in the real cache).
4. The engine verifies root + drafts with the FULL cache in one pass; greedy match, or
   Leviathan/Chen rejection sampling with ``q`` (lossless), then compacts the KV of every layer.

``sampling="keyed"`` (temperature > 0): step 2 proposes the keyed choice of the compressed view's
logits at each draft position (no ``q``) and step 4 accepts a draft iff it is the full target's keyed
choice there, so the output is exactly vanilla keyed sampling's.

If ``sink_tokens + window >= L`` the compressed view is the whole cache, the draft equals the
target and every draft is accepted (up to float round-off between one-token and many-token passes).

A batch (docs/design.md §11): each row drafts over its OWN compressed view (its sinks and the last
``window`` rows of its own length), one row at a time; the target verifies all rows at once.

Defaults: ``gamma=4``, ``sink_tokens=4`` (StreamingLLM's 4 sinks), ``window=256`` recent positions --
a 260-row budget, small next to the long contexts MagicDec targets, large enough that short
prompts draft almost perfectly.
"""

from __future__ import annotations

from typing import Callable

import torch

from specdec.ref.engine import run_speculative
from specdec.ref.model import KVCache, Model, forward_step
from specdec.shared.keyed import keyed_choice
from specdec.shared.result import GenerationResult
from specdec.shared.round import Draft, RoundRecord, RoundState
from specdec.shared.sampling import logits_to_probs, sample_from_probs
from specdec.shared.streaming import streaming_rows  # step 1's rows: sinks + recent window
from specdec.shared.tree import Tree
from specdec.shared.validate import check_positive_int

__all__ = ["MagicDecDrafter", "streaming_rows", "magicdec_generate"]


class MagicDecDrafter:
    """The target drafting ``gamma`` tokens over its own compressed (sinks + window) cache."""

    def __init__(self, gamma: int, sink_tokens: int, window: int):
        self.gamma = check_positive_int("gamma", gamma)
        self.sink_tokens = check_positive_int("sink_tokens", sink_tokens, minimum=0)
        self.window = check_positive_int("window", window)

    def propose(self, state: RoundState) -> Draft:
        target, cache, p = state.target, state.target_cache, state.params
        L, dev = cache.length, target.device
        gamma = min(self.gamma, state.max_drafts)  # no drafts past what may still be emitted

        # 1. Scratch cache: the sink rows and the recent window of every layer (positions kept).
        rows = streaming_rows(L, self.sink_tokens, self.window, dev)
        scratch = KVCache(k=[k.index_select(2, rows) for k in cache.k], v=[v.index_select(2, rows) for v in cache.v])

        # 2. Draft gamma tokens one by one at their true positions L, L + 1, ... (draft passes: only
        #    proposals, so they may take the fused attention)
        tokens = [state.tokens[-1]]
        qs = [torch.zeros(target.config.vocab_size, device=dev)]  # q of the root: unused
        for i in range(gamma):
            logits = forward_step(target, torch.tensor([[tokens[-1]]], device=dev), scratch, positions=torch.tensor([L + i], device=dev),
                                  fused_attention=True)[0, -1]
            if p.greedy:
                tokens.append(int(torch.argmax(logits)))
            elif p.keyed:  # the compressed view's own keyed choice for position L + i + 1
                pos = torch.tensor(L + i + 1, device=dev)
                tokens.append(int(keyed_choice(logits, p.temperature, p.top_k, p.top_p, p.seed, state.seq_id, pos)))
            else:
                q = logits_to_probs(logits, p.temperature, p.top_k, p.top_p)
                tokens.append(int(sample_from_probs(q, state.generator)))
                qs.append(q)

        # 3. The scratch cache is dropped here; the engine verifies with the full cache.
        q = torch.stack(qs) if not p.greedy and not p.keyed and gamma > 0 else None
        return Draft(torch.tensor(tokens, dtype=torch.long), Tree.chain(gamma), q)


def magicdec_generate(
    target: Model,
    input_ids: torch.Tensor,
    prompt_length: int,
    gamma: int = 4,
    sink_tokens: int = 4,
    window: int = 256,
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
    """MagicDec self-speculative decoding (Llama and Qwen2 targets; see the module docstring).

    Greedy output equals :func:`specdec.ref.vanilla_generate`; sampling is lossless (chain rejection
    sampling with the compressed view's processed distribution ``q``). ``sampling="keyed"`` with a
    ``seed``: exactly :func:`specdec.ref.vanilla_generate`'s keyed tokens for that seed.
    """
    MagicDecDrafter(gamma, sink_tokens, window)  # check the arguments before anything runs
    # One drafter per row: each reads its own row's cache (sinks + window of that row's length).
    return run_speculative(target, lambda: MagicDecDrafter(gamma, sink_tokens, window), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                           generator, method="magicdec_generate", on_round=on_round, sampling=sampling, seed=seed)
