"""The fused elementwise kernels of a decoder layer against their torch references.

:mod:`specdec.fast.kernels.fused`: ``rms_norm``, ``add_rms_norm``, ``rope_qkv_write``, ``silu_mul``.
Without CUDA they run under the Triton interpreter on small shapes; ``@pytest.mark.gpu`` tests
run the full matrix (dtypes x head dims x GQA x M, Llama-sized rows) and CUDA-graph capture.

Exactness: RoPE (and the residual add) must be bitwise identical to the eager ops on the GPU in
every dtype (the kernel rounds after each op like them, with FMA contraction off). RMSNorm and
SiLU differ from torch only by reduction order / exp, i.e. within a couple of ulps. The Triton
interpreter converts fp32 -> bf16 by truncation (not round-to-nearest), so on CPU bf16 results are
checked to within a few ulps instead of bitwise.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kernel_device, outside_untouched, poisoned_view

from specdec.fast import kernels as K
from specdec.shared.config import ModelConfig
from specdec.shared.rope import rope_cos_sin

DEV = kernel_device()
CUDA = DEV == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_ulps(got: torch.Tensor, want: torch.Tensor, ulps: float, what: str = "") -> None:
    """|got - want| <= ulps * ulp(want) elementwise (ulp ~ eps * |want|, with a floor near 0)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    fi = torch.finfo(want.dtype)
    if not CUDA and want.dtype == torch.bfloat16:
        ulps = max(ulps, 4.0)   # the interpreter truncates every fp32 -> bf16 cast
    g, w = got.double(), want.double()
    tol = ulps * fi.eps * w.abs().clamp_min(fi.tiny * 1e3) + 1e-30
    bad = (g - w).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by more than {ulps} ulp; max diff {(g - w).abs().max().item():.3e}"


