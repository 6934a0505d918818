"""The keyed-noise kernel (fast/kernels/keyed.py) against specdec.shared.keyed.keyed_noise, bit for bit.

CPU: under the Triton interpreter (CI). GPU (``-m gpu``): on CUDA against the same function run by torch on
CUDA. Every case compares the whole noise tensor with ``torch.equal`` and the integer hash through the
noise's ordering (a wrong bit in the 32-bit hash changes the noise value).
"""

from __future__ import annotations

import pytest
import torch

from specdec.shared.keyed import keyed_noise as keyed_noise_ref
from specdec.shared.keyed import sequence_key

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _kernel():
    from specdec.fast.kernels.keyed import keyed_noise

    return keyed_noise


CASES = [
    (sequence_key(7, 0), [0, 1, 2, 65535, 2**31 - 5], 67),
    (sequence_key(2**40 + 3, 5), [[17, 18], [4096, 123456]], 1500),     # V over one block, 2-D positions
    (0, [3], 1),
    (2**32 - 1, [2**32 + 9, 10], 33),                                     # key and a position past 32 bits
]


@pytest.mark.parametrize("key,positions,vocab", CASES)
def test_keyed_noise_kernel_equals_shared_bitwise(key, positions, vocab):
    pos = torch.tensor(positions)
    got = _kernel()(key, pos, vocab)
    want = keyed_noise_ref(key, pos, vocab)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got, want)


def test_keyed_noise_kernel_token_ids_and_tensor_key():
    pos = torch.tensor([5, 900])
    ids = torch.tensor([0, 3, 4095, 77, 2**33 + 1])
    key = sequence_key(11, 2)
    assert torch.equal(_kernel()(torch.tensor(key), pos, 4096, token_ids=ids), keyed_noise_ref(key, pos, 4096, token_ids=ids))


def test_keyed_noise_kernel_bad_input_is_a_clear_error():
    kn = _kernel()
    with pytest.raises(TypeError, match="positions must hold integers"):
        kn(1, torch.tensor([1.0]), 8)
    with pytest.raises(TypeError, match=r"key must be an int in \[0, 2\*\*32\)"):
        kn(-1, torch.tensor([1]), 8)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 1"):
        kn(1, torch.tensor([1]), 0)
    with pytest.raises(TypeError, match="token_ids must be a 1-D integer tensor"):
        kn(1, torch.tensor([1]), 8, token_ids=torch.tensor([[1]]))


@pytest.mark.gpu
def test_gpu_keyed_noise_kernel_equals_torch_on_cuda():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 2**31 - 1, (64,), generator=gen).cuda()
    for key in (sequence_key(1, 0), sequence_key(3**30, 7)):
        assert torch.equal(_kernel()(key, pos, 128256), keyed_noise_ref(key, pos, 128256))
