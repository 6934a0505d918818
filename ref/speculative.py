"""Speculative decoding with a separate draft model (Leviathan et al. 2023; Chen et al. 2023).

A small LM with the *same vocabulary* as the target guesses ``gamma`` tokens one at a time; the
target checks all of them in one forward pass and keeps the longest acceptable prefix plus one
token of its own. At temperature 0 the output is exactly greedy decoding of the target; when
sampling, it has exactly the target's sampling distribution (lossless).

One round, read top to bottom:

1. **Catch up.** The draft model keeps its own KV cache. It holds the KV of some prefix of the
   sequence; tokens it has not seen (the target's correction or bonus token, and anything after a
   rejected draft) are fed now, after rolling the cache back to the longest prefix that is still
   right. The last fed token is the root: its logits give the first draft distribution.
2. **Draft.** ``gamma`` times: process the draft logits exactly like the target's (temperature,
   top-k, top-p) into ``q``, pick ``x ~ q`` (greedy: the argmax), feed ``x`` to get the next ``q``.
   The chain ``[root, x_1, ..., x_gamma]`` and every ``q`` go to the engine.
3. **Verify and accept** (:func:`specdec.ref.engine.run_speculative`): the target scores the chain
   in one pass; greedy keeps drafts while they equal the target's argmax; sampling accepts
   ``x_i`` with probability ``min(1, p(x_i) / q(x_i))`` and on the first rejection draws from
   ``norm(max(p - q, 0))``; if all drafts pass, a bonus token comes from ``p``.

``sampling="keyed"`` (temperature > 0): step 2 proposes the keyed choice of the DRAFT's logits at
each draft position (keyed by the row's sequence id) (:func:`specdec.shared.keyed.keyed_choice`, the same noise the target's row for
that position gets), no ``q``; step 3 accepts a draft iff it is the target's keyed choice there
(:func:`specdec.shared.round.accept_draft`). The output is exactly vanilla keyed sampling's.

**The draft's window** (``draft_window=W``; default None = the whole prompt). On a long prompt the draft
model's own prefill of every prompt token can cost as much as its drafts save. With a window, step 0 feeds
the draft only the last ``W`` tokens before the root, as a fresh context at draft positions ``0..W-1`` (a
draft cache row index IS its position), and remembers ``offset = max(0, len(before_root) - W)``, the
tokens it never reads. Step 1's rollback then keeps ``keep - offset`` cache rows (``keep`` = the longest
common prefix, as without a window). The window does not slide: every token after the prompt is fed, so
the draft needs at most ``W + max_gen_len + gamma`` positions. Only the drafts change (they come from less
context); verification does not, so the output is unchanged (greedy: exactly vanilla's). Keyed sampling's
keys stay on the ABSOLUTE positions of the sequence. ``W >= len(before_root)`` is the whole prompt.

A batch (docs/design.md §11): every row has its own drafter and draft-model cache (a per-row loop
for steps 1-2); the target verifies all rows' chains in one pass and each row accepts its own
number of drafts (:func:`specdec.ref.engine.run_speculative`).

``skip_sample_adjustment=True`` draws a rejected position from ``p`` instead of the residual
``norm(max(p - q, 0))``, as the romsto seed allows. **This is LOSSY**: tokens the draft likes
too much get extra probability. It exists only to compare against the correct rule.
"""

from __future__ import annotations

import torch
from einops import rearrange

from specdec.ref.engine import run_speculative
from specdec.ref.model import Model, forward_step, new_cache
from specdec.shared.keyed import keyed_choice
from specdec.shared.result import GenerationResult
from specdec.shared.round import Draft, RoundState
from specdec.shared.sampling import logits_to_probs, sample_from_probs
from specdec.shared.tree import Tree
from specdec.shared.validate import check_draft_window, check_positive_int, check_same_vocab

__all__ = ["DraftModelDrafter", "speculative_generate"]


