"""Acceptance rules of speculative decoding: the one source of truth for ref and fast.

A round proposes a token tree (node 0 = the root = the last emitted token, not yet verified by a
forward pass; a chain is a tree of width 1). The target scores every node in one pass; row ``u``
of its logits is the target's next-token distribution *after* node ``u``. A rule picks a
root-to-node path of accepted drafts and one more token (bonus or correction).

Three rules, all lossless:

* :func:`greedy_accept` (temperature 0): node ``j`` is right if its token equals the target's
  argmax at its parent; accept the deepest node whose whole path is right (ties: lowest index);
  the extra token is the target's argmax there. Reproduces greedy decoding token for token.
* :func:`chain_rejection_accept` (a chain sampled from a draft model with probabilities ``q``):
  accept ``x_i`` with probability ``min(1, p(x_i) / q(x_i))``; at the first rejection draw from
  ``norm(max(p - q, 0))``; if all are accepted draw the bonus from ``p`` after the last draft.
* :func:`tree_sampling_accept` (deterministic candidates: GLIDE beam trees, LogitSpec, PLD): at
  node ``u`` with target distribution ``p``, try the children in index order: accept child ``c``
  with probability ``p(x_c)``; on rejection set ``p(x_c) = 0`` and renormalise; if no child is
  accepted, draw from what is left of ``p``. (This is chain rejection with a one-hot ``q``,
  applied child after child, so it is exact.) A duplicate sibling token can never be accepted
  after its twin was rejected: it is a wasted slot, which is why drafters merge branches into tries.

``p`` and ``q`` are always the *processed* distributions (temperature, top-k, top-p), see
:func:`specdec.shared.sampling.logits_to_probs`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from specdec.shared.sampling import sample_from_probs
from specdec.shared.tree import Tree

__all__ = [
    "greedy_best_node",
    "greedy_accept",
    "greedy_best_nodes",
    "chain_rejection_accept",
    "tree_sampling_accept",
    "uniform",
]


def uniform(generator: torch.Generator | None, device: torch.device | str = "cpu") -> float:
    """One U[0, 1) draw from ``generator`` (host float)."""
    dev = generator.device if generator is not None else device
    return float(torch.rand((), generator=generator, device=dev))


# ---------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------


def greedy_best_nodes(ancestor_mask: torch.Tensor, depth: torch.Tensor, tokens: torch.Tensor, target_argmax: torch.Tensor,
                      parents: torch.Tensor) -> torch.Tensor:
    """The greedy rule for B trees at once (no host synchronisation): each tree's deepest fully-correct node,
    a [B] long tensor.

    Args:
        ancestor_mask: [B, M, M] bool, ancestor-or-self.
        depth: [B, M] long.
        tokens: [B, M] long, node tokens (node 0 = root); a node that must never be accepted (a padding
            dummy) carries a token no argmax equals, e.g. -1.
        target_argmax: [B, M] long, the target's argmax after each node.
        parents: [B, M] long, parent index (root: -1).
    """
    m = tokens.shape[-1]
    # 1. A node is right when its token is the target's choice after its parent (the root always is).
    parent_choice = target_argmax.gather(-1, parents.clamp(min=0))
    right = (tokens == parent_choice) | (parents < 0)
    # 2. A path is right when every node on it is: no wrong node among the ancestors-or-self.
    path_ok = ~(ancestor_mask & ~right[..., None, :]).any(dim=-1)
    # 3. Deepest right path wins; among equals, the lowest index.
    idx = torch.arange(m, device=tokens.device)
    score = torch.where(path_ok, depth * (m + 1) + (m - idx), torch.full_like(depth, -1))
    return torch.argmax(score, dim=-1)


def greedy_best_node(ancestor_mask: torch.Tensor, depth: torch.Tensor, tokens: torch.Tensor, target_argmax: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """Device-friendly greedy rule: index of the deepest fully-correct node (a 0-d long tensor) --
    :func:`greedy_best_nodes` for one tree.

    Args:
        ancestor_mask: [M, M] bool, ancestor-or-self.
        depth: [M] long.
        tokens: [M] long, node tokens (node 0 = root).
        target_argmax: [M] long, the target's argmax after each node.
        parents: [M] long, parent index (root: -1).
    """
    return greedy_best_nodes(ancestor_mask[None], depth[None], tokens[None], target_argmax[None], parents[None])[0]


def greedy_accept(tree: Tree, tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy rule. Returns (path of node indices from the root to the accepted node, next token)."""
    device = tokens.device
    target_argmax = torch.argmax(target_logits, dim=-1)
    best = int(greedy_best_node(
        tree.ancestor_mask(device), tree.depth_tensor(device), tokens, target_argmax,
        torch.tensor(tree.parents, dtype=torch.long, device=device),
    ))
    return tree.path(best), int(target_argmax[best])


# ---------------------------------------------------------------------------------------------
# Sampling: chain with draft probabilities
# ---------------------------------------------------------------------------------------------


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)); falls back to p when the residual is empty (only possible if p == q)."""
    r = (p - q).clamp(min=0)
    s = r.sum()
    return r / s if float(s) > 0 else p


def chain_rejection_accept(
    draft_tokens: Sequence[int] | torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
    skip_sample_adjustment: bool = False,
) -> tuple[int, int]:
    """Leviathan/Chen speculative sampling on a chain.

    Args:
        draft_tokens: the ``n`` drafted tokens x_1..x_n.
        q: [n, V] draft distributions x_i was drawn from.
        p: [n + 1, V] target distributions: ``p[i]`` is the target's distribution for x_{i+1};
           ``p[n]`` is the bonus distribution after the last draft.
        skip_sample_adjustment: draw a rejected position from ``p`` instead of the residual
           (romsto's option; LOSSY, kept only for comparison).

    Returns:
        (number of accepted drafts, the next token).
    """
    tokens = [int(t) for t in draft_tokens]
    for i, x in enumerate(tokens):
        px, qx = float(p[i, x]), float(q[i, x])
        # Accept x_i with probability min(1, p/q).
        if qx > 0 and uniform(generator, p.device) < min(1.0, px / qx):
            continue
        # First rejection: draw the correction from the residual distribution.
        dist = p[i] if skip_sample_adjustment else _residual(p[i], q[i])
        return i, int(sample_from_probs(dist, generator))
    # Every draft accepted: the bonus comes from the target after the last one.
    return len(tokens), int(sample_from_probs(p[len(tokens)], generator))


# ---------------------------------------------------------------------------------------------
# Sampling: trees (or chains) of deterministic candidates
# ---------------------------------------------------------------------------------------------


def tree_sampling_accept(tree: Tree, tokens: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Walk down the tree trying children in order (see module docstring).

    Args:
        tree: topology (node 0 = root).
        tokens: [M] node tokens.
        p: [M, V] processed target distributions after each node.

    Returns:
        (accepted path from the root, next token).
    """
    toks = tokens.tolist()
    path = [0]
    node = 0
    while True:
        dist = p[node].clone()
        moved = False
        for child in tree.children(node):
            x = toks[child]
            px = float(dist[x])
            # Accept this child with the probability the (residual) target gives its token.
            if px > 0 and uniform(generator, p.device) < px:
                path.append(child)
                node = child
                moved = True
                break
            # Rejected: remove its token and renormalise before trying the next sibling.
            rest = dist.clone()
            rest[x] = 0.0
            s = rest.sum()
            if float(s) <= 0:  # p was (numerically) all on x: nothing left to try
                break
            dist = rest / s
        if not moved:
            # No child accepted (or a leaf): the extra token comes from what is left of p.
            return path, int(sample_from_probs(dist, generator))
