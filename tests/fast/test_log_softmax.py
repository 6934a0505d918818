"""The fp32 log-softmax of 16-bit logits (:mod:`specdec.fast.kernels.log_softmax`) against
``torch.log_softmax`` of the fp32 cast.

Without CUDA it runs under the Triton interpreter on small shapes (one tile, several tiles with a tail, V = 1,
-inf entries); ``@pytest.mark.gpu`` tests run the draft vocabularies (4096, 32768, 128256 columns).

Exactness: the kernel sums ``exp(x - max)`` in its own order (tile by tile, rescaled at each new maximum), so
it is compared with the exact log-softmax (float64 of the same bf16 / fp16 inputs) within a few fp32 roundings
of the log-sum-exp: ``|y - exact| <= 8 eps32 (|y| + |lse|)``. What must hold bit for bit: a row's values do not
depend on the other rows of the call, on the row stride, or on anything outside the row.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kernel_device

from specdec.fast import kernels as K
from specdec.fast.kernels.log_softmax import KERNEL_MAX_V

DEV = kernel_device()
CUDA = DEV == "cuda"
DTYPES = [torch.bfloat16, torch.float16]


def _logits(p, v, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(p, v, generator=g) * scale).to(dtype).to(DEV)


def _check(got, x):
    xd = x.double()
    lse = torch.logsumexp(xd, dim=-1, keepdim=True)
    want = xd - lse
    tol = 8 * torch.finfo(torch.float32).eps * (want.abs() + lse.abs()) + 1e-30
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), "non-finite entries differ"
    bad = ((got.double() - want).abs() > tol) & finite
    assert not bad.any(), f"{int(bad.sum())} values off; max diff {(got.double() - want)[finite].abs().max().item():.3e}"
    assert got.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v,block", [(1, None), (7, None), (300, None), (300, 64), (1000, 128), (257, 16)])
def test_matches_the_exact_log_softmax(dtype, v, block):
    x = _logits(5, v, dtype, seed=v)
    got = K.log_softmax_f32(x, block=block)
    _check(got, x)
    # and PyTorch's own fp32 log-softmax within the same bound
    torch.testing.assert_close(got, torch.log_softmax(x.float(), dim=-1), rtol=1e-6, atol=2e-5)


def test_minus_inf_entries_and_a_dominant_maximum():
    x = _logits(3, 200, torch.bfloat16, seed=1)
    x[0, ::3] = float("-inf")          # masked tokens: exp(-inf) = 0, log-prob -inf
    x[1, 17] = 80.0                    # one entry far above the rest, found in the last tile of the walk
    x[2, 199] = 60.0
    for block in (None, 16, 64):
        got = K.log_softmax_f32(x, block=block)
        _check(got, x)
        assert torch.isinf(got[0, ::3]).all() and (got[0, ::3] < 0).all()


@pytest.mark.parametrize("block", [None, 32])
def test_a_row_is_the_same_bits_alone_in_a_batch_and_strided(block):
    x = _logits(6, 333, torch.bfloat16, seed=3)
    full = K.log_softmax_f32(x, block=block)
    for r in range(6):
        assert torch.equal(K.log_softmax_f32(x[r : r + 1], block=block)[0], full[r])
    # rows of a wider buffer (row stride 400), the columns past V poisoned with NaN and +inf
    buf = torch.full((6, 400), float("nan"), dtype=torch.bfloat16, device=DEV)
    buf[:, 333:340] = float("inf")
    buf[:, :333] = x
    assert torch.equal(K.log_softmax_f32(buf[:, :333], block=block), full)


def test_writes_only_its_out_view():
    x = _logits(4, 100, torch.float16, seed=4)
    poison = torch.full((6, 128), float("nan"), dtype=torch.float32, device=DEV)
    out = poison[1:5, 10:110]
    assert K.log_softmax_f32(x, out=out, block=32) is out
    assert torch.equal(out, K.log_softmax_f32(x, block=32))
    mask = torch.ones_like(poison, dtype=torch.bool)
    mask[1:5, 10:110] = False
    assert torch.isnan(poison[mask]).all()   # nothing written outside the view


def test_no_rows():
    x = torch.empty(0, 50, dtype=torch.bfloat16, device=DEV)
    assert K.log_softmax_f32(x).shape == (0, 50)


def test_bad_inputs():
    x = _logits(2, 10, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        K.log_softmax_f32(x.float())
    with pytest.raises(ValueError, match=r"\[P, V\]"):
        K.log_softmax_f32(x[0])
    with pytest.raises(ValueError, match="V >= 1"):
        K.log_softmax_f32(x[:, :0])
    with pytest.raises(ValueError, match="unit stride"):
        K.log_softmax_f32(x.t())
    with pytest.raises(ValueError, match="out must be a float32"):
        K.log_softmax_f32(x, out=torch.empty(2, 10, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="out must be a float32"):
        K.log_softmax_f32(x, out=torch.empty(2, 11, device=DEV))
    with pytest.raises(ValueError, match="power of two"):
        K.log_softmax_f32(x, block=48)


def test_logprobs_f32_keeps_torch_bits_off_cuda_and_for_fp32():
    """fp32 logits (the reference's dtype) and any CPU logits take PyTorch's log-softmax, bit for bit."""
    for dtype in (torch.float32, torch.bfloat16):
        x = _logits(3, 64, dtype).cpu()
        assert torch.equal(K.logprobs_f32(x), torch.log_softmax(x, dim=-1, dtype=torch.float32))
    x3 = _logits(6, 64, torch.float32).cpu().view(2, 3, 64)
    assert torch.equal(K.logprobs_f32(x3), torch.log_softmax(x3, dim=-1))


def test_the_kernel_serves_16_bit_cuda_logits_up_to_the_measured_width():
    """logprobs_f32's rule: the kernel for bf16 / fp16 on CUDA up to KERNEL_MAX_V columns (a 32k draft vocabulary);
    a full 128k vocabulary, fp32, or the CPU keep PyTorch's log-softmax."""
    from specdec.fast.kernels.log_softmax import uses_log_softmax_kernel

    assert KERNEL_MAX_V == 32768
    for dtype in (torch.bfloat16, torch.float16):
        assert uses_log_softmax_kernel(4096, dtype, True) and uses_log_softmax_kernel(32768, dtype, True)
        assert not uses_log_softmax_kernel(32769, dtype, True) and not uses_log_softmax_kernel(128256, dtype, True)
        assert not uses_log_softmax_kernel(4096, dtype, False) and not uses_log_softmax_kernel(0, dtype, True)
    assert not uses_log_softmax_kernel(4096, torch.float32, True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("v", [4096, 32768, 128256])
def test_gpu_draft_vocabularies(v):
    x = _logits(7, v, torch.bfloat16, seed=v)
    got = K.log_softmax_f32(x)
    _check(got, x)
    assert torch.equal(got, K.log_softmax_f32(x.clone()))   # run to run the same bits (several tiles past 4096)
    # logprobs_f32 takes the kernel for 16-bit CUDA logits up to KERNEL_MAX_V columns (any leading shape), PyTorch's
    # log-softmax past it; the kernel stays graph-capturable at every width
    x3 = x.view(1, 7, v)
    want = got if v <= KERNEL_MAX_V else torch.log_softmax(x, dim=-1, dtype=torch.float32)
    assert torch.equal(K.logprobs_f32(x3), want.view(1, 7, v))
    out = torch.empty_like(got)
    K.log_softmax_f32(x, out=out)   # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        K.log_softmax_f32(x, out=out)
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, got)
