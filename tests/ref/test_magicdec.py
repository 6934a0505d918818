"""MagicDec self-speculation (reference): greedy equality, full acceptance with a huge window, lossless sampling."""

from __future__ import annotations

import pytest
import torch
from lossless import exact_sequence_distribution, lossless_check, tiny_model

from specdec.ref.magicdec import magicdec_generate, streaming_rows
from specdec.ref.vanilla import vanilla_generate


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _prompt(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_streaming_rows():
    assert streaming_rows(20, 4, 5).tolist() == [0, 1, 2, 3, 15, 16, 17, 18, 19]
    assert streaming_rows(6, 4, 5).tolist() == [0, 1, 2, 3, 4, 5]  # overlap: no duplicates
    assert streaming_rows(3, 4, 5).tolist() == [0, 1, 2]
    assert streaming_rows(10, 0, 3).tolist() == [7, 8, 9]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_vanilla(family, seed):
    target = tiny_model(family, vocab=32, seed=seed)
    prompt = _prompt(32, 30 + 5 * seed, seed)
    n = prompt.shape[1]
    want = vanilla_generate(target, prompt, n, max_gen_len=24, eos_id=[]).tolist()
    for gamma, sinks, window in [(4, 4, 8), (3, 0, 5), (1, 2, 2), (5, 4, 256)]:
        res = magicdec_generate(target, prompt, n, gamma=gamma, sink_tokens=sinks, window=window, max_gen_len=24, eos_id=[])
        assert res.tolist() == want, (gamma, sinks, window)
        assert res.count == int(res.spec_mask.sum())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_window_larger_than_context_is_always_right(family):
    target = tiny_model(family, vocab=32, seed=7)
    prompt = _prompt(32, 40, 7)
    gamma, n_gen = 4, 41
    res = magicdec_generate(target, prompt, 40, gamma=gamma, sink_tokens=4, window=1000, max_gen_len=n_gen, eos_id=[])
    assert res.tolist() == vanilla_generate(target, prompt, 40, max_gen_len=n_gen, eos_id=[]).tolist()
    # Every round accepts all gamma drafts: 1 (prefill) + 8 rounds of 5 tokens = 41.
    assert res.accept_lengths == [1] + [gamma + 1] * 8
    assert res.count == 8 * gamma and res.num == 9
    # A small window on the same prompt drafts worse.
    small = magicdec_generate(target, prompt, 40, gamma=gamma, sink_tokens=1, window=2, max_gen_len=n_gen, eos_id=[])
    assert small.count < res.count


def test_sampling_is_lossless():
    target = tiny_model("llama", vocab=8, seed=3)
    prompt = torch.tensor([[1, 5, 2, 7, 3, 3, 0, 6]])
    exact = exact_sequence_distribution(target, prompt, 2, temperature=1.0, top_p=0.9)

    def decode(**kw):
        return magicdec_generate(target, gamma=2, sink_tokens=1, window=2, **kw)

    res = lossless_check(decode, target, prompt, n_samples=500, n_tokens=2, temperature=1.0, top_p=0.9, exact=exact, max_gen_len=3)
    assert res.pvalue >= 1e-3


def test_bad_args():
    target = tiny_model("llama", vocab=8, seed=0)
    prompt = torch.tensor([[1, 2, 3]])
    for kw in (dict(gamma=0), dict(window=0), dict(sink_tokens=-1), dict(temperature=-1.0)):
        with pytest.raises(ValueError):
            magicdec_generate(target, prompt, 3, **kw)
