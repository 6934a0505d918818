"""Tree topology (shared/tree.py): masks, depths, positions, paths, children; invalid trees rejected."""

from __future__ import annotations

import random

import pytest
import torch

from specdec.shared.tree import Tree, chain_parents, tree_shape_num_nodes, validate_parents, validate_tree_shape

#        0
#      /   \
#     1     2
#    / \     \
#   3   4     5
#   |
#   6
HAND = [-1, 0, 0, 1, 1, 2, 3]


def random_parents(m: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, m)]


def brute_ancestors(parents: list[int], i: int) -> set[int]:
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


def test_hand_checked_tree():
    t = Tree.from_parents(HAND)
    assert t.size == 7
    assert t.depth == [0, 1, 1, 2, 2, 2, 3]
    assert t.positions(10).tolist() == [10, 11, 11, 12, 12, 12, 13]
    assert t.depth_tensor().dtype == torch.long
    assert t.path(6) == [0, 1, 3, 6] and t.path(5) == [0, 2, 5] and t.path(0) == [0]
    assert t.children(0) == [1, 2] and t.children(1) == [3, 4] and t.children(2) == [5] and t.children(6) == []
    expected = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1],
    ]
    mask = t.ancestor_mask()
    assert mask.dtype == torch.bool and mask.int().tolist() == expected


def test_chain():
    t = Tree.chain(4)
    assert t.parents == (-1, 0, 1, 2, 3) and chain_parents(4) == [-1, 0, 1, 2, 3]
    assert t.depth == [0, 1, 2, 3, 4]
    assert torch.equal(t.ancestor_mask(), torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    assert t.path(4) == [0, 1, 2, 3, 4] and t.children(2) == [3]
    assert Tree.chain(0).parents == (-1,) and Tree.chain(0).ancestor_mask().tolist() == [[True]]


def test_star():
    t = Tree.from_parents([-1] + [0] * 5)
    assert t.depth == [0, 1, 1, 1, 1, 1] and t.children(0) == [1, 2, 3, 4, 5]
    mask = t.ancestor_mask()
    assert mask[:, 0].all() and mask.sum().item() == 6 + 5


@pytest.mark.parametrize("seed", range(8))
def test_random_parents_against_brute_force(seed):
    rng = random.Random(seed)
    m = rng.randint(1, 40)
    parents = random_parents(m, rng)
    t = Tree.from_parents(parents)
    mask = t.ancestor_mask()
    depth = t.depth
    for i in range(m):
        anc = brute_ancestors(parents, i)
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == anc
        assert depth[i] == len(anc) - 1
        path = t.path(i)
        assert path[0] == 0 and path[-1] == i and set(path) == anc
        assert all(parents[b] == a for a, b in zip(path, path[1:]))
        for c in t.children(i):
            assert parents[c] == i
    assert sum(len(t.children(i)) for i in range(m)) == m - 1
    assert torch.equal(t.positions(7), torch.tensor(depth) + 7)
    # the mask is lower triangular (parents first) with a true diagonal and a true root column
    assert torch.equal(mask, torch.tril(mask)) and mask.diagonal().all() and mask[:, 0].all()


def test_tree_accepts_other_int_sequences():
    assert Tree.from_parents(torch.tensor([-1, 0, 0])).parents == (-1, 0, 0)
    assert Tree.from_parents((-1, 0)).parents == (-1, 0)
    assert Tree((-1, 0, 1)) == Tree.chain(2)
    assert hash(Tree.chain(3)) == hash(Tree.from_parents([-1, 0, 1, 2]))


def test_mask_device_argument():
    assert Tree.from_parents(HAND).ancestor_mask(device="cpu").device.type == "cpu"
    assert Tree.from_parents(HAND).positions(3, device="cpu").device.type == "cpu"


@pytest.mark.parametrize(
    "parents,match",
    [
        ([], "at least the root"),
        ([0], "must have parent -1"),
        ([5, 0], "must have parent -1"),
        ([-1, -1], r"parents\[1\] = -1"),
        ([-1, 1], r"parents\[1\] = 1"),  # its own parent
        ([-1, 0, 3, 0], r"parents\[2\] = 3"),  # parent listed after the child
        ([-1, 0, 2], r"parents\[2\] = 2"),
    ],
)
def test_invalid_parents_rejected(parents, match):
    with pytest.raises(ValueError, match=match):
        validate_parents(parents)
    with pytest.raises(ValueError, match=match):
        Tree.from_parents(parents)
    with pytest.raises(ValueError, match=match):
        Tree(tuple(parents))  # direct construction is validated too


@pytest.mark.parametrize("parents", [[-1, 0.5], "abc", 3, None])
def test_non_integer_parents_rejected(parents):
    with pytest.raises(TypeError, match="parents must"):
        validate_parents(parents)


def test_path_out_of_range():
    t = Tree.chain(2)
    with pytest.raises(ValueError, match="outside the tree of 3 nodes"):
        t.path(3)
    with pytest.raises(ValueError, match="outside the tree"):
        t.path(-1)


def test_chain_negative():
    with pytest.raises(ValueError, match="num_drafts must be >= 0"):
        chain_parents(-1)


def test_tree_shape():
    assert validate_tree_shape((4, 16, 16, 16, 16)) == (4, 16, 16, 16, 16)
    assert validate_tree_shape([1]) == (1,)
    assert tree_shape_num_nodes((4, 16, 16, 16, 16)) == 69
    assert tree_shape_num_nodes([3]) == 4


@pytest.mark.parametrize(
    "shape,err,match",
    [
        ((), ValueError, "at least one level"),
        ((4, 0, 2), ValueError, ">= 1 node"),
        ((4, -1), ValueError, ">= 1 node"),
        ("4,16", TypeError, "sequence of ints"),
        (5, TypeError, "sequence of ints"),
    ],
)
def test_invalid_tree_shape(shape, err, match):
    with pytest.raises(err, match=match):
        validate_tree_shape(shape)
    with pytest.raises(err, match=match):
        tree_shape_num_nodes(shape)


def test_ancestor_mask_is_the_paths_on_random_trees():
    """mask[i, j] iff j lies on the root-to-i path, for random trees up to the fast path's 128 nodes (the mask is
    built from byte rows, not per-node tensor ops)."""
    import random

    rng = random.Random(0)
    for _ in range(40):
        m = rng.randint(1, 128)
        t = Tree.from_parents([-1] + [rng.randint(max(0, i - rng.randint(1, 8)), i - 1) for i in range(1, m)])
        want = torch.zeros(m, m, dtype=torch.bool)
        for i in range(m):
            want[i, t.path(i)] = True
        got = t.ancestor_mask()
        assert got.dtype == torch.bool and got.shape == (m, m) and torch.equal(got, want)
