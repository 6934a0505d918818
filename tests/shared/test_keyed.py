"""Position-keyed Gumbel-max sampling (shared/keyed.py): exact samples, keyed by position only."""

from __future__ import annotations

import itertools

import pytest
import torch

from lossless import chi_square_test
from specdec.shared.keyed import (check_seed, gumbel_noise, keyed_choice, keyed_logprobs, keyed_noise, perturbed_logits,
                                  perturbed_logprobs, sequence_key)
from specdec.shared.sampling import logits_to_probs

LOGITS = torch.tensor([1.2, 0.3, -0.5, 2.0, 0.0, -1.5])


def test_noise_is_a_function_of_the_key_only():
    pos = torch.tensor([7, 8, 9])
    a = gumbel_noise(3, 0, pos, 50)
    assert a.shape == (3, 50) and a.dtype == torch.float32
    assert torch.equal(a, gumbel_noise(3, 0, pos, 50))
    # the row of a position does not depend on which other positions are asked for, or in what shape
    assert torch.equal(gumbel_noise(3, 0, torch.tensor([8]), 50)[0], a[1])
    assert torch.equal(gumbel_noise(3, 0, torch.tensor([[9, 7]]), 50)[0], a[[2, 0]])
    # another seed, sequence or position gives other noise
    assert not torch.equal(gumbel_noise(4, 0, pos, 50), a)
    assert not torch.equal(gumbel_noise(3, 1, pos, 50), a)
    assert not torch.equal(a[0], a[1])
    # 64-bit seeds use their high half too
    assert not torch.equal(gumbel_noise(3 + (1 << 40), 0, pos, 50), a)


def test_a_key_in_a_device_tensor_gives_the_same_bits():
    """What a captured graph does (fast GLIDE): the sequence key in a 0-d tensor -- int64, or an int32 holding
    its 32 bits -- instead of (seed, seq_id) on the host; the noise and the perturbed log-probs are identical."""
    pos = torch.tensor([11, 12, 13])
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    cases = ((3, 0), (2**62 + 12345, 0), (7, 5), (12345678901234, 0))
    assert any(sequence_key(*c) >= 1 << 31 for c in cases)  # an int32 holding a negative value is exercised
    for seed, seq_id in cases:
        key = sequence_key(seed, seq_id)
        want = gumbel_noise(seed, seq_id, pos, 40)
        as_int32 = torch.tensor(key - (1 << 32) if key >= 1 << 31 else key, dtype=torch.int32)
        for k in (key, torch.tensor(key), as_int32):
            assert torch.equal(keyed_noise(k, pos, 40), want)
            assert torch.equal(keyed_logprobs(logits, 0.8, 5, 0.9, k, pos), perturbed_logprobs(logits, 0.8, 5, 0.9, seed, seq_id, pos))
    for bad in (-1, 1 << 32, 1.5, True, torch.tensor([1]), torch.tensor(1.0)):
        with pytest.raises(TypeError, match="key"):
            keyed_noise(bad, pos, 40)
    with pytest.raises(ValueError, match="temperature"):
        keyed_logprobs(logits, 0.0, 0, 1.0, 3, pos)
    with pytest.raises(TypeError, match="seed"):
        sequence_key("3", 0)


def test_noise_is_standard_gumbel():
    g = gumbel_noise(0, 0, torch.arange(200), 500).double().flatten()
    assert abs(g.mean().item() - 0.5772) < 0.01          # Euler-Mascheroni constant
    assert abs(g.var().item() - torch.pi ** 2 / 6) < 0.03
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (0.8, 0, 0.8)])
def test_keyed_samples_follow_the_processed_distribution(temperature, top_k, top_p):
    probs = logits_to_probs(LOGITS, temperature, top_k, top_p)
    exact = {(i,): float(p) for i, p in enumerate(probs) if p > 0}
    samples = [(int(keyed_choice(LOGITS, temperature, top_k, top_p, seed, 0, torch.tensor(5))),) for seed in range(1500)]
    res = chi_square_test(samples, exact)
    assert res.pvalue > 1e-3, res


def test_consecutive_positions_are_independent_and_a_reused_key_is_caught():
    """Pairs (x_t, x_{t+1}) from one seed follow p x p; reusing position t's noise at t + 1 (a wrong key)
    makes every pair equal and fails the same test."""
    probs = logits_to_probs(LOGITS, 1.0)
    exact = {(i, j): float(probs[i] * probs[j]) for i, j in itertools.product(range(6), repeat=2)}
    pairs = [tuple(int(t) for t in keyed_choice(LOGITS.expand(2, 6), 1.0, 0, 1.0, seed, 0, torch.tensor([10, 11])))
             for seed in range(1500)]
    assert chi_square_test(pairs, exact).pvalue > 1e-3
    wrong = [tuple(int(t) for t in keyed_choice(LOGITS.expand(2, 6), 1.0, 0, 1.0, seed, 0, torch.tensor([10, 10])))
             for seed in range(1500)]
    assert chi_square_test(wrong, exact).pvalue < 1e-6


def test_filtered_tokens_never_win_and_greedy_is_the_argmax():
    for seed in range(200):
        assert int(keyed_choice(LOGITS, 1.0, 2, 1.0, seed, 0, torch.tensor(3))) in (0, 3)
    assert int(keyed_choice(LOGITS, 0.0, 0, 1.0, 0, 0, torch.tensor(3))) == 3
    tied = torch.tensor([1.0, 5.0, 5.0, 0.0])
    assert int(keyed_choice(tied, 0.0, 0, 1.0, 0, 0, torch.tensor(0))) == 1   # lowest index wins a tie
    p = perturbed_logits(LOGITS, 1.0, 2, 1.0, 9, 0, torch.tensor(3))
    assert torch.isinf(p[[1, 2, 4, 5]]).all() and torch.isfinite(p[[0, 3]]).all()


def test_bad_keys():
    with pytest.raises(TypeError, match="seed"):
        check_seed("7")
    with pytest.raises(TypeError, match="seed"):
        check_seed(1.5)
    with pytest.raises(ValueError, match="seed"):
        check_seed(-1)
    assert check_seed(torch.tensor(5)) == 5
    with pytest.raises(ValueError, match="seq_id"):
        gumbel_noise(0, -1, torch.tensor([1]), 4)
    with pytest.raises(TypeError, match="positions"):
        gumbel_noise(0, 0, torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="temperature"):
        perturbed_logits(LOGITS, 0.0, 0, 1.0, 0, 0, torch.tensor(1))
