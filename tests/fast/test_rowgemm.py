"""The row-invariant GEMM (fast/kernels/rowgemm.py): a row's bits do not depend on M or on the other rows.

On CPU the kernel runs under the Triton interpreter (small shapes); the GPU tests run the real
tensor-core kernel on Llama-3-8B-shaped weights.
"""

from __future__ import annotations

import pytest
import torch

import specdec  # noqa: F401  -- picks the Triton interpreter on CPU first
from specdec.fast.kernels import gemv_ref, gemv_silu_ref
from specdec.fast.kernels.rowgemm import MAX_ROWS, row_linear, row_linear_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _data(dtype, m=37, k=96, n=80, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device)
    nw = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device)
    res = torch.randn(m, n, generator=g).to(dtype).to(device)
    return x, w, b, nw, res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "norm_resid", "silu"])
def test_rows_do_not_depend_on_m_or_neighbours(dtype, variant):
    x, w, b, nw, res = _data(dtype)
    if variant == "silu":
        w = torch.cat([w, w.flip(0) * 0.5])

    def run(rows):
        if variant == "plain":
            return row_linear(x[rows], w, b)
        if variant == "norm_resid":
            return row_linear(x[rows], w, b, norm_weight=nw, eps=1e-5, residual=res[rows])
        return row_linear(x[rows], w, silu=True, norm_weight=nw, eps=1e-5)

    full = run(slice(0, 37))
    for m in (1, 5, 16, 17):
        assert torch.equal(run(slice(0, m)), full[:m]), m
    for r in (0, 20, 36):
        assert torch.equal(run(slice(r, r + 1)), full[r:r + 1]), r
    # the same row among different neighbours: rows 30..36 computed after shuffling the others
    perm = torch.cat([torch.arange(30, 37), torch.randperm(30, generator=torch.Generator().manual_seed(1))])
    shuffled = run(perm)
    assert torch.equal(shuffled[:7], full[30:37])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_eager_ops(dtype):
    x, w, b, nw, res = _data(dtype, m=9)
    tol = TOL[dtype]
    got = row_linear(x, w, b, norm_weight=nw, eps=1e-5, residual=res)
    want = gemv_ref(x, w, b, norm_weight=nw, eps=1e-5, residual=res)
    assert torch.allclose(got.float(), want.float(), atol=tol * 8, rtol=tol)
    w13 = torch.cat([w, w * 0.7])
    got = row_linear(x, w13, silu=True)
    want = gemv_silu_ref(x, w13)
    assert torch.allclose(got.float(), want.float(), atol=tol * 8, rtol=tol)
    assert torch.allclose(row_linear(x, w).float(), torch.nn.functional.linear(x.float(), w.float()), atol=tol * 8, rtol=tol)


