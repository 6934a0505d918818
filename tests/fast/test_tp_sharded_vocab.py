"""The vocab-sharded reductions of fast/tp.py, one process: every rank's part computed here, the gather simulated.

* ``argmax`` over a vocab-parallel lm_head's slices == ``torch.argmax`` of the full logits, bit for bit:
  ties across shard boundaries (lowest global id), -0.0 == +0.0, NaN (the first wins), all -inf rows,
  padded columns of the last shard (zero logits that would beat negative real ones) never win;
* the GLIDE beam's top-k over slices == :func:`specdec.shared.glide.beam_level` of the full
  log-probabilities (parents, tokens, scores), ties and NaN included, k up to every pair.

The collectives themselves (and ``log_softmax``) run in the two-process test
(tests/fast/test_tensor_parallel.py).
"""

from __future__ import annotations

import pytest
import torch

from specdec.fast.tp import (INVALID_KEY, decode_key, local_argmax_key, local_beam_keys, merge_beam_keys, order_key,
                             shard_columns)
from specdec.shared.glide import beam_level

NAN, INF = float("nan"), float("inf")


def _shards(full: torch.Tensor, world: int, pad_value: float = 0.0) -> tuple[list[torch.Tensor], int]:
    """The ranks' [..., V'] slices of ``full`` [..., V] padded to world * V' columns (as the sharded lm_head's
    zero rows give: logits 0 in the padding)."""
    v = full.shape[-1]
    width = -(-v // world)
    padded = torch.full((*full.shape[:-1], world * width), pad_value, dtype=full.dtype)
    padded[..., :v] = full
    return list(padded.split(width, dim=-1)), width


def _sharded_argmax(full: torch.Tensor, world: int, pad_value: float = 0.0) -> torch.Tensor:
    """What TensorParallel.argmax returns, with the all-gather done here."""
    parts, _ = _shards(full, world, pad_value)
    keys = torch.stack([local_argmax_key(p, full.shape[-1], r, world) for r, p in enumerate(parts)])
    return decode_key(keys.amax(dim=0))[1]


def _crafted(v: int, world: int) -> torch.Tensor:
    """Rows that stress the rule at the shard boundaries of a V = v vocabulary over ``world`` ranks."""
    width = -(-v // world)
    rows = []
    neg = -torch.arange(1, v + 1, dtype=torch.float32)           # all negative: padding (0) would win if read
    rows.append(neg.clone())
    for b in range(1, world):                                     # equal maxima on both sides of each boundary
        r = neg.clone()
        if b * width < v:
            r[b * width - 1] = r[b * width] = 5.0
        rows.append(r)
        r = neg.clone()                                           # the later shard's copy only: it must win
        if b * width < v:
            r[b * width] = 5.0
        rows.append(r)
    r = neg.clone()
    r[-1] = 7.0                                                   # the last real id (next to the padding)
    rows.append(r)
    r = torch.zeros(v)                                            # every id ties: 0
    rows.append(r)
    r = neg.clone()
    r[v // 2], r[0] = 0.0, -0.0                                   # -0.0 == +0.0: the lower id
    rows.append(r)
    r = neg.clone()
    r[0] = -0.0
    r[-1] = 0.0
    rows.append(r)
    rows.append(torch.full((v,), -INF))                           # all -inf: id 0
    r = neg.clone()
    r[v - 1], r[1] = NAN, INF                                     # NaN beats +inf
    rows.append(r)
    r = neg.clone()
    r[v - 1], r[v // 2] = NAN, NAN                                # the first NaN
    rows.append(r)
    r = torch.full((v,), -INF)
    r[-1] = -1e30                                                 # one finite value, next to the padding
    rows.append(r)
    return torch.stack(rows)


@pytest.mark.parametrize("v,world", [(67, 2), (67, 3), (64, 4), (10, 4), (5, 4), (13, 8)])
def test_argmax_equals_torch_argmax_of_the_full_logits(v, world):
    full = _crafted(v, world)
    assert torch.equal(_sharded_argmax(full, world), torch.argmax(full, dim=-1))
    assert torch.equal(_sharded_argmax(full, world, pad_value=INF), torch.argmax(full, dim=-1))   # padding never read
    gen = torch.Generator().manual_seed(v * 10 + world)
    for _ in range(5):   # random rows with many exact ties (values on a coarse grid), [B, M, V]
        full = torch.randint(-3, 3, (3, 4, v), generator=gen).float()
        full[torch.rand(full.shape, generator=gen) < 0.02] = NAN
        assert torch.equal(_sharded_argmax(full, world), torch.argmax(full, dim=-1))


def test_order_key_orders_like_value_then_index():
    vals = torch.tensor([1.0, -0.0, 0.0, -INF, INF, 2.5, -2.5, NAN, 1.0, 3.4e38, -3.4e38, 1e-45, -1e-45])
    idx = torch.arange(vals.numel())
    keys = order_key(vals, idx, nan="-inf")
    value, back = decode_key(keys)
    assert torch.equal(back, idx)
    want_vals = torch.where(torch.isnan(vals), -INF, vals) + 0.0
    assert torch.equal(value, want_vals) and not torch.signbit(value[1])            # -0.0 read back as +0.0
    order = torch.argsort(keys, descending=True)
    want = sorted(range(vals.numel()), key=lambda i: (-float(want_vals[i]), i))
    assert order.tolist() == want
    assert bool((keys > INVALID_KEY).all())
    with pytest.raises(ValueError, match="nan must be"):
        order_key(vals, idx, nan="min")


@pytest.mark.parametrize("v,world,k", [(67, 2, 4), (67, 2, 16), (67, 3, 50), (10, 4, 7), (5, 4, 15), (13, 8, 26)])
def test_beam_topk_equals_beam_level(v, world, k):
    gen = torch.Generator().manual_seed(v + 100 * world + k)
    for trial in range(6):
        p = 1 if trial < 2 else 3
        logp = torch.randint(-4, 0, (p, v), generator=gen).float()        # coarse grid: many exact ties
        if trial % 2:
            logp[torch.rand(logp.shape, generator=gen) < 0.1] = NAN
            logp[torch.rand(logp.shape, generator=gen) < 0.1] = -INF
        cum = None if p == 1 else torch.randint(-2, 0, (p,), generator=gen).float()
        kk = min(k, p * v)
        want = beam_level(torch.zeros(1) if cum is None else cum, logp, kk)
        parts, width = _shards(logp, world, pad_value=INF)                 # padding must never be read
        keys = []
        for r, part in enumerate(parts):
            real = shard_columns(v, width, r, world)
            keys.append(local_beam_keys(cum, part[:, :real], v, kk, r, world, width))
        got = merge_beam_keys(torch.stack(keys), kk, world * width)
        for g, w, name in zip(got, want, ("parent", "token", "score")):
            assert torch.equal(g, w), (name, trial, g, w)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"vocab_size must be in .*= \[1, 8\]"):
        shard_columns(9, 4, 0, 2)
    with pytest.raises(ValueError, match="real columns"):
        local_beam_keys(None, torch.zeros(1, 4), 7, 2, 1, 2, 4)             # rank 1 of V = 7 holds 3 real ids
