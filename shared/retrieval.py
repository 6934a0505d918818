"""Retrieval drafters: drafts looked up in the text itself, no draft model (docs/design.md §5).

Both are pure host-side Python over token ids and the n-gram pool of :mod:`specdec.shared.ngram`,
so the reference and the fast path run the SAME drafter object and differ only in how the
target verifies (:func:`specdec.ref.pld.pld_generate` / :func:`specdec.fast.pld.pld_generate`, and
the LogitSpec pair). A ref-vs-fast difference in those decoders therefore never comes from here.

* :class:`PromptLookupDrafter` -- prompt lookup decoding: the chain that followed the most recent
  earlier occurrence of the context's longest matching suffix.
* :class:`LogitSpecDrafter` -- LogitSpec (Liu et al. 2025): the pool's continuation of
  (context + root) plus "next next token" guesses taken from the logit that produced the root,
  each a new retrieval key, merged into a trie. :mod:`specdec.ref.logitspec` explains the steps.
"""

from __future__ import annotations

import torch

from specdec.shared.ngram import NgramPool, Trie
from specdec.shared.round import Draft, RoundState
from specdec.shared.sampling import stable_topk
from specdec.shared.tree import Tree

__all__ = ["PromptLookupDrafter", "LogitSpecDrafter", "guess_branch_length", "guess_order"]


class PromptLookupDrafter:
    """Chain drafts copied from the most recent earlier occurrence of the context's longest matching suffix."""

    def __init__(self, max_ngram_size: int = 3, num_pred_tokens: int = 10) -> None:
        self.pool = NgramPool(max_ngram_size, num_pred_tokens)

    def propose(self, state: RoundState) -> Draft:
        # 3. (from the previous round) learn what was emitted; 1. look the context's suffix up.
        self.pool.update(state.tokens)
        drafts = self.pool.lookup(state.tokens, limit=state.max_drafts)
        tokens = torch.tensor([state.tokens[-1]] + drafts, dtype=torch.long)
        return Draft(tokens=tokens, tree=Tree.chain(len(drafts)))


def guess_branch_length(rank: int) -> int:
    """Tokens kept in the branch of the guess of rank ``rank`` (1 = best guess after the root)."""
    if rank <= 8:
        return 4
    if rank <= 32:
        return 3
    return 1


def guess_order(last_logits: torch.Tensor, capacity: int) -> list[int]:
    """The token ids LogitSpec may try as guesses, best logit first (equal logits: lower id first; a NaN logit
    ranks as -inf): the first ``capacity + 1`` of that order -- all a tree of ``capacity`` drafts can use.
    Each guess adds its token as a new child of the root unless it is the root's own token or the first token
    of branch 0 (which then already gave the tree a node), so ``capacity + 1`` guesses fill the tree. Exactly
    the prefix of a full stable sort (:func:`specdec.shared.sampling.stable_topk`) without sorting the whole
    vocabulary; the logits stay where they are (on the GPU only the candidates are read back)."""
    scores = last_logits.float().reshape(-1)
    scores = torch.where(torch.isnan(scores), float("-inf"), scores)
    return stable_topk(scores, capacity + 1).tolist()


class LogitSpecDrafter:
    """Draft trees from the n-gram pool and the last logit's next-next-token guesses."""

    def __init__(self, max_ngram_size: int = 3, num_pred_tokens: int = 20, draft_tree_capacity: int = 64) -> None:
        self.pool = NgramPool(max_ngram_size, num_pred_tokens)
        self.capacity = draft_tree_capacity
        # The last draft's nodes as insertion indices (node j of the draft was the insertion_ids[j]-th node the
        # trie created; root 0): the tree of capacity c < capacity is exactly its nodes with index <= c
        # (specdec.shared.capacity, which measures every smaller capacity from one run).
        self.insertion_ids: list[int] = [0]

    def propose(self, state: RoundState) -> Draft:
        tokens, root = state.tokens, state.tokens[-1]
        depth = state.max_drafts  # deeper drafts could never be emitted
        capacity = self.capacity if depth > 0 else 0
        # 1. Learn the newly emitted tokens.
        self.pool.update(tokens)
        trie = Trie(root)
        # 2. Branch 0: continuation of the longest suffix of (context + root).
        trie.insert(self.pool.lookup(tokens, limit=depth), max_new_nodes=capacity)
        # 3-4. Guess branches from the same last logit, best first (ties: lower id first), until the tree is full.
        if state.last_logits is not None and capacity > 0:
            order = guess_order(state.last_logits, capacity)
            suffix = tokens[-self.pool.max_ngram_size:]  # all the pool looks at (no copy of the whole context)
            rank = 0
            for g in order:
                if trie.num_drafts >= capacity:
                    break
                if g == root:
                    continue
                rank += 1
                keep = min(guess_branch_length(rank), depth)
                branch = [g] + (self.pool.lookup(suffix + [g], limit=keep - 1) if keep > 1 else [])
                trie.insert(branch, max_new_nodes=capacity - trie.num_drafts)
        self.insertion_ids = trie.bfs_order()
        node_tokens, parents = trie.bfs(self.insertion_ids)
        return Draft(tokens=torch.tensor(node_tokens, dtype=torch.long), tree=Tree.from_parents(parents))
