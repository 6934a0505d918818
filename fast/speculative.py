"""Fast draft-model speculative decoding: both models are :class:`FastModel`s with static caches;
every draft step (M = 1) and every verification (M = gamma + 1) is a CUDA-graph replay, and greedy
drafts stay on the device until the round's single synchronisation.

Same algorithm and arguments as :mod:`specdec.ref.speculative` (read that file for the steps);
must match :func:`specdec.ref.speculative.speculative_generate` token for token (greedy). Keyed
sampling: the draft proposes the keyed choice of its own logits at each draft position, as the reference.
"""

from __future__ import annotations

import itertools

import torch

from specdec.fast.engine import FastDrafter, check_drafts_fit, run_speculative_fast
from specdec.fast.model import MAX_TREE_NODES, FastModel, as_fast_model, prefill, run_step
from specdec.shared.batch import longest_prompt
from specdec.shared.keyed import keyed_choice
from specdec.shared.result import GenerationResult
from specdec.shared.round import Draft, RoundState
from specdec.shared.sampling import logits_to_probs, sample_from_probs
from specdec.shared.tree import Tree
from specdec.shared.validate import check_positive_int, check_same_vocab

__all__ = ["FastDraftModelDrafter", "speculative_generate"]


class FastDraftModelDrafter(FastDrafter):
    """Chain of ``gamma`` drafts from a fast draft model whose static cache is rolled back, not rebuilt."""

    def __init__(self, draft: FastModel, gamma: int, capacity: int, name: str = "draft") -> None:
        self.model = draft
        self.gamma = gamma
        self.cache = draft.ensure_cache(1, capacity, name=name)   # one cache per drafter (per batch row)
        self.cached: list[int] = []  # tokens whose KV is in the draft cache
        self.pending: torch.Tensor | None = None  # drafts fed last round, still on the device

    def _feed(self, new: list[int]) -> torch.Tensor:
        """Append ``new`` tokens to the draft cache; logits [V] after the last one."""
        dev = self.model.device
        cache = self.cache
        if cache.length == 0 or len(new) > MAX_TREE_NODES:
            return prefill(self.model, cache, torch.tensor([new], dtype=torch.long, device=dev))[0]
        n = len(new)
        pos = torch.arange(cache.length, cache.length + n, device=dev)[None]
        mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril_()[None]
        logits = run_step(self.model, cache, torch.tensor([new], dtype=torch.long, device=dev), pos, mask)
        cache.set_length(cache.length + n)
        return logits[0, -1]

    def propose(self, state: RoundState) -> Draft:
        p = state.params
        gamma = min(self.gamma, state.max_drafts)
        # 1. Catch up: roll back to the longest still-right prefix (re-feeding at least the root).
        if self.pending is not None:
            self.cached += self.pending.tolist()
            self.pending = None
        keep = 0
        for seen, real in zip(self.cached, state.tokens):
            if seen != real:
                break
            keep += 1
        keep = min(keep, len(state.tokens) - 1)
        self.cache.set_length(keep)
        logits = self._feed(state.tokens[keep:])
        self.cached = list(state.tokens)
        # 2. Draft gamma tokens; greedy drafts never leave the device.
        dev = self.model.device
        drafts, qs = [], []
        root_pos = len(state.tokens) - 1  # the root's absolute position L
        for i in range(gamma):
            if p.greedy:
                x = torch.argmax(logits, dim=-1, keepdim=True)
            elif p.keyed:  # the draft's own keyed choice at position L + 1 + i; no q
                pos = torch.tensor(root_pos + 1 + i, device=dev)
                x = keyed_choice(logits, p.temperature, p.top_k, p.top_p, p.seed, state.seq_id, pos).reshape(1)
            else:
                q = logits_to_probs(logits, p.temperature, p.top_k, p.top_p)
                x = sample_from_probs(q, state.generator).reshape(1).to(dev)
                qs.append(q)
            drafts.append(x)
            if i + 1 < gamma:
                pos = torch.full((1, 1), self.cache.length, dtype=torch.long, device=dev)
                logits = run_step(self.model, self.cache, x[None], pos, torch.ones(1, 1, 1, dtype=torch.bool, device=dev))[0, -1]
                self.cache.set_length(self.cache.length + 1)
        root = torch.tensor([state.tokens[-1]], dtype=torch.long, device=dev)
        tokens = torch.cat([root] + drafts)
        # drafts 1..gamma-1 were fed to the cache; the host learns their values next round (after the
        # engine's synchronisation, so reading them then costs no extra wait)
        self.pending = tokens[1:-1]
        q_all = None
        if qs:
            q_all = torch.stack([torch.zeros_like(qs[0])] + qs)
        return Draft(tokens=tokens, tree=Tree.chain(len(drafts)), q=q_all)


def speculative_generate(
    target,
    draft_model,
    input_ids: torch.Tensor,
    prompt_length: int,
    gamma: int = 5,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    first_target: bool = True,
    skip_sample_adjustment: bool = False,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.speculative_generate` (``gamma`` <= 127 on the fast path)."""
    tm, dm = as_fast_model(target), as_fast_model(draft_model)
    check_same_vocab(tm.config, dm.config)
    check_positive_int("gamma", gamma)
    check_drafts_fit("gamma", gamma)
    capacity = longest_prompt(input_ids) + max_gen_len + gamma + 2
    rows = itertools.count()

    def drafter():   # one per batch row, each with its own draft cache ("draft", "draft1", ...)
        i = next(rows)
        return FastDraftModelDrafter(dm, gamma, capacity, name="draft" if i == 0 else f"draft{i}")

    return run_speculative_fast(
        tm, drafter, input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p, generator,
        method="speculative decoding", tree_size=gamma + 1, first_target=first_target,
        skip_sample_adjustment=skip_sample_adjustment, sampling=sampling, seed=seed,
    )
