"""The speculative round's vocabulary, shared by both paths (docs/design.md §5).

Every speculative decoder is a *drafter* plugged into one loop per path
(:func:`specdec.ref.engine.run_speculative`, :func:`specdec.fast.engine.run_speculative_fast`).
This module holds what those loops and their drafters exchange, and nothing that computes a
forward pass:

* :class:`Draft` -- the proposed token tree (node 0 is the root, the last emitted token);
* :class:`RoundState` -- what a drafter may look at when proposing, including the draft budget
  (:attr:`RoundState.max_drafts`, the one place the "no drafts past what may still be emitted"
  rule lives);
* :class:`Drafter` -- the protocol every drafter implements (``propose``);
* :class:`RoundRecord` -- what one round did (notebooks, tests, the bench's histograms);
* :func:`accept_draft` -- step 3 of a round on the host: pick the acceptance rule of
  :mod:`specdec.shared.acceptance` that fits the sampling parameters and the draft (keyed
  sampling: the greedy rule on the keyed-perturbed target logits).

``RoundState.target`` and ``RoundState.target_cache`` are whatever model and cache the path
uses (the reference's ``Model`` and ``KVCache``, the fast path's ``FastModel`` and
``StaticKVCache``); a drafter written for one path only reads the fields that path gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from specdec.shared.acceptance import chain_rejection_accept, greedy_accept, tree_sampling_accept
from specdec.shared.keyed import perturbed_logits
from specdec.shared.sampling import SamplingParams, logits_to_probs
from specdec.shared.tree import Tree

__all__ = ["Draft", "RoundState", "Drafter", "RoundRecord", "accept_draft", "max_drafts"]


def max_drafts(budget: int) -> int:
    """How many draft tokens deep a round may go when ``budget`` tokens may still be emitted: one token
    of the budget is always the target's own (bonus or correction), so a draft deeper than
    ``budget - 1`` could never be emitted. Never negative. The one place this rule lives
    (:attr:`RoundState.max_drafts`; the fast GLIDE drafter's device-driven rounds call it too)."""
    return max(budget - 1, 0)


@dataclass
class Draft:
    """A proposed token tree.

    Attributes:
        tokens: [M] long, node tokens; ``tokens[0]`` is the root (the last emitted token).
        tree: topology of the M nodes (parents first). A host :class:`~specdec.shared.tree.Tree`
            on both paths; the fast path also accepts a device-side tree (its ``DeviceTree``,
            declared by :class:`specdec.fast.engine.FastDrafter`).
        q: optional [M, V] draft probabilities: ``q[j]`` is the distribution node ``j``'s token was
           sampled from (chains drafted by a separate model). Without ``q`` the candidates are
           deterministic and the tree rule is used when sampling.
    """

    tokens: torch.Tensor
    tree: Any
    q: torch.Tensor | None = None


@dataclass
class RoundState:
    """Everything a drafter may look at when proposing.

    ``tokens`` is the whole sequence so far (prompt + emitted); ``tokens[-1]`` is the root.
    ``target_cache`` holds the verified prefix ``tokens[:-1]`` (length L = len(tokens) - 1).
    ``last_logits`` [V] are the target logits that produced the root (LogitSpec reads guesses
    for the token after the root from them). ``budget`` is how many tokens may still be emitted.
    ``seq_id`` is the row's sequence id for keyed sampling (row b of a batch: b, unless the engine
    was given ``seq_ids``); a drafter that draws keyed noise keys it with this id.

    In a batch every row has its own state: ``tokens`` and ``target_cache`` are that row's (the
    reference engine hands each row's drafter a batch-of-one view of the row's cache).
    """

    tokens: list[int]
    target: Any
    target_cache: Any
    last_logits: torch.Tensor | None
    params: SamplingParams
    generator: torch.Generator | None
    budget: int
    seq_id: int = 0

    @property
    def max_drafts(self) -> int:
        """How many draft tokens deep this round may go (:func:`max_drafts` of the budget). Drafters
        clip their depth to this."""
        return max_drafts(self.budget)


@runtime_checkable
class Drafter(Protocol):
    """What every drafter implements: propose a token tree rooted at ``state.tokens[-1]``.

    The root must be the last emitted token (the loops check it) and the tree must not be
    deeper than :attr:`RoundState.max_drafts`.

    Optional hook ``prefill(state)``: a drafter with a pass of its own over the prompt (a draft
    model filling its cache) defines it. Both loops call it once per row, right after the target's
    prefill, and count it in ``prefill_time``. ``state`` is the first round's.
    """

    def propose(self, state: RoundState) -> Draft: ...


@dataclass
class RoundRecord:
    """What happened in one round (for debugging, notebooks and the bench's accept histograms)."""

    draft: Draft
    path: list[int]
    next_token: int
    row: int = 0  # the batch row this round served

    @property
    def accepted(self) -> int:
        return len(self.path) - 1


def accept_draft(draft: Draft, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                 skip_sample_adjustment: bool = False, root_position: int | None = None, seq_id: int = 0) -> tuple[list[int], int]:
    """Step 3 of a round: pick the acceptance rule and apply it.

    ``draft.tree`` must be a host :class:`~specdec.shared.tree.Tree`; ``logits`` [M, V] are the
    target's rows for the M nodes. Returns (accepted path of node indices, next token).

    Rules: greedy (temperature 0) -> :func:`greedy_accept`; keyed sampling (``params.keyed``) ->
    :func:`greedy_accept` on the target's rows perturbed by the keyed noise of sequence ``seq_id``, row u at
    position ``root_position + depth(u) + 1`` (``root_position`` = L, the root's position = the
    verified cache length; required here): a draft is accepted iff it is the target's keyed choice
    at its position, and the next token is the keyed choice after the accepted node, so the output
    is vanilla keyed sampling's by construction (``q`` and ``skip_sample_adjustment`` play no part);
    otherwise chain rejection sampling with ``draft.q``, or the deterministic-candidate tree rule.
    """
    if params.greedy:
        return greedy_accept(draft.tree, draft.tokens.to(logits.device), logits)
    if params.keyed:
        if root_position is None or params.seed is None:
            raise ValueError("keyed acceptance needs the root's position (root_position) and a resolved seed (params.seed)")
        positions = torch.tensor(draft.tree.depth, dtype=torch.long, device=logits.device) + (int(root_position) + 1)
        perturbed = perturbed_logits(logits, params.temperature, params.top_k, params.top_p, params.seed, seq_id, positions)
        return greedy_accept(draft.tree, draft.tokens.to(logits.device), perturbed)
    p = logits_to_probs(logits, params.temperature, params.top_k, params.top_p)
    if draft.q is not None:
        # A chain sampled from a draft model: Leviathan/Chen rejection sampling with q.
        n, next_token = chain_rejection_accept(draft.tokens[1:].tolist(), draft.q[1:].to(p.device), p, generator, skip_sample_adjustment)
        return list(range(n + 1)), next_token
    return tree_sampling_accept(draft.tree, draft.tokens, p, generator)
