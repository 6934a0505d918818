"""Under the Triton interpreter (CPU), ``tl.dot`` gives a row the same bits wherever it sits in the tile.

The decode phase's CPU tests (row == its one-token step, whatever M, the batch or the method) rest on this, as
the GPU's MMA does; a BLAS GEMM computes a tile's rows by different instruction sequences on some CPUs
(:func:`specdec.fast.kernels._common.make_interpreter_dot_row_invariant`)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import specdec  # noqa: F401  -- picks the Triton interpreter on CPU first
from specdec.fast.kernels import interpreter_active

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="the interpreter's dot (CPU only)")


@triton.jit
def _tile_dot(A, B, C, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rm, rk, rn = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b, input_precision="ieee"))


@pytest.mark.parametrize("k,n", [(64, 32), (128, 64), (16, 16)])
def test_a_row_of_the_interpreters_dot_does_not_depend_on_its_place_in_the_tile(k, n):
    g = torch.Generator().manual_seed(k + n)
    a = torch.randn(16, k, generator=g)
    b = torch.randn(k, n, generator=g)
    full = torch.empty(16, n)
    _tile_dot[(1,)](a, b, full, 16, k, n)
    for i in range(16):
        alone = torch.zeros(16, k)
        alone[0] = a[i]
        got = torch.empty(16, n)
        _tile_dot[(1,)](alone, b, got, 16, k, n)
        assert torch.equal(got[0], full[i]), i
    torch.testing.assert_close(full, a @ b, atol=1e-4, rtol=1e-4)
