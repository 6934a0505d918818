"""The decode-step GEMV kernels (:mod:`specdec.fast.kernels.gemv`) against ``F.linear`` / silu_mul.

Without CUDA they run under the Triton interpreter on small shapes (odd N, K with a tail tile,
bias, several rows); ``@pytest.mark.gpu`` tests run the 8B-model shapes and CUDA-graph capture.

Exactness: the kernel accumulates in fp32 in its own order, so it is compared with the exact
product of the same (rounded) inputs: at most one rounding of the output dtype plus the fp32
summation error bound ``K * eps32 * sum |x_k w_k|``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_device

from specdec.fast import kernels as K

DEV = kernel_device()
CUDA = DEV == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _exact_linear(x, w, b):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    mag = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    return y, mag


def _check_linear(got, x, w, b):
    want, mag = _exact_linear(x, w, b)
    eps = torch.finfo(got.dtype).eps * (1.0 if CUDA or got.dtype != torch.bfloat16 else 2.0)  # interpreter truncates
    tol = eps * want.abs() + x.shape[-1] * torch.finfo(torch.float32).eps * mag + 1e-30
    bad = (got.double() - want).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} outputs off; max diff {(got.double() - want).abs().max().item():.3e}"


def _inputs(n, k, dtype, rows=(1, 1), bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEV)
    b = torch.randn(n, generator=g).to(dtype).to(DEV) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(37, 100), (64, 64), (130, 2100), (1, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(dtype, n, k, bias):
    x, w, b = _inputs(n, k, dtype, bias=bias)
    got = K.gemv(x, w, b)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    _check_linear(got, x, w, b)


def test_gemv_several_rows_and_strided_input():
    x, w, b = _inputs(50, 300, torch.float32, rows=(3,))
    _check_linear(K.gemv(x, w, b), x, w, b)
    xt = torch.randn(300, 2, device=DEV)[:, 0]          # a non-contiguous row
    _check_linear(K.gemv(xt, w, b), xt, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f,k", [(37, 100), (64, 2100)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_silu_matches_eager_ops(dtype, f, k, bias):
    x, w, b = _inputs(2 * f, k, dtype, bias=bias, seed=1)
    got = K.gemv_silu(x, w, b)
    assert got.shape == (1, 1, f) and got.dtype == dtype
    # the eager ops on the exactly-rounded GEMM output: gate/up rounded once, silu rounded, product rounded
    gu, _ = _exact_linear(x, w, b)
    gate, up = gu.to(dtype).float().chunk(2, dim=-1)
    want = (F.silu(gate).to(dtype).float() * up.float()).to(dtype)
    scale = want.double().abs().max().clamp_min(1e-3)
    ulps = 4 if dtype != torch.float32 else 64       # gate/up may round the other way (fp32 order)
    diff = (got.double() - want.double()).abs()
    assert diff.max() <= ulps * torch.finfo(dtype).eps * scale, diff.max()
    # and the public reference agrees
    ref = K.gemv_silu_ref(x, w, b)
    assert ref.shape == got.shape


def test_gemv_bad_inputs():
    x, w, b = _inputs(8, 32, torch.float32)
    with pytest.raises(ValueError, match="K = 32"):
        K.gemv(torch.randn(1, 31, device=DEV), w)
    with pytest.raises(ValueError, match=r"w \[N, K\]"):
        K.gemv(x, w[0])
    with pytest.raises(TypeError, match="share one dtype"):
        K.gemv(x, w.half())
    with pytest.raises(TypeError, match="dtype"):
        K.gemv(x.long(), w)
    with pytest.raises(ValueError, match="bias must be"):
        K.gemv(x, w, b[:3])
    with pytest.raises(ValueError, match="odd row count"):
        K.gemv_silu(x, torch.randn(7, 32, device=DEV))
    with pytest.raises(TypeError, match="torch.Tensor"):
        K.gemv([1.0], w)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,silu", [(6144, 4096, False), (4096, 14336, False), (128256, 4096, False),
                                      (28672, 4096, True), (22016, 4096, True), (4096, 11008, False)])
def test_gpu_gemv_8b_shapes(n, k, silu):
    if not CUDA:
        pytest.skip("needs CUDA")
    x, w, _ = _inputs(n, k, torch.bfloat16, bias=False)
    if silu:
        got = K.gemv_silu(x, w)
        ref = K.gemv_silu(x, w)  # deterministic
        assert torch.equal(got, ref)
        gate, up = F.linear(x.float(), w.float()).to(torch.bfloat16).float().chunk(2, dim=-1)
        want = (F.silu(gate).to(torch.bfloat16).float() * up).to(torch.bfloat16)
        assert (got.float() - want.float()).abs().max() <= 8 * 2**-8 * want.float().abs().max()
    else:
        _check_linear(K.gemv(x, w), x, w, None)


@pytest.mark.gpu
def test_gpu_gemv_in_a_cuda_graph():
    if not CUDA:
        pytest.skip("needs CUDA")
    x, w, b = _inputs(4096, 4096, torch.bfloat16)
    eager = K.gemv(x, w, b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        K.gemv(x, w, b)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = K.gemv(x, w, b)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out, eager)
    _check_linear(out, x, w, b)
