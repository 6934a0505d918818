"""Retrieval drafting from the text itself: the n-gram pool (LogitSpec, prompt lookup) and the trie builder.

Pure Python, no tensors: the one source of truth for ``specdec.ref`` and ``specdec.fast``.

**The pool.** For every l-gram (``l = 1 .. max_ngram_size``) of the text (prompt + generated
tokens) the pool remembers where its *latest* occurrence ended; the continuation is the up to
``num_pred_tokens`` tokens that followed it. Only occurrences followed by at least one token
are stored, so the suffix of the text itself is never its own match. The pool is updated
incrementally: :meth:`NgramPool.update` registers only the positions it has not seen yet
(amortised O(max_ngram_size) per new token), and continuations are read from the stored text
at lookup time, so they keep growing as text is appended.

**Lookup.** :meth:`NgramPool.lookup` finds the longest suffix of a query sequence (of length
``max_ngram_size`` down to 1) present in the pool and returns the tokens that followed its
latest occurrence. Prompt lookup decoding (PLD) is exactly this lookup on the context.

**Tries.** Draft branches that share a prefix are merged (:func:`build_trie`): no node has two
children with the same token (a duplicate sibling is a wasted verification slot that can never
be accepted after its twin was rejected). Nodes come out parents-first in breadth-first order
(each tree level is a contiguous run; siblings keep the order their branches were inserted, which
is the order acceptance tries them).
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["NgramPool", "prompt_lookup", "Trie", "build_trie", "check_ngram_args"]


def check_ngram_args(max_ngram_size, num_pred_tokens) -> None:
    """ValueError (or TypeError) unless both are ints >= 1."""
    for name, v in (("max_ngram_size", max_ngram_size), ("num_pred_tokens", num_pred_tokens)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")


class NgramPool:
    """l-gram -> end of its latest occurrence in the text (l = 1..max_ngram_size)."""

    def __init__(self, max_ngram_size: int = 3, num_pred_tokens: int = 20, tokens: Iterable[int] = ()) -> None:
        check_ngram_args(max_ngram_size, num_pred_tokens)
        self.max_ngram_size = max_ngram_size
        self.num_pred_tokens = num_pred_tokens
        self.tokens: list[int] = []
        self._end: dict[tuple[int, ...], int] = {}  # l-gram -> index right after its latest occurrence
        self._registered = 1  # positions e < _registered have their l-grams ending at e stored
        self.update(tokens)

    def __len__(self) -> int:
        return len(self._end)

    def __contains__(self, ngram) -> bool:
        return tuple(ngram) in self._end

    def update(self, tokens: Sequence[int]) -> None:
        """Bring the pool up to date with ``tokens``, which must extend the text seen so far."""
        n0 = len(self.tokens)
        if len(tokens) < n0:
            raise ValueError(f"the pool's text only grows: got {len(tokens)} tokens, it already holds {n0}")
        self.tokens.extend(int(t) for t in tokens[n0:])
        # An l-gram ending at e (exclusive) is registered once a token follows it (e < len).
        # Increasing e means a later occurrence overwrites an earlier one: "latest wins".
        toks, n = self.tokens, len(self.tokens)
        for e in range(self._registered, n):
            for l in range(1, min(self.max_ngram_size, e) + 1):
                self._end[tuple(toks[e - l:e])] = e
        self._registered = max(self._registered, n)

    def continuation(self, ngram: Sequence[int], limit: int | None = None) -> list[int]:
        """Tokens that followed the latest occurrence of ``ngram`` (up to ``limit`` or num_pred_tokens); [] if unseen."""
        return self._follow(tuple(int(t) for t in ngram), limit)

    def _follow(self, key: tuple[int, ...], limit: int | None) -> list[int]:
        """:meth:`continuation` of an l-gram given as a tuple of ints."""
        e = self._end.get(key)
        if e is None:
            return []
        k = self.num_pred_tokens if limit is None else min(limit, self.num_pred_tokens)
        return self.tokens[e:e + k]

    def lookup(self, query: Sequence[int], limit: int | None = None) -> list[int]:
        """Continuation of the longest suffix of ``query`` (length max_ngram_size .. 1) found in the pool."""
        q = tuple(int(t) for t in query[-self.max_ngram_size:])  # only the suffix matters: O(1) in the context length
        for l in range(len(q), 0, -1):
            cont = self._follow(q[-l:], limit)
            if cont:
                return cont
        return []


def prompt_lookup(tokens: Sequence[int], max_ngram_size: int = 3, num_pred_tokens: int = 10) -> list[int]:
    """PLD in one call: the tokens after the most recent earlier occurrence of the longest matching suffix."""
    return NgramPool(max_ngram_size, num_pred_tokens, tokens).lookup(tokens)


class Trie:
    """A token trie under a root; nodes are added branch by branch, merging shared prefixes."""

    def __init__(self, root: int) -> None:
        self.tokens: list[int] = [int(root)]
        self.parents: list[int] = [-1]
        self._child: dict[tuple[int, int], int] = {}  # (parent node, token) -> node

    @property
    def num_drafts(self) -> int:
        """Nodes below the root."""
        return len(self.tokens) - 1

    def insert(self, branch: Sequence[int], max_new_nodes: int | None = None) -> int:
        """Add the path ``branch`` below the root (reusing existing nodes); returns how many nodes were new.

        With ``max_new_nodes`` the branch is cut where it would create more new nodes than that.
        """
        node, added = 0, 0
        for t in branch:
            key = (node, int(t))
            nxt = self._child.get(key)
            if nxt is None:
                if max_new_nodes is not None and added >= max_new_nodes:
                    break
                nxt = len(self.tokens)
                self.tokens.append(int(t))
                self.parents.append(node)
                self._child[key] = nxt
                added += 1
            node = nxt
        return added

    def bfs_order(self) -> list[int]:
        """The nodes in breadth-first order, as insertion indices (root 0, then 1, 2, ... in the order
        :meth:`insert` created them): entry j is the insertion index of node j of :meth:`bfs`."""
        children: list[list[int]] = [[] for _ in self.tokens]
        for i, p in enumerate(self.parents[1:], start=1):
            children[p].append(i)
        order, head = [0], 0
        while head < len(order):
            order.extend(children[order[head]])
            head += 1
        return order

    def bfs(self, order: list[int] | None = None) -> tuple[list[int], list[int]]:
        """(tokens, parents) re-numbered breadth-first: parents first, levels contiguous, sibling order kept.
        ``order``: :meth:`bfs_order` when the caller has it already (it is not computed twice)."""
        order = self.bfs_order() if order is None else order
        new_index = {old: j for j, old in enumerate(order)}
        tokens = [self.tokens[i] for i in order]
        parents = [-1] + [new_index[self.parents[i]] for i in order[1:]]
        return tokens, parents


def build_trie(root: int, branches: Iterable[Sequence[int]], capacity: int | None = None) -> tuple[list[int], list[int]]:
    """Merge ``branches`` (each a token path below ``root``) into a trie of at most ``capacity`` draft nodes.

    Returns ``(tokens, parents)`` with node 0 = root, parents-first (breadth-first) order.
    """
    trie = Trie(root)
    for b in branches:
        left = None if capacity is None else capacity - trie.num_drafts
        if left is not None and left <= 0:
            break
        trie.insert(b, left)
    return trie.bfs()
