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


def _rms_scaled(x, g, eps):
    """The exactly-normed input of the folded RMSNorm (in fp64, never rounded -- as the kernel)."""
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * g.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(37, 100), (130, 2100)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_norm_prologue(dtype, n, k, bias):
    """norm_weight: the product of the (unrounded) RMSNorm of x, within the GEMV's own bound."""
    x, w, b = _inputs(n, k, dtype, bias=bias, seed=2)
    x = x * 3.0 + 0.5                                   # a row far from unit RMS: the scale matters
    g = (torch.rand(k, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype).to(DEV)
    got = K.gemv(x, w, b, norm_weight=g, eps=1e-5)
    assert got.shape == (1, 1, n) and got.dtype == dtype
    hn = _rms_scaled(x, g, 1e-5)
    want = F.linear(hn, w.double(), None if b is None else b.double())
    mag = F.linear(hn.abs(), w.double().abs(), None if b is None else b.double().abs())
    eps = torch.finfo(dtype).eps * (1.0 if CUDA or dtype != torch.bfloat16 else 2.0)
    tol = eps * want.abs() + 4 * k * torch.finfo(torch.float32).eps * mag + 1e-30
    assert ((got.double() - want).abs() <= tol).all(), (got.double() - want).abs().max()
    # and within rounding of the eager reference (which rounds the normed row to the dtype)
    ref = K.gemv_ref(x, w, b, norm_weight=g, eps=1e-5)
    scale = ref.double().abs().max()
    assert (got.double() - ref.double()).abs().max() <= 8 * torch.finfo(dtype).eps * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_residual_epilogue_is_the_eager_add(dtype):
    """residual: the rounded product plus the residual, rounded once -- bitwise the eager add."""
    x, w, b = _inputs(70, 300, dtype, bias=True, seed=4)
    res = torch.randn(1, 1, 70, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEV)
    plain = K.gemv(x, w, b)
    got = K.gemv(x, w, b, residual=res)
    g = torch.ones(300, dtype=dtype, device=DEV)
    both = K.gemv(x, w, b, norm_weight=g, eps=1e-6, residual=res)   # the kernel allows both at once
    pairs = [(got, res + plain), (both, res + K.gemv(x, w, b, norm_weight=g, eps=1e-6))]
    for a, want in pairs:
        if CUDA or dtype != torch.bfloat16:
            assert torch.equal(a, want)
        else:  # the interpreter's bf16 casts truncate instead of rounding to nearest: one ulp
            assert ((a.double() - want.double()).abs() <= 2**-7 * want.double().abs()).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_silu_norm_prologue(dtype):
    f, k = 45, 700
    x, w, b = _inputs(2 * f, k, dtype, bias=True, seed=6)
    g = (torch.rand(k, generator=torch.Generator().manual_seed(7)) + 0.5).to(dtype).to(DEV)
    got = K.gemv_silu(x * 2.0, w, b, norm_weight=g, eps=1e-6)
    ref = K.gemv_silu_ref(x * 2.0, w, b, norm_weight=g, eps=1e-6)
    assert got.shape == ref.shape == (1, 1, f)
    # the activation of the exact normed product, rounded like the eager ops (gate/up, silu, product)
    gu = F.linear(_rms_scaled(x * 2.0, g, 1e-6), w.double(), b.double())
    gate, up = gu.to(dtype).float().chunk(2, dim=-1)
    want = (F.silu(gate).to(dtype).float() * up.float()).to(dtype)
    scale = want.double().abs().max().clamp_min(1e-3)
    ulps = 4 if dtype != torch.float32 else 64
    assert (got.double() - want.double()).abs().max() <= ulps * torch.finfo(dtype).eps * scale
    assert (got.double() - ref.double()).abs().max() <= 16 * torch.finfo(dtype).eps * scale


def test_gemv_norm_and_residual_bad_inputs():
    x, w, _ = _inputs(8, 32, torch.float32)
    g = torch.ones(32, device=DEV)
    with pytest.raises(ValueError, match=r"norm_weight must be a tensor of shape \[K\] = \[32\]"):
        K.gemv(x, w, norm_weight=g[:31])
    with pytest.raises(TypeError, match="norm_weight must be a torch.Tensor"):
        K.gemv(x, w, norm_weight=[1.0] * 32)
    for bad in (-1e-6, float("nan"), float("inf"), True, "1e-6"):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            K.gemv(x, w, norm_weight=g, eps=bad)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(1, 1, 8\)"):
        K.gemv(x, w, residual=torch.zeros(1, 9, device=DEV))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        K.gemv(x, w, residual=torch.zeros(1, 1, 8, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="norm_weight must be"):
        K.gemv_silu(x, torch.randn(8, 32, device=DEV), norm_weight=g[:5])


def _rope_case(dtype, b=1, m=1, hq=2, hkv=1, d=64, k=100, cap=9, bias=True, seed=9):
    g = torch.Generator().manual_seed(seed)
    width = (hq + 2 * hkv) * d
    x = torch.randn(b, m, k, generator=g).to(dtype).to(DEV)
    w = (torch.randn(width, k, generator=g) / k**0.5).to(dtype).to(DEV)
    bq = torch.randn(width, generator=g).to(dtype).to(DEV) if bias else None
    ang = torch.rand(b, m, d // 2, generator=g) * 6.0
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype).to(DEV)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype).to(DEV)
    kc = torch.randn(b, hkv, cap, d, generator=g).to(dtype).to(DEV)
    vc = torch.randn(b, hkv, cap, d, generator=g).to(dtype).to(DEV)
    rows = torch.stack([torch.randperm(cap, generator=g)[:m] for _ in range(b)]).to(torch.int32).to(DEV)
    nw = (torch.rand(k, generator=g) + 0.5).to(dtype).to(DEV)
    return x, w, bq, cos, sin, kc, vc, rows, nw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,hq,hkv,norm,bias", [(1, 1, 2, 1, True, True), (1, 1, 3, 3, False, False), (2, 3, 4, 2, True, False)])
def test_gemv_qkv_rope_matches_projection_then_rope(dtype, b, m, hq, hkv, norm, bias):
    """q out, k (rotated) and v into their cache rows -- as gemv_ref + rope_qkv_write_ref; nothing else written."""
    x, w, bq, cos, sin, kc, vc, rows, nw = _rope_case(dtype, b, m, hq, hkv, bias=bias)
    kw = dict(norm_weight=nw, eps=1e-5) if norm else {}
    kc2, vc2 = kc.clone(), vc.clone()
    q = K.gemv_qkv_rope(x, w, bq, cos, sin, kc, vc, rows, **kw)
    q_ref = K.gemv_qkv_rope_ref(x, w, bq, cos, sin, kc2, vc2, rows, **kw)
    assert q.shape == q_ref.shape == (b, hq, m, 64) and q.dtype == dtype
    tol = (8 if dtype != torch.float32 else 64) * torch.finfo(dtype).eps
    for got, want in ((q, q_ref), (kc, kc2), (vc, vc2)):
        scale = want.double().abs().max()
        assert (got.double() - want.double()).abs().max() <= tol * scale
    written = torch.zeros_like(kc, dtype=torch.bool)
    for bi in range(b):
        written[bi, :, rows[bi].long()] = True
    k0, v0 = _rope_case(dtype, b, m, hq, hkv, bias=bias)[5:7]     # the untouched caches
    assert torch.equal(kc[~written], k0[~written]) and torch.equal(vc[~written], v0[~written])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,hq,norm,bias", [(1, 1, 2, True, True), (1, 1, 3, False, False), (2, 3, 4, True, False)])
def test_gemv_q_rope_is_the_projection_then_rope_q(dtype, b, m, hq, norm, bias):
    """The query-only form: bitwise the library's own two launches (gemv, then rope_q), and within rounding of the
    eager reference. Query heads only: a q|k|v weight's query rows give gemv_qkv_rope's q."""
    x, w, bq, cos, sin, kc, vc, rows, nw = _rope_case(dtype, b, m, hq, 1, bias=bias)
    kw = dict(norm_weight=nw, eps=1e-5) if norm else {}
    wq, bqq = w[: hq * 64], (bq[: hq * 64] if bias else None)
    q = K.gemv_q_rope(x, wq, bqq, cos, sin, **kw)
    assert q.shape == (b, hq, m, 64) and q.dtype == dtype and q.is_contiguous()
    if not CUDA:   # the interpreter never contracts; on the GPU each kernel's compiler may fuse the rotation's FMAs
        assert torch.equal(q, K.rope_q(K.gemv(x, wq, bqq, **kw), cos, sin))
    assert torch.equal(q, K.gemv_qkv_rope(x, w, bq, cos, sin, kc, vc, rows, **kw))
    want = K.gemv_q_rope_ref(x, wq, bqq, cos, sin, **kw)
    tol = (8 if dtype != torch.float32 else 64) * torch.finfo(dtype).eps
    assert (q.double() - want.double()).abs().max() <= tol * want.double().abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,hq,hkv,norm,bias", [(1, 1, 2, 1, True, True), (1, 4, 2, 2, True, False), (2, 3, 4, 2, False, True)])
def test_embed_gemv_qkv_rope_is_the_lookup_then_gemv_qkv_rope(dtype, b, m, hq, hkv, norm, bias):
    """The embedding lookup inside the launch: the same q, the same cache writes, bit for bit, as F.embedding then
    gemv_qkv_rope, and the embeddings themselves returned (int64 and int32 ids)."""
    x, w, bq, cos, sin, kc, vc, rows, nw = _rope_case(dtype, b, m, hq, hkv, bias=bias)
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(50, x.shape[-1], generator=g).to(dtype).to(DEV)
    tokens = torch.randint(0, 50, (b, m), generator=g).to(DEV)
    kw = dict(norm_weight=nw, eps=1e-5) if norm else {}
    kc2, vc2 = kc.clone(), vc.clone()
    want_x = F.embedding(tokens, embed)
    want_q = K.gemv_qkv_rope(want_x, w, bq, cos, sin, kc2, vc2, rows, **kw)
    for ids in (tokens, tokens.to(torch.int32)):
        q, got_x = K.embed_gemv_qkv_rope(ids, embed, w, bq, cos, sin, kc, vc, rows, **kw)
        assert torch.equal(got_x, want_x) and torch.equal(q, want_q)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_embed_gemv_qkv_rope_bad_inputs():
    x, w, bq, cos, sin, kc, vc, rows, nw = _rope_case(torch.float32)
    embed = torch.randn(50, x.shape[-1], device=DEV)
    tokens = torch.zeros(1, 1, dtype=torch.long, device=DEV)
    with pytest.raises(TypeError, match="tokens must be an int32/int64 tensor"):
        K.embed_gemv_qkv_rope(tokens.float(), embed, w, bq, cos, sin, kc, vc, rows)
    with pytest.raises(TypeError, match="embed and wqkv must share one dtype"):
        K.embed_gemv_qkv_rope(tokens, embed.half(), w, bq, cos, sin, kc, vc, rows)
    with pytest.raises(ValueError, match="wqkv must be"):
        K.embed_gemv_qkv_rope(tokens, embed[:, :50], w, bq, cos, sin, kc, vc, rows)
    with pytest.raises(ValueError, match=r"cos must have shape \[B, M, D\]"):
        K.embed_gemv_qkv_rope(torch.zeros(1, 2, dtype=torch.long, device=DEV), embed, w, bq, cos, sin, kc, vc, rows)


def test_gemv_q_rope_bad_inputs():
    x, w, bq, cos, sin, kc, vc, rows, nw = _rope_case(torch.float32)
    wq = w[:128]
    with pytest.raises(ValueError, match=r"wq's rows must be Hq \* D"):
        K.gemv_q_rope(x, wq[:100], None, cos, sin)
    with pytest.raises(ValueError, match="wq must be"):
        K.gemv_q_rope(x, wq[:, :50], None, cos, sin)
    with pytest.raises(ValueError, match=r"cos must have shape \[B, M, D\]"):
        K.gemv_q_rope(x, wq, None, torch.cat([cos, cos], 1), sin)   # M = 2 for one token
    with pytest.raises(ValueError, match="head dim"):
        K.gemv_q_rope(x, wq[:120], None, cos[..., :40], sin[..., :40])   # not a multiple of 16
    with pytest.raises(ValueError, match="norm_weight must be"):
        K.gemv_q_rope(x, wq, None, cos, sin, norm_weight=nw[:5])
    with pytest.raises(ValueError, match="bq must be"):
        K.gemv_q_rope(x, wq, bq[:7], cos, sin)
    with pytest.raises(TypeError, match="share one dtype"):
        K.gemv_q_rope(x.half(), wq, None, cos, sin)


def test_gemv_qkv_rope_bad_inputs():
    x, w, bq, cos, sin, kc, vc, rows, nw = _rope_case(torch.float32)
    with pytest.raises(ValueError, match=r"wqkv's rows must be \(Hq \+ 2 Hkv\) \* D"):
        K.gemv_qkv_rope(x, w[:128], None, cos, sin, kc, vc, rows)
    with pytest.raises(ValueError, match="wqkv must be"):
        K.gemv_qkv_rope(x, w[:, :50], None, cos, sin, kc, vc, rows)
    with pytest.raises(ValueError, match=r"cos must have shape \[B, M, D\]"):
        K.gemv_qkv_rope(x, w, bq, cos[..., :32], sin, kc, vc, rows)
    with pytest.raises(ValueError, match="head dim"):
        K.gemv_qkv_rope(x, w, bq, cos, sin, kc[..., :40], vc[..., :40], rows)   # not a multiple of 16
    with pytest.raises(ValueError, match="norm_weight must be"):
        K.gemv_qkv_rope(x, w, bq, cos, sin, kc, vc, rows, norm_weight=nw[:5])
    with pytest.raises(ValueError, match="bqkv must be"):
        K.gemv_qkv_rope(x, w, bq[:7], cos, sin, kc, vc, rows)
    with pytest.raises(TypeError, match="share one dtype"):
        K.gemv_qkv_rope(x.half(), w, bq, cos, sin, kc, vc, rows)
    with pytest.raises(ValueError, match=r"rows must be in \[0, capacity\) = \[0, 9\); got range \[9, 9\]"):
        K.gemv_qkv_rope(x, w, bq, cos, sin, kc, vc, torch.full_like(rows, 9))
    with pytest.raises(ValueError, match=r"got range \[-1, -1\]"):
        K.gemv_qkv_rope(x, w, bq, cos, sin, kc, vc, torch.full_like(rows, -1))


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


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(12288, 4096), (128256, 4096)])
def test_gpu_gemv_norm_and_residual_8b_shapes(n, k):
    if not CUDA:
        pytest.skip("needs CUDA")
    x, w, _ = _inputs(n, k, torch.bfloat16, bias=False, seed=8)
    g = (torch.rand(k, device=DEV) + 0.5).to(torch.bfloat16)
    got = K.gemv(x * 4.0, w, norm_weight=g, eps=1e-5)
    ref = K.gemv_ref(x * 4.0, w, norm_weight=g, eps=1e-5)
    assert (got.float() - ref.float()).abs().max() <= 8 * 2**-8 * ref.float().abs().max()
    res = torch.randn(1, 1, n, device=DEV, dtype=torch.bfloat16)
    assert torch.equal(K.gemv(x, w, residual=res), res + K.gemv(x, w))