def test_leading_dims_and_k_tail_poison():
    """[B, M, K] inputs; x and w as views of wider buffers whose columns past K are NaN: a read past K
    would poison every output."""
    x, w, b, _, _ = _data(torch.float32, m=6, k=40, n=24)
    xb = torch.full((6, 64), float("nan"))
    xb[:, :40] = x
    wb = torch.full((24, 72), float("nan"))
    wb[:, :40] = w
    got = row_linear(xb[:, :40].reshape(2, 3, 40), wb[:, :40], b)
    assert got.shape == (2, 3, 24) and torch.isfinite(got).all()
    assert torch.equal(got.reshape(6, 24), row_linear(x, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_even_shapes_take_the_unmasked_stream_with_the_same_rows(dtype):
    """N a multiple of the tile and K of the split: the unmasked weight stream; rows still invariant
    and equal to the eager product."""
    x, w, _, _, _ = _data(dtype, m=20, k=128, n=64)
    full = row_linear(x, w)
    assert torch.equal(row_linear(x[11:12], w), full[11:12])
    assert torch.allclose(full.float(), torch.nn.functional.linear(x.float(), w.float()), atol=TOL[dtype] * 8, rtol=TOL[dtype])


def test_split_k_is_reduced_in_a_fixed_order_and_leaves_the_counts_at_zero():
    """The interpreter's config splits K in two: a row still equals itself at every M, agrees with the
    unsplit kernel to fp32 rounding, and the arrival counts are back at zero after every call."""
    from specdec.fast.kernels import rowgemm

    assert row_linear_config(80, 96, torch.float32)[5] == 2
    x, w, b, nw, res = _data(torch.float32, m=20)
    split = row_linear(x, w, b, norm_weight=nw, eps=1e-5, residual=res)
    whole = row_linear(x, w, b, norm_weight=nw, eps=1e-5, residual=res, config=(16, 64, 32, 4, 1, 1))
    assert torch.allclose(split, whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(row_linear(x[7:8], w, b, norm_weight=nw, eps=1e-5, residual=res[7:8]), split[7:8])
    assert all(int(c.abs().sum()) == 0 for c in rowgemm._COUNTERS.values())


def test_row_tile_limits_are_where_the_gpu_tile_grows():
    """row_tile_limits() (what the fast GLIDE calibration times both sides of) are exactly the row counts after
    which the GPU rule's 16-bit tile (BLOCK_M, TAIL) changes, for every weight shape."""
    from specdec.fast.kernels import rowgemm

    for n, k in ((4096, 4096), (14336, 4096), (128256, 4096), (768, 256)):
        for dtype in (torch.bfloat16, torch.float16):
            tile = [rowgemm._gpu_config(n, k, dtype, rows, False)[::8] for rows in range(1, 130)]  # (BLOCK_M, TAIL)
            steps = tuple(r for r in range(1, 129) if tile[r - 1] != tile[r])
            assert steps == rowgemm.row_tile_limits(), (n, k, dtype, steps)


@pytest.mark.parametrize("rule", ["here", "cuda-rule"])  # (not "gpu": that id would read as the marker)
def test_config_depends_on_rows_only_through_block_m_and_tail(rule):
    """What a row's arithmetic depends on (BLOCK_N, BLOCK_K, warps, stages, the K split, SWAP, TMA) is the
    same for every row count; only BLOCK_M and TAIL follow the rows -- for this machine's rule and the GPU's.
    On the GPU a 69-row verification of 16-bit weights takes a 64-row tile plus a 16-row tail."""
    from specdec.fast.kernels import rowgemm

    config = row_linear_config if rule == "here" else rowgemm._gpu_config
    for n, k in ((4096, 4096), (6144, 4096), (4096, 14336), (14336, 4096), (128256, 4096), (768, 256), (80, 96)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for silu in (False, True):
                rows_all = (1, 5, 16, 17, 64, 65, 69, 80, 81, 128, 4096)
                cfgs = {config(n, k, dtype, rows, silu)[1:8] for rows in rows_all}
                assert len(cfgs) == 1, (n, k, dtype, silu, cfgs)
                for rows in rows_all:
                    cfg = config(n, k, dtype, rows, silu)
                    assert len(cfg) == 9 and cfg[0] in (16, 32, 64, 128) and cfg[8] in (0, 16), (rows, cfg)
                    assert cfg[8] < cfg[0], (rows, cfg)
                tails = {rows: config(n, k, dtype, rows, silu)[8] for rows in rows_all}
                want = 16 if rule == "cuda-rule" and dtype != torch.float32 else 0
                assert [r for r, t in tails.items() if t] == ([65, 69, 80] if want else []), tails


@pytest.mark.parametrize("variant", ["plain", "norm_resid", "silu"])
def test_tma_loads_give_the_pointer_loads_bits(variant):
    """TMA (tensor-descriptor) tiles carry the same values as the masked pointer loads -- zeros past M and
    past K, never the NaN poison around the operands -- so the product is bit for bit the pointer path's.
    K = 40 leaves a K tail inside a 32-wide tile; N = 24 a partial N tile (plain / norm_resid)."""
    from specdec.fast.kernels.rowgemm import TensorDescriptor

    if TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    n = 32 if variant == "silu" else 24   # SILU takes TMA only when N is a multiple of BLOCK_N (32 here)
    x, w, b, nw, res = _data(torch.bfloat16, m=6, k=40, n=n)
    if variant == "silu":
        w = torch.cat([w, w.flip(0) * 0.5])
    xb = torch.full((6, 48), float("nan"), dtype=torch.bfloat16)   # row stride 96 B: TMA-aligned
    xb[:, :40] = x
    wb = torch.full((w.shape[0], 56), float("nan"), dtype=torch.bfloat16)
    wb[:, :40] = w
    xv, wv = xb[:, :40], wb[:, :40]
    cfg = row_linear_config(n, 40, torch.bfloat16, 6)
    assert cfg[7] == 1
    kw = {"plain": dict(bias=b), "norm_resid": dict(bias=b, norm_weight=nw, eps=1e-5, residual=res),
          "silu": dict(silu=True, norm_weight=nw, eps=1e-5)}[variant]
    tma = row_linear(xv, wv, config=cfg, **kw)
    ptr = row_linear(xv, wv, config=cfg[:7] + (0,), **kw)
    assert torch.isfinite(tma.float()).all()
    assert torch.equal(tma, ptr)
    # and the same rows alone (a 1-row descriptor) as in the 6-row call
    kw1 = dict(kw, residual=res[3:4]) if variant == "norm_resid" else kw
    assert torch.equal(row_linear(xv[3:4], wv, config=cfg, **kw1), tma[3:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "norm_resid", "silu"])
@pytest.mark.parametrize("split,tma", [(1, 1), (2, 1), (2, 0)])
def test_a_tail_tile_gives_every_row_the_same_bits(dtype, variant, split, tma):
    """TAIL: a program takes BLOCK_M + TAIL rows as two MMA tiles sharing each weight tile. Every row must
    come out bit for bit as in one plain tile and as computed alone -- 53 rows with BLOCK_M 32 + TAIL 16: rows
    0-31 in the first program's main tile, 32-47 in its tail, 48-52 in the second program's partial main tile
    (and its tail empty)."""
    n = 32 if variant == "silu" else 24
    x, w, b, nw, res = _data(dtype, m=53, k=40, n=n)
    if variant == "silu":
        w = torch.cat([w, w.flip(0) * 0.5])
    kw = {"plain": dict(bias=b), "norm_resid": dict(bias=b, norm_weight=nw, eps=1e-5, residual=res),
          "silu": dict(silu=True, norm_weight=nw, eps=1e-5)}[variant]
    plain = (16, 32, 32, 4, 1, split, 1, tma)   # SWAP, as the GPU rule runs 16-bit weights
    tail = plain + (16,)
    whole = row_linear(x, w, config=(64,) + plain[1:], **kw)
    got = row_linear(x, w, config=(32,) + tail[1:], **kw)
    assert torch.equal(got, whole)
    for r in (0, 31, 32, 47, 48, 52):
        one = dict(kw, residual=res[r:r + 1]) if variant == "norm_resid" else kw
        assert torch.equal(row_linear(x[r:r + 1], w, config=plain, **one), got[r:r + 1]), r
    from specdec.fast.kernels import rowgemm
    assert all(int(c.abs().sum()) == 0 for c in rowgemm._COUNTERS.values())


def test_a_tail_must_be_smaller_than_the_main_tile():
    x, w, b, _, _ = _data(torch.float32, m=4)
    with pytest.raises(ValueError, match="TAIL must be 0, 16, 32 or 64 and below BLOCK_M = 16"):
        row_linear(x, w, config=(16, 32, 32, 4, 1, 1, 1, 1, 16))
    with pytest.raises(ValueError, match="TAIL"):
        row_linear(x, w, config=(64, 32, 32, 4, 1, 1, 1, 1, 24))


def test_tma_needs_aligned_operands_and_falls_back_with_the_same_bits():
    """A row stride that is not a multiple of 16 bytes cannot feed a tensor descriptor: the call falls back
    to pointer loads, with the same bits as an aligned copy of the same rows through TMA."""
    from specdec.fast.kernels import rowgemm

    if rowgemm.TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    x, w, b, _, _ = _data(torch.bfloat16, m=5, k=40, n=24)
    xb = torch.zeros(5, 44, dtype=torch.bfloat16)   # row stride 88 B: not TMA-aligned
    xb[:, :40] = x
    assert not rowgemm._tma_ok(xb[:, :40], w, 24, 16, False)
    assert rowgemm._tma_ok(x, w, 24, 16, False)
    assert not rowgemm._tma_ok(x, torch.cat([w, w]), 24, 16, True)    # SILU with N = 24 % 16 != 0
    assert torch.equal(row_linear(xb[:, :40], w, b), row_linear(x.clone(), w, b))


def test_bad_input():
    x, w, b, nw, res = _data(torch.float32, m=4)
    with pytest.raises(ValueError, match="MAX_ROWS"):
        row_linear(torch.zeros(MAX_ROWS + 1, 96), w)
    with pytest.raises(ValueError, match="K = 96"):
        row_linear(torch.zeros(3, 95), w)
    with pytest.raises(TypeError, match="one dtype"):
        row_linear(x.half(), w)
    with pytest.raises(ValueError, match="odd row count"):
        row_linear(x, w[:79], silu=True)
    with pytest.raises(ValueError, match="residual"):
        row_linear(x, w, residual=res[:, :5])
    with pytest.raises(ValueError, match="norm_weight"):
        row_linear(x, w, norm_weight=nw[:5])
    with pytest.raises(ValueError, match="bias"):
        row_linear(x, w, b[:3])


LLAMA_SHAPES = [(6144, 4096, False), (4096, 4096, False), (28672, 4096, True), (4096, 14336, False), (128256, 4096, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,silu", LLAMA_SHAPES)
def test_gpu_rows_bitwise_across_m_llama3_8b_shapes(n, k, silu):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, generator=g, device="cuda").to(torch.bfloat16) * 0.02
    x = torch.randn(512, k, generator=g, device="cuda").to(torch.bfloat16)
    nw = (torch.rand(k, generator=g, device="cuda") + 0.5).to(torch.bfloat16)
    res = None if silu else torch.randn(512, n, generator=g, device="cuda").to(torch.bfloat16)

    def run(rows):   # the RMSNorm folded in (and the residual add): every row-wise piece of the kernel
        return row_linear(x[rows], w, silu=silu, norm_weight=nw, eps=1e-5, residual=None if res is None else res[rows])

    full = run(slice(0, 128))
    for m in (1, 5, 17, 33, 69):
        assert torch.equal(run(slice(0, m)), full[:m]), m
    for r in (3, 68, 127):
        assert torch.equal(run(slice(r, r + 1)), full[r:r + 1]), r
    assert torch.equal(run(slice(0, 512))[:128], full)   # a batch of 512 rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_operands_variant_is_row_invariant_and_right(dtype):
    """The SWAP design (weight tile as the MMA's row operand) gives F.linear's values and the same row
    bits whatever M (and its split path too)."""
    x, w, b, nw, res = _data(dtype, m=37)
    for cfg in ((16, 32, 32, 4, 1, 1, 1), (16, 64, 32, 4, 1, 2, 1)):
        full = row_linear(x, w, b, norm_weight=nw, eps=1e-5, residual=res, config=cfg)
        plain = row_linear(x, w, b, norm_weight=nw, eps=1e-5, residual=res, config=cfg[:6])
        torch.testing.assert_close(full.float(), plain.float(), atol=TOL[dtype], rtol=TOL[dtype])
        for r in (0, 17, 36):
            one = row_linear(x[r:r + 1], w, b, norm_weight=nw, eps=1e-5, residual=res[r:r + 1], config=cfg)
            assert torch.equal(one, full[r:r + 1]), (cfg, r)
    w13 = torch.cat([w, w.flip(0) * 0.5])
    full = row_linear(x, w13, silu=True, config=(16, 32, 32, 4, 1, 1, 1))
    assert torch.equal(row_linear(x[5:6], w13, silu=True, config=(16, 32, 32, 4, 1, 1, 1)), full[5:6])
    torch.testing.assert_close(full.float(), row_linear(x, w13, silu=True).float(), atol=TOL[dtype], rtol=TOL[dtype])
