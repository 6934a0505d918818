"""Fast MagicDec: the target drafts for itself over a compressed StreamingLLM cache.

Same algorithm as :mod:`specdec.ref.magicdec` (read that file for the steps); greedy output is
token-identical to it. On the fast path the compressed view is a second static cache of the
target (``sink_tokens + window + gamma`` rows, allocated once): each round ONE gather copies the
sink rows and the recent window of every layer into it, then ``gamma`` graph-replayed one-token
steps draft at the true positions ``L, L + 1, ...`` (keys keep their RoPE positions, so packing the
rows together changes nothing). Greedy drafts stay on the device; the full-cache verification is
:func:`specdec.fast.engine.run_speculative_fast`. Keyed sampling: each draft is the compressed
view's keyed choice at its position, as the reference.
"""

from __future__ import annotations

from typing import Callable

import torch

from specdec.fast.engine import FastDrafter, check_drafts_fit, run_speculative_fast
from specdec.fast.model import FastModel, as_fast_model, run_step
from specdec.shared.keyed import keyed_choice
from specdec.shared.result import GenerationResult
from specdec.shared.round import Draft, RoundRecord, RoundState
from specdec.shared.sampling import logits_to_probs, sample_from_probs
from specdec.shared.streaming import streaming_rows
from specdec.shared.tree import Tree
from specdec.shared.validate import check_positive_int

__all__ = ["magicdec_generate"]


class FastMagicDecDrafter(FastDrafter):
    def __init__(self, target: FastModel, gamma: int, sink_tokens: int, window: int):
        self.gamma, self.sink_tokens, self.window = gamma, sink_tokens, window
        self.target = target
        self.scratch = target.ensure_cache(1, sink_tokens + window + gamma + 1, name="magicdec")

    def propose(self, state: RoundState) -> Draft:
        fm, main, scratch, p = self.target, state.target_cache, self.scratch, state.params
        L, dev = main.length, fm.device
        gamma = min(self.gamma, state.max_drafts)
        # 1. The compressed view: sink rows + recent window of every layer, in one gather per K and V.
        rows = streaming_rows(L, self.sink_tokens, self.window, dev)
        s = rows.numel()
        scratch.k[:, :, :, :s] = main.k[:, :, :, rows]
        scratch.v[:, :, :, :s] = main.v[:, :, :, rows]
        scratch.set_length(s)
        # 2. Draft gamma tokens at their true positions.
        token = torch.tensor([[state.tokens[-1]]], dtype=torch.long, device=dev)
        one = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
        drafts, qs = [], []
        for i in range(gamma):
            pos = torch.full((1, 1), L + i, dtype=torch.long, device=dev)
            logits = run_step(fm, scratch, token, pos, one)[0, -1]
            scratch.set_length(scratch.length + 1)
            if p.greedy:
                token = torch.argmax(logits)[None, None]
            elif p.keyed:  # the compressed view's own keyed choice for position L + i + 1; no q
                pos = torch.tensor(L + i + 1, device=dev)
                token = keyed_choice(logits, p.temperature, p.top_k, p.top_p, p.seed, state.seq_id, pos).reshape(1, 1)
            else:
                q = logits_to_probs(logits, p.temperature, p.top_k, p.top_p)
                token = sample_from_probs(q, state.generator).reshape(1, 1).to(dev)
                qs.append(q)
            drafts.append(token[0])
        # 3. Nothing to roll back: the scratch cache is refilled next round.
        tokens = torch.cat([torch.tensor([state.tokens[-1]], dtype=torch.long, device=dev)] + drafts)
        q_all = torch.stack([torch.zeros_like(qs[0])] + qs) if qs else None
        return Draft(tokens, Tree.chain(gamma), q_all)


def magicdec_generate(
    target,
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
    """Same contract as :func:`specdec.ref.magicdec_generate` (``gamma`` <= 127 on the fast path)."""
    check_positive_int("gamma", gamma)
    check_positive_int("sink_tokens", sink_tokens, minimum=0)
    check_positive_int("window", window)
    check_drafts_fit("gamma", gamma)
    fm = as_fast_model(target)
    return run_speculative_fast(fm, lambda: FastMagicDecDrafter(fm, gamma, sink_tokens, window), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="magicdec_generate", tree_size=gamma + 1, on_round=on_round,
                                sampling=sampling, seed=seed)
