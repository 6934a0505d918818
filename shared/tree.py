"""Token-tree topology: the one source of truth every decoder (ref and fast) uses.

A draft tree is a flat list of M nodes. Node 0 is the root (the last verified token, parent -1);
every other node ``i`` has a parent ``parents[i] < i`` (nodes are listed parents-first, so a
tree level is a contiguous run of indices). A chain of ``gamma`` drafts is the tree with
``parents = [-1, 0, 1, ..., gamma - 1]``.

From ``parents`` everything else follows:

* ``depth[i]``: number of edges from the root (root has depth 0);
* ``positions``: ``prefix_len + depth`` -- the RoPE position of each node;
* ``ancestor_mask[i, j]``: True if ``j`` is an ancestor of ``i`` or ``i`` itself, i.e. node ``i``
  may attend to node ``j`` during verification;
* ``path(i)``: node indices from the root down to ``i`` (inclusive).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Tree", "chain_parents", "validate_parents", "validate_tree_shape", "tree_shape_num_nodes"]


def validate_parents(parents: Sequence[int]) -> list[int]:
    """Check a parent list and return it as a list of ints.

    Raises ``ValueError`` unless ``parents[0] == -1`` and ``0 <= parents[i] < i`` for ``i >= 1``.
    """
    if isinstance(parents, (str, bytes)) or not hasattr(parents, "__iter__"):
        raise TypeError(f"parents must be a sequence of ints, got {type(parents).__name__}")
    try:
        parents = [operator.index(p) for p in parents]  # ints only: 0.5 must not become 0
    except TypeError:
        raise TypeError(f"parents must hold integers, got {list(parents)!r}") from None
    if len(parents) == 0:
        raise ValueError("a tree needs at least the root node (parents=[-1])")
    if parents[0] != -1:
        raise ValueError(f"node 0 is the root and must have parent -1, got {parents[0]}")
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: every non-root node needs a parent in [0, {i - 1}] (parents first)")
    return parents


def chain_parents(num_drafts: int) -> list[int]:
    """Parents of a chain: root followed by ``num_drafts`` nodes, each the child of the previous one."""
    if num_drafts < 0:
        raise ValueError(f"num_drafts must be >= 0, got {num_drafts}")
    return [-1] + list(range(num_drafts))


def validate_tree_shape(tree_shape: Sequence[int]) -> tuple[int, ...]:
    """Check a GLIDE beam ``tree_shape`` (nodes per level, e.g. ``(4, 16, 16, 16, 16)``).

    Level 1 has ``tree_shape[0]`` nodes (top-k at the root); level ``k + 1`` keeps the best
    ``tree_shape[k]`` (node, token) pairs of all children of level ``k``, so a level can hold at
    most ``tree_shape[k - 1] * vocab`` candidates; we only require every entry to be >= 1.
    """
    if isinstance(tree_shape, (str, bytes)) or not hasattr(tree_shape, "__iter__"):
        raise TypeError(f"tree_shape must be a sequence of ints, got {type(tree_shape).__name__}")
    shape = tuple(int(s) for s in tree_shape)
    if len(shape) == 0:
        raise ValueError("tree_shape must have at least one level, e.g. (4, 16, 16, 16, 16)")
    if any(s < 1 for s in shape):
        raise ValueError(f"every level of tree_shape must hold >= 1 node, got {list(shape)}")
    return shape


def tree_shape_num_nodes(tree_shape: Sequence[int]) -> int:
    """Number of verified positions for a beam tree: root + sum(tree_shape) (69 for the default)."""
    return 1 + sum(validate_tree_shape(tree_shape))


@dataclass(frozen=True)
class Tree:
    """Topology of a token tree (tokens themselves are carried separately).

    Attributes:
        parents: parent index per node, root first (``parents[0] == -1``).
    """

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        # validate on every construction path (Tree(...) directly too), store as a tuple of ints
        object.__setattr__(self, "parents", tuple(validate_parents(self.parents)))

    @staticmethod
    def from_parents(parents: Sequence[int]) -> "Tree":
        return Tree(tuple(validate_parents(parents)))

    @staticmethod
    def chain(num_drafts: int) -> "Tree":
        return Tree(tuple(chain_parents(num_drafts)))

    @property
    def size(self) -> int:
        """M, the number of nodes including the root."""
        return len(self.parents)

    @property
    def depth(self) -> list[int]:
        """Depth of every node (root 0)."""
        depth = [0] * self.size
        for i in range(1, self.size):
            depth[i] = depth[self.parents[i]] + 1
        return depth

    def depth_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.depth, dtype=torch.long, device=device)

    def positions(self, prefix_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """RoPE positions ``prefix_len + depth`` (the root sits at ``prefix_len``)."""
        return self.depth_tensor(device) + int(prefix_len)

    def ancestor_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[M, M]`` bool, ``mask[i, j]`` True iff ``j`` is ``i`` or an ancestor of ``i``."""
        m = self.size
        # Row i = its parent's row (complete: parents come first) with column i set. Built as bytes and turned
        # into a tensor once -- two tensor ops per node cost ~0.4 ms for a 65-node tree on the host, every round.
        rows: list[bytearray] = []
        for i, p in enumerate(self.parents):
            row = bytearray(rows[p]) if p >= 0 else bytearray(m)
            row[i] = 1
            rows.append(row)
        mask = torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.bool).view(m, m).clone()
        return mask.to(device) if device is not None else mask

    def path(self, node: int) -> list[int]:
        """Node indices from the root down to ``node`` (inclusive)."""
        if not 0 <= node < self.size:
            raise ValueError(f"node {node} is outside the tree of {self.size} nodes")
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def children(self, node: int) -> list[int]:
        """Children of ``node`` in index order (the order acceptance tries them)."""
        return [i for i, p in enumerate(self.parents) if p == node]