class DraftModelDrafter:
    """Proposes a chain of ``gamma`` tokens sampled from a draft model, with its own rolled-back KV cache.

    ``draft_window``: None (the draft reads the whole prompt) or ``W >= 1``: it reads only the last ``W``
    tokens before the first root (see the module docstring)."""

    def __init__(self, draft_model: Model, gamma: int, draft_window: int | None = None) -> None:
        self.model = draft_model
        self.gamma = gamma
        self.window = draft_window
        self.cache = new_cache(draft_model, 1)
        # The tokens the drafter has accounted for, in order (absolute: cached[j] is the sequence's token j).
        # The first `offset` of them lie before the draft's window and were never fed; cache row i holds the
        # KV of cached[offset + i], computed at draft position i.
        self.cached: list[int] = []
        self.offset = 0

    def _catch_up(self, tokens: list[int]) -> torch.Tensor:
        """Step 1: roll the draft cache back to what is still right and feed the rest; logits after tokens[-1]."""
        # Longest common prefix of what the cache saw and the real sequence ...
        keep = 0
        for seen, real in zip(self.cached, tokens):
            if seen != real:
                break
            keep += 1
        # ... but always re-feed at least the root: we need the logits after it.
        keep = min(keep, len(tokens) - 1)
        # Roll back: the first `keep` tokens stay, i.e. the cache rows of tokens offset..keep-1. (keep >= offset:
        # the prompt before the window never changes.)
        self.cache.truncate(keep - self.offset)
        new = torch.tensor(tokens[keep:], dtype=torch.long, device=self.model.device)
        # (The draft model only proposes; verification decides. So its passes -- this catch-up, the whole
        # prompt at first, and the draft steps below -- may take the fused attention kernel. Their positions
        # default to the cache length: the draft positions, counted from the window's start.)
        logits = forward_step(self.model, rearrange(new, "t -> 1 t"), self.cache, fused_attention=True)
        self.cached = list(tokens)
        return logits[0, -1]

    def prefill(self, state: RoundState) -> None:
        """Step 0, timed with the target's prefill: the draft model reads the tokens before the root -- all
        of them, or with a window ``W`` only the last ``W``, at draft positions ``0..W-1`` (a fresh context).

        The first round's catch-up then feeds the root alone."""
        before_root = state.tokens[:-1]
        # The window's offset: the tokens before the window count as seen, without being read ...
        self.offset = 0 if self.window is None else max(0, len(before_root) - self.window)
        self.cached = before_root[: self.offset]
        # ... so Step 1's catch-up on the tokens before the root keeps those `offset` tokens (no cache rows)
        # and feeds the rest -- the window -- onto the empty cache, at draft positions 0, 1, ...
        if before_root:
            self._catch_up(before_root)

    def propose(self, state: RoundState) -> Draft:
        p = state.params
        # Never draft more than can still be emitted (the round adds one token of its own).
        gamma = min(self.gamma, state.max_drafts)
        logits = self._catch_up(state.tokens)
        drafts: list[int] = []
        qs: list[torch.Tensor] = []
        root_pos = len(state.tokens) - 1  # the root's absolute position L
        # Step 2: draft gamma tokens, each from the processed draft distribution q.
        for i in range(gamma):
            if p.keyed:  # the draft's own keyed choice at position L + 1 + i; no q needed
                pos = torch.tensor(root_pos + 1 + i, device=logits.device)
                x = int(keyed_choice(logits, p.temperature, p.top_k, p.top_p, p.seed, state.seq_id, pos))
                drafts.append(x)
            else:
                q = logits_to_probs(logits, p.temperature, p.top_k, p.top_p)  # greedy: one-hot argmax
                x = int(torch.argmax(q)) if p.greedy else int(sample_from_probs(q, state.generator))
                drafts.append(x)
                qs.append(q)
            if i + 1 < gamma:  # the last draft's logits are never needed
                step = torch.tensor([[x]], dtype=torch.long, device=self.model.device)
                logits = forward_step(self.model, step, self.cache, fused_attention=True)[0, -1]
                self.cached.append(x)
        # The root's row of q is never used (the root is not a draft); keep it zero.
        vocab = self.model.config.vocab_size
        q_all = None if p.keyed else torch.stack([torch.zeros(vocab, device=self.model.device)] + qs)
        tokens = torch.tensor([state.tokens[-1]] + drafts, dtype=torch.long)
        return Draft(tokens=tokens, tree=Tree.chain(len(drafts)), q=q_all)


def speculative_generate(
    target: Model,
    draft_model: Model,
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
    draft_window: int | None = None,
) -> GenerationResult:
    """Speculative decoding of a batch of prompts with a draft model.

    Args:
        input_ids, prompt_length: the prompts, [B, T] right-padded with one length or B lengths, or
            a list of prompts (:mod:`specdec.shared.batch`); row b is keyed sampling's sequence b.
        target: the model whose output we want.
        draft_model: a smaller model with the same vocabulary (checked).
        gamma: drafts per round (>= 1).
        max_gen_len: new tokens to generate at most.
        eos_id: None (the target's EOS ids), an int, or a list of ints ([] = never stop).
        temperature, top_k, top_p: sampling rule for target AND draft (temperature 0 = greedy).
        generator: torch.Generator for every random draw (drafts, acceptance, corrections).
        first_target: the target picks the first token from the prompt before drafting starts
            (default); otherwise the first round drafts right after the prompt.
        skip_sample_adjustment: LOSSY, see the module docstring. Default False (no effect when keyed).
        sampling: ``"rejection"`` (default) or ``"keyed"``: position-keyed sampling, the output equals
            :func:`specdec.ref.vanilla_generate` with the same ``sampling="keyed"`` and ``seed``.
        seed: the key of keyed sampling (None: the generator's initial seed, else torch's global RNG).
        draft_window: None (default: the draft model reads the whole prompt) or an int ``W >= 1``: it reads
            only the last ``W`` tokens before the first root, at draft positions ``0..W-1``, then every
            token after them (each batch row its own window). The output does not change (greedy: exactly
            vanilla's); the drafts may. The draft then needs ``W + max_gen_len + gamma`` positions at most.

    Returns:
        :class:`~specdec.shared.result.GenerationResult` (``output_ids, count, num, elapsed_time, spec_mask``).
    """
    check_same_vocab(target.config, draft_model.config)
    check_positive_int("gamma", gamma)
    check_draft_window(draft_window)
    # One drafter (with its own draft-model cache and window offset) per row of the batch.
    return run_speculative(
        target, lambda: DraftModelDrafter(draft_model, gamma, draft_window), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p, generator,
        method="speculative decoding", first_target=first_target, skip_sample_adjustment=skip_sample_adjustment,
        sampling=sampling, seed=seed,
    )
