"""The greedy-acceptance kernels (:mod:`specdec.fast.kernels.accept`) against their torch reference.

``greedy_accept`` must give exactly :func:`greedy_accept_ref`'s outputs (packed read-back, the rows to
keep, the new cache length) on random trees with planted right paths and padding nodes;
``row_argmax`` exactly ``torch.argmax`` (ties to the lowest index). CPU runs under the Triton
interpreter; ``-m gpu`` adds the real vocabulary sizes.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import kernel_device

from specdec.fast import kernels as K
from specdec.shared.tree import Tree

DEV = kernel_device()


def _case(m: int, real: int, seed: int, vocab: int = 7):
    """A random tree of ``real`` nodes padded to ``m`` (dummies hang off the root, see only themselves),
    node tokens from a small vocabulary and target choices that make some paths right."""
    rng = random.Random(seed)
    parents = [-1] + [rng.randrange(i) for i in range(1, real)]
    tree = Tree.from_parents(parents)
    anc = torch.zeros(m, m, dtype=torch.bool)
    anc[:real, :real] = tree.ancestor_mask()
    anc[real:, real:] = torch.eye(m - real, dtype=torch.bool)
    par = torch.tensor(parents + [0] * (m - real))
    depth = torch.tensor(tree.depth + [1] * (m - real))
    tokens = torch.tensor([rng.randrange(vocab) for _ in range(m)])
    amax = torch.tensor([rng.randrange(vocab) for _ in range(m)])
    for node in range(1, real):  # plant: about half the nodes are the target's choice after their parent
        if rng.random() < 0.5:
            tokens[node] = amax[parents[node]]
    for node in range(real, m):  # a padding node that would match must still never be accepted
        tokens[node] = amax[0]
    valid = torch.arange(m) < real
    return [t.to(DEV) for t in (amax, tokens, par, depth, anc, valid)]


@pytest.mark.parametrize("m,real", [(1, 1), (5, 5), (9, 6), (69, 69), (70, 41), (128, 128), (128, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_greedy_accept_matches_reference(m, real, seed):
    args = _case(m, real, seed=seed * 131 + m)
    length = torch.tensor([37], dtype=torch.int32, device=DEV)
    got_len, want_len = length.clone(), length.clone()
    seq = torch.full((37 + m + 8,), -5, dtype=torch.int32, device=DEV)  # poisoned: only [37, 37 + n] may change
    got_seq, want_seq = seq.clone(), seq.clone()
    got = K.greedy_accept(*args, got_len, seq=got_seq)
    want = K.greedy_accept_ref(*args, want_len, seq=want_seq)
    packed, src, dst, n = got
    assert torch.equal(packed, want[0]), (packed[:2].tolist(), want[0][:2].tolist())
    k = int(want[3])
    assert int(n) == k and int(dst) == 37 and torch.equal(got_len, want_len)
    assert torch.equal(src, want[1])  # path rows in index order first, then the rest
    # the sequence by position: root, accepted tokens in depth order, then the next token; nothing else touched
    assert torch.equal(got_seq, want_seq)
    path = [j for j, on in enumerate(packed[2 : 2 + m].tolist()) if on]
    assert got_seq[37 : 38 + k].tolist() == [int(args[1][j]) for j in path] + [int(packed[1])]
    assert (got_seq[:37] == -5).all() and (got_seq[38 + k :] == -5).all()
    best = int(packed[0])
    assert best < real or best == 0  # a padding node is never accepted


def test_greedy_accept_in_accept_and_compact_moves_rows():
    """Through the engine's accept_and_compact: the accepted path's K/V rows land at [L, L + n)."""
    from specdec.fast.engine import accept_and_compact
    from specdec.fast.model import StaticKVCache

    m, L = 9, 5
    amax, tokens, par, depth, anc, valid = _case(m, m, seed=7)
    k = torch.randn(2, 1, 1, L + m + 3, 4, device=DEV)
    v = torch.randn_like(k)
    cache = StaticKVCache(k=k.clone(), v=v.clone(), length=L, length_t=torch.tensor([L], dtype=torch.int32, device=DEV))
    logits = torch.nn.functional.one_hot(amax, 7).float()
    packed = accept_and_compact(cache, logits, tokens, par, depth, anc, valid)
    path = [j for j, on in enumerate(packed[2 : 2 + m].tolist()) if on]
    assert int(cache.length_t[0]) == L + len(path)
    for dst, node in enumerate(path):
        assert torch.equal(cache.k[:, :, :, L + dst], k[:, :, :, L + node])
        assert torch.equal(cache.v[:, :, :, L + dst], v[:, :, :, L + node])


@pytest.mark.parametrize("m,v", [(1, 5), (3, 64), (7, 2048), (5, 2500), (69, 300)])
def test_row_argmax_matches_torch(m, v):
    g = torch.Generator().manual_seed(m * v)
    x = (torch.randn(m, v, generator=g) * 2).round()  # many ties: the lowest index must win
    x[0, :] = float("-inf")  # an all -inf row -> index 0, like torch
    if m > 1:
        x[1, -1] = 100.0  # the maximum in the last (partial) block
    xd = x.to(DEV)
    assert torch.equal(K.row_argmax(xd).cpu(), torch.argmax(x, dim=-1))


def test_accept_kernels_reject_bad_input():
    amax, tokens, par, depth, anc, valid = _case(5, 5, seed=1)
    length = torch.tensor([3], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="ancestor"):
        K.greedy_accept(amax, tokens, par, depth, anc[:4, :4], valid, length)
    with pytest.raises(ValueError, match="int64"):
        K.greedy_accept(amax, tokens.int(), par, depth, anc, valid, length)
    with pytest.raises(ValueError, match="length_t"):
        K.greedy_accept(amax, tokens, par, depth, anc, valid, length.long())
    with pytest.raises(ValueError, match="M <= 128"):
        big = torch.zeros(129, dtype=torch.long, device=DEV)
        K.greedy_accept(big, big, big, big, torch.zeros(129, 129, dtype=torch.bool, device=DEV),
                        torch.ones(129, dtype=torch.bool, device=DEV), length)
    with pytest.raises(ValueError, match="floating"):
        K.row_argmax(torch.zeros(2, 3, dtype=torch.long, device=DEV))


@pytest.mark.gpu
@pytest.mark.parametrize("v", [4096, 32000, 128256])
def test_row_argmax_real_vocabularies_gpu(v):
    x = torch.randn(69, v, device="cuda")
    x[3, 7] = x[3, 9] = x[3].max() + 1  # a tie: index 7
    assert torch.equal(K.row_argmax(x), torch.argmax(x, dim=-1))
    assert int(K.row_argmax(x)[3]) == 7
    assert torch.equal(K.row_argmax(x.bfloat16()), torch.argmax(x.bfloat16(), dim=-1))


def test_accept_rows_greedy_equals_each_row_alone():
    """The batched engine's greedy step (fast/engine.py ``accept_rows_greedy``): B trees of different sizes padded
    to one T, accepted and compacted on the device at once, give each row what the batch-of-one kernel gives it
    alone (best node, next token, the rows moved to [L_b, L_b + n_b) in every layer) -- and a finished row
    (no valid node, as the engine passes it) moves nothing. Cache rows outside the accepted ranges keep their
    poison."""
    from specdec.fast.engine import accept_rows_greedy

    T, reals, lengths, drafting = 9, [9, 4, 1, 6], [5, 11, 0, 20], [True, True, False, True]
    cases = [_case(T, r, seed=40 + i) for i, r in enumerate(reals)]
    for c, d in zip(cases, drafting):
        c[5] = c[5] & d                                         # a finished row: valid all False
    amax, tokens, parents, depth, anc, valid = (torch.stack([c[j] for c in cases]) for j in range(6))
    layers, hkv, d, cap = 2, 2, 4, 40
    g = torch.Generator().manual_seed(0)
    k0 = torch.randn(layers, len(reals), hkv, cap, d, generator=g).to(DEV)
    v0 = torch.randn(layers, len(reals), hkv, cap, d, generator=g).to(DEV)

    class Cache:   # what accept_rows_greedy reads of a cache: its K/V tensors
        k, v = k0.clone(), v0.clone()

    got = accept_rows_greedy(Cache, amax, tokens, parents, depth, anc, valid,
                             torch.tensor(lengths, dtype=torch.int32, device=DEV))[0].tolist()
    for b, c in enumerate(cases):
        length = torch.tensor([lengths[b]], dtype=torch.int32, device=DEV)
        packed, src, _, n = K.greedy_accept(*c, length)        # the batch-of-one kernel
        want_k, want_v = k0[:, b].clone(), v0[:, b].clone()
        if drafting[b]:
            assert got[b] == packed[:2].tolist(), b
            rows = src[: int(n)].long()
            want_k[:, :, lengths[b] : lengths[b] + int(n)] = k0[:, b][:, :, rows]
            want_v[:, :, lengths[b] : lengths[b] + int(n)] = v0[:, b][:, :, rows]
        assert torch.equal(Cache.k[:, b], want_k) and torch.equal(Cache.v[:, b], want_v), b