def exact_or_ulp(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Bitwise on the GPU and for fp32/fp16; within a few ulps for bf16 under the interpreter (truncating casts)."""
    if CUDA or want.dtype != torch.bfloat16:
        assert torch.equal(got, want), f"{what}: max diff {(got.double() - want.double()).abs().max().item():.3e}"
    else:  # several truncations, then cancellation in x*cos + rot*sin: a few ulps of the inputs' scale
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=4 * torch.finfo(want.dtype).eps * scale, msg=what)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _strided(shape, dtype, gen, kind: str) -> torch.Tensor:
    """A [.., C] tensor laid out contiguously, as a column slice of a wider one, or transposed in memory."""
    if kind == "contig":
        return torch.randn(shape, generator=gen).to(dtype).to(DEV)
    if kind == "slice":
        wide = torch.randn(tuple(shape[:-1]) + (shape[-1] + 24,), generator=gen).to(dtype).to(DEV)
        return wide[..., 8 : 8 + shape[-1]]
    t = torch.randn(tuple(reversed(shape)), generator=gen).to(dtype).to(DEV)   # memory order reversed
    return t.permute(*reversed(range(len(shape))))


# ---------------------------------------------------------------------------------------------
# RMSNorm / add + RMSNorm
# ---------------------------------------------------------------------------------------------


def _check_norm(shape, dtype, kind, seed=0, w_dtype=None):
    gen = _gen(seed)
    x = _strided(shape, dtype, gen, kind)
    r = _strided(shape, dtype, gen, "contig") * 4
    w = (torch.rand(shape[-1], generator=gen) + 0.5).to(w_dtype or dtype).to(DEV)
    ulps = 16.0 if dtype == torch.float32 else 2.0   # fp32: reduction order and rsqrt, ~1e-6 relative
    got = K.rms_norm(x, w, 1e-5)
    assert got.is_contiguous()
    assert_ulps(got, K.rms_norm_ref(x, w, 1e-5), ulps, "rms_norm")
    normed, new_res = K.add_rms_norm(x, r, w, 1e-5)
    want_n, want_r = K.add_rms_norm_ref(x, r, w, 1e-5)
    exact_or_ulp(new_res, want_r, "add_rms_norm residual")
    assert_ulps(normed, want_n, ulps, "add_rms_norm normed")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contig", "slice", "transposed"])
def test_rms_norm_matches_ref(dtype, kind):
    _check_norm((2, 3, 96), dtype, kind)


def test_rms_norm_shapes_and_promotion():
    _check_norm((5, 200), torch.float32, "contig", seed=1)           # 2-D, H not a power of 2
    _check_norm((1, 1, 128), torch.float32, "contig", seed=2)        # one decode row
    x = torch.randn(2, 3, 64).to(torch.float16).to(DEV)
    w = torch.rand(64).to(DEV) + 0.5                                  # fp32 weight, fp16 activations
    got = K.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.float32
    assert_ulps(got, K.rms_norm_ref(x, w, 1e-6), 16.0, "promoted")
    empty = torch.zeros(0, 64, device=DEV)
    assert K.rms_norm(empty, w, 1e-6).shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contig", "slice"])
def test_embed_rms_norm_matches_ref(dtype, kind):
    """Embedding lookup + RMSNorm in one kernel: the gathered rows exactly, the norm as rms_norm."""
    gen = _gen(5)
    table = _strided((50, 96), torch.float32, gen, kind).to(dtype)
    w = (torch.rand(96, generator=gen) + 0.5).to(dtype).to(DEV)
    tokens = torch.randint(0, 50, (2, 7), generator=gen).to(DEV)
    for out_dtype in (None, torch.float32):
        normed, x = K.embed_rms_norm(tokens, table, w, 1e-5, dtype=out_dtype)
        want_n, want_x = K.embed_rms_norm_ref(tokens, table, w, 1e-5, dtype=out_dtype)
        assert x.shape == (2, 7, 96) and torch.equal(x, want_x)
        assert_ulps(normed, want_n, 16.0 if want_n.dtype == torch.float32 else 2.0, "embed_rms_norm")
    normed, x = K.embed_rms_norm(tokens[0, :1].int(), table, w, 1e-5)  # one int32 id
    assert torch.equal(x, table[tokens[0, :1].long()])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 49\]"):
        K.embed_rms_norm(torch.tensor([3, 50], device=DEV), table, w, 1e-5)
    with pytest.raises(TypeError, match="tokens"):
        K.embed_rms_norm(tokens.float(), table, w, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        K.embed_rms_norm(tokens, table, w[:64], 1e-5)


def test_rms_norm_bad_inputs():
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        K.rms_norm(x, torch.ones(32, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        K.add_rms_norm(x, torch.randn(3, 64, device=DEV), torch.ones(64, device=DEV), 1e-6)
    with pytest.raises(TypeError, match="dtype"):
        K.rms_norm(x.long(), torch.ones(64, device=DEV), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_into_given_views(dtype):
    """``out`` / ``residual_out``: the results land in strided views of NaN-poisoned buffers, equal to the
    allocating call bit for bit; ``residual_out=residual`` updates the residual in place."""
    rows, h = 5, 64
    gen = _gen(11)
    x = _strided((1, rows, h), dtype, gen, "slice")
    r = _strided((1, rows, h), dtype, gen, "contig") * 4
    w = (torch.rand(h, generator=gen) + 0.5).to(dtype).to(DEV)
    want_n, want_r = K.add_rms_norm(x, r, w, 1e-5)
    nbuf, n_view = poisoned_view((1, rows, h), dtype, seed=1)
    rbuf, r_view = poisoned_view((1, rows, h), dtype, seed=2)
    n_before, r_before = nbuf.clone(), rbuf.clone()
    got_n, got_r = K.add_rms_norm(x, r, w, 1e-5, out=n_view, residual_out=r_view)
    assert got_n.data_ptr() == n_view.data_ptr() and got_r.data_ptr() == r_view.data_ptr()
    assert torch.equal(n_view, want_n) and torch.equal(r_view, want_r)
    assert outside_untouched(n_before, nbuf, n_view) and outside_untouched(r_before, rbuf, r_view)
    r_in_place = r.clone()
    K.add_rms_norm(x, r_in_place, w, 1e-5, residual_out=r_in_place)
    assert torch.equal(r_in_place, want_r)


def test_add_rms_norm_bad_outputs():
    x = torch.randn(1, 3, 64, device=DEV)
    w = torch.ones(64, device=DEV)
    with pytest.raises(ValueError, match=r"out must be a torch.float32 tensor of shape \(1, 3, 64\)"):
        K.add_rms_norm(x, x.clone(), w, 1e-6, out=torch.empty(1, 3, 32, device=DEV))
    with pytest.raises(ValueError, match="residual_out must be a torch.float32"):
        K.add_rms_norm(x, x.clone(), w, 1e-6, residual_out=torch.empty(1, 3, 64, device=DEV, dtype=torch.float16))
    x2 = torch.randn(2, 3, 64, device=DEV)
    with pytest.raises(ValueError, match=r"out must be viewable as \[rows, 64\]"):   # [2, 3, 64], rows of two strides
        K.add_rms_norm(x2, x2.clone(), w, 1e-6, out=torch.empty(2, 64, 3, device=DEV).permute(0, 2, 1))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        K.add_rms_norm(x, x.clone(), w, 1e-6, out=[0.0])


# ---------------------------------------------------------------------------------------------
# RoPE + KV write
# ---------------------------------------------------------------------------------------------


def _rope_tables(b, m, d, dtype, gen, start=0, kind="contig"):
    cfg = ModelConfig(model_type="llama", vocab_size=8, hidden_size=d, intermediate_size=8, num_layers=1,
                      num_heads=1, num_kv_heads=1, head_dim=d, rope_theta=10000.0)
    pos = start + torch.randint(0, 4 * m + 8, (b, m), generator=gen)
    cos, sin = rope_cos_sin(cfg, pos.to(DEV), dtype=dtype)
    if kind == "slice":   # tables read from a wider buffer
        wide_c = torch.full((b, m, d + 16), float("nan"), dtype=dtype, device=DEV)
        wide_s = wide_c.clone()
        wide_c[..., :d], wide_s[..., :d] = cos, sin
        cos, sin = wide_c[..., :d], wide_s[..., :d]
    return cos, sin


def _check_rope(b, m, hq, hkv, d, dtype, seed=0, kind="contig", cap=None, table_dtype=None):
    gen = _gen(seed)
    cap = cap or (m + 7)
    width = (hq + 2 * hkv) * d
    qkv = _strided((b, m, width), dtype, gen, "slice" if kind != "contig" else "contig") * 3
    cos, sin = _rope_tables(b, m, d, table_dtype or dtype, gen, kind=kind)
    # the cache: a view with NaN-poisoned head-dim padding and untouched rows that must stay put
    pad = 8 if kind != "contig" else 0
    base = torch.randn(b, hkv, cap, d + pad, generator=gen).to(dtype).to(DEV)
    base[..., d:] = float("nan")
    kc, vc = base[..., :d].clone(), (base[..., :d] * 2).clone()
    if pad:
        kbuf, vbuf = base.clone(), base.clone()
        kbuf[..., :d], vbuf[..., :d] = kc, vc
        kc, vc = kbuf[..., :d], vbuf[..., :d]
    kc_ref, vc_ref = kc.clone(), vc.clone()
    rows = torch.stack([torch.randperm(cap, generator=gen)[:m] for _ in range(b)]).to(DEV)   # distinct per entry
    if kind == "transposed":
        rows = rows.t().contiguous().t()
    q = K.rope_qkv_write(qkv, cos, sin, kc, vc, rows)
    q_ref = K.rope_qkv_write_ref(qkv, cos, sin, kc_ref, vc_ref, rows)
    assert q.shape == (b, hq, m, d) and q.is_contiguous()
    exact_or_ulp(q, q_ref, "q")
    exact_or_ulp(kc, kc_ref, "k cache")
    assert torch.equal(vc, vc_ref), "v cache"
    if pad:
        assert torch.isnan(kc.as_strided((b, hkv, cap, pad), kc.stride(), kc.storage_offset() + d)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 80])
def test_rope_qkv_write_matches_ref(dtype, d):
    _check_rope(2, 3, 4, 2, d, dtype)


@pytest.mark.parametrize("kind", ["slice", "transposed"])
def test_rope_qkv_write_strided(kind):
    _check_rope(2, 5, 2, 1, 64, torch.float32, seed=3, kind=kind)


def test_rope_qkv_write_mha_decode_and_table_dtype():
    _check_rope(1, 1, 3, 3, 64, torch.float32, seed=4)                                    # MHA, one token
    _check_rope(1, 4, 2, 1, 64, torch.float16, seed=5, table_dtype=torch.float32)      # fp32 tables, fp16 x


def test_rope_qkv_write_bad_inputs():
    b, m, d, hkv = 1, 2, 64, 1
    qkv = torch.randn(b, m, 4 * d, device=DEV)
    cos = sin = torch.ones(b, m, d, device=DEV)
    kc = torch.zeros(b, hkv, 8, d, device=DEV)
    vc = torch.zeros_like(kc)
    rows = torch.tensor([[0, 1]], device=DEV)
    with pytest.raises(ValueError, match="rows must be in"):
        K.rope_qkv_write(qkv, cos, sin, kc, vc, rows + 7)
    with pytest.raises(ValueError, match="Hq"):
        K.rope_qkv_write(qkv[..., : 2 * d], cos, sin, kc, vc, rows)
    with pytest.raises(ValueError, match="cos"):
        K.rope_qkv_write(qkv, cos[:, :1], sin, kc, vc, rows)
    with pytest.raises(ValueError, match="head dim"):
        K.rope_qkv_write(qkv[..., : 4 * 24], cos[..., :24], sin[..., :24], kc[..., :24], vc[..., :24], rows)   # not a multiple of 16
    with pytest.raises(TypeError, match="rows"):
        K.rope_qkv_write(qkv, cos, sin, kc, vc, rows.float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qkv_write_into_a_token_major_buffer(dtype):
    """``q_out``: q written into a chunk of a token-major [1, T, Hq, D] buffer seen as [1, Hq, T, D] (the
    layer-major prefill's), NaN-poisoned around the chunk, equals the allocating call bit for bit and touches
    nothing else; the cache writes are the same."""
    b, m, hq, hkv, d, t, s0 = 1, 3, 4, 2, 64, 9, 4
    gen = _gen(12)
    qkv = _strided((b, m, (hq + 2 * hkv) * d), dtype, gen, "contig") * 3
    cos, sin = _rope_tables(b, m, d, dtype, gen)
    kc = torch.zeros(b, hkv, 16, d, dtype=dtype, device=DEV)
    vc = torch.zeros_like(kc)
    rows = torch.tensor([[5, 6, 7]], device=DEV)
    want = K.rope_qkv_write(qkv, cos, sin, kc, vc, rows)
    k_want, v_want = kc.clone(), vc.clone()
    buf, q_all = poisoned_view((1, hq, t, d), dtype, permute=True)      # [1, Hq, T, D], token-major in memory
    before = buf.clone()
    chunk = q_all[:, :, s0 : s0 + m]
    got = K.rope_qkv_write(qkv, cos, sin, kc, vc, rows, q_out=chunk)
    assert got.data_ptr() == chunk.data_ptr()
    assert torch.equal(chunk, want)
    assert outside_untouched(before, buf, chunk)
    assert torch.equal(kc, k_want) and torch.equal(vc, v_want)
    with pytest.raises(ValueError, match=r"q_out must be a .* tensor of shape \[1, 4, 3, 64\]"):
        K.rope_qkv_write(qkv, cos, sin, kc, vc, rows, q_out=q_all[:, :, :2])
    with pytest.raises(TypeError, match="q_out must be a torch.Tensor"):
        K.rope_qkv_write(qkv, cos, sin, kc, vc, rows, q_out="q")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contig", "slice"])
def test_rope_q_matches_ref(dtype, kind):
    """Query-only rotation (the GLIDE cross-attention query) == apply_rope, heads split out."""
    gen = _gen(7)
    b, m, hq, d = 2, 5, 3, 64
    x = _strided((b, m, hq * d), dtype, gen, kind) * 3
    cos, sin = _rope_tables(b, m, d, dtype, gen, kind=kind)
    q = K.rope_q(x, cos, sin)
    assert q.shape == (b, hq, m, d) and q.is_contiguous()
    exact_or_ulp(q, K.rope_q_ref(x, cos, sin), "q")
    # the same rotation as the q heads of rope_qkv_write
    kc = torch.zeros(b, 1, m, d, dtype=dtype, device=DEV)
    qkv = torch.cat([x, torch.zeros(b, m, 2 * d, dtype=dtype, device=DEV)], dim=-1)
    rows = torch.arange(m, device=DEV)[None].expand(b, m).contiguous()
    assert torch.equal(q, K.rope_qkv_write(qkv, cos, sin, kc, kc.clone(), rows))


def test_rope_q_bad_inputs():
    x = torch.randn(1, 2, 128, device=DEV)
    cos = sin = torch.ones(1, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="Hq \\* D"):
        K.rope_q(x[..., :100], cos, sin)
    with pytest.raises(ValueError, match="cos"):
        K.rope_q(x, cos[:, :1], sin)
    with pytest.raises(ValueError, match="head dim"):
        K.rope_q(x[..., :96], cos[..., :24], sin[..., :24])   # not a multiple of 16


# ---------------------------------------------------------------------------------------------
# SiLU(gate) * up
# ---------------------------------------------------------------------------------------------


def _check_silu(shape, dtype, kind, seed=0):
    gu = _strided(shape, dtype, _gen(seed), kind) * 3
    got = K.silu_mul(gu)
    assert got.shape == shape[:-1] + (shape[-1] // 2,) and got.is_contiguous()
    # the kernel's exp/division are not torch's: silu may land one ulp away, and the product one more
    assert_ulps(got, K.silu_mul_ref(gu), 8.0 if dtype == torch.float32 else 2.0, "silu_mul")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contig", "slice", "transposed"])
def test_silu_mul_matches_ref(dtype, kind):
    _check_silu((2, 3, 2 * 72), dtype, kind)


def test_silu_mul_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        K.silu_mul(torch.randn(2, 7, device=DEV))


# ---------------------------------------------------------------------------------------------
# GPU: the full matrix, Llama-sized rows, CUDA-graph capture
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_norms_and_silu_full(dtype):
    for h in (64, 4096, 5120, 8192):
        for rows in ((1, 1), (1, 69), (3, 17)):
            for kind in ("contig", "slice", "transposed"):
                _check_norm(rows + (h,), dtype, kind, seed=h + rows[1])
    for f in (11008, 14336):
        for rows in ((1, 1), (1, 69), (2, 33)):
            _check_silu(rows + (2 * f,), dtype, "contig", seed=f)
    _check_silu((4, 5, 2 * 1000), dtype, "slice", seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_gpu_rope_qkv_write_full(dtype, d):
    for b, m, hq, hkv in ((1, 1, 32, 8), (1, 69, 32, 8), (3, 17, 32, 32), (2, 128, 28, 4), (1, 5, 14, 2)):
        for kind in ("contig", "slice", "transposed"):
            _check_rope(b, m, hq, hkv, d, dtype, seed=m + hq, kind=kind, cap=m + 300)


@pytest.mark.gpu
def test_gpu_fused_kernels_capture_in_a_cuda_graph():
    dtype, b, m, hq, hkv, d, h = torch.bfloat16, 1, 4, 8, 2, 128, 1024
    gen = _gen(0)
    x = torch.randn(b, m, h, generator=gen).to(dtype).cuda()
    res = torch.randn(b, m, h, generator=gen).to(dtype).cuda()
    w = torch.rand(h, generator=gen).to(dtype).cuda()
    qkv = torch.randn(b, m, (hq + 2 * hkv) * d, generator=gen).to(dtype).cuda()
    cos, sin = _rope_tables(b, m, d, dtype, gen)
    kc = torch.zeros(b, hkv, 64, d, dtype=dtype, device="cuda")
    vc = torch.zeros_like(kc)
    rows = torch.arange(m, dtype=torch.int32, device="cuda")[None] + 10
    gu = torch.randn(b, m, 2 * 512, generator=gen).to(dtype).cuda()

    def body():
        n, r = K.add_rms_norm(x, res, w, 1e-5)
        return K.rms_norm(x, w, 1e-5), n, r, K.rope_qkv_write(qkv, cos, sin, kc, vc, rows), K.silu_mul(gu)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = body()
    x.copy_(torch.randn(b, m, h, generator=gen).to(dtype))
    rows.add_(20)
    kc.zero_()
    g.replay()
    torch.cuda.synchronize()
    kc_ref, vc_ref = torch.zeros_like(kc), torch.zeros_like(vc)
    want = (K.rms_norm(x, w, 1e-5), *K.add_rms_norm(x, res, w, 1e-5),
            K.rope_qkv_write_ref(qkv, cos, sin, kc_ref, vc_ref, rows), K.silu_mul(gu))
    for got, ref in zip(outs, want):
        assert torch.equal(got, ref)
    assert torch.equal(kc, kc_ref) and torch.equal(vc[:, :, 30:34], vc_ref[:, :, 30:34])
