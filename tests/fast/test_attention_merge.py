"""``merge_attention`` (the blocked prefill's log-sum-exp merge, one Triton launch) against the eager merge and
the reference's :func:`specdec.ref.attention.merge_attention`.

Inputs and outputs are strided views into NaN-poisoned buffers: only the view's elements may be read or
written. CPU runs under the Triton interpreter (CI); on CUDA the same tests run on the GPU, plus a
Llama-3-8B-sized merge.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kernel_device, outside_untouched, poisoned_view

from specdec.fast import kernels as K
from specdec.ref.attention import attention_with_lse, merge_attention as ref_merge

DEV = kernel_device()


@pytest.mark.parametrize("b,h,n,d", [(1, 2, 5, 16), (2, 3, 17, 64), (1, 1, 33, 80), (1, 4, 1, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("permute", [False, True], ids=["bhnd", "bnhd"])
def test_merge_equals_eager_and_reference_and_touches_only_its_views(b, h, n, d, dtype, permute):
    shape, lshape = (b, h, n, d), (b, h, n)
    acc_buf, acc = poisoned_view(shape, dtype, permute=permute, seed=1)
    out_buf, out = poisoned_view(shape, dtype, permute=permute, seed=2)
    al_buf, acc_lse = poisoned_view(lshape, torch.float32, seed=3)
    l_buf, lse = poisoned_view(lshape, torch.float32, seed=4)
    dst_buf, dst = poisoned_view(shape, torch.float32, seed=5)
    dl_buf, dst_lse = poisoned_view(lshape, torch.float32, seed=6)
    inputs_before = [t.clone() for t in (acc_buf, out_buf, al_buf, l_buf)]
    dst_before, dl_before = dst_buf.clone(), dl_buf.clone()
    want, want_lse = K.merge_attention_ref(acc, acc_lse, out, lse)
    got, got_lse = K.merge_attention(acc, acc_lse, out, lse, dst, dst_lse)
    assert got is dst and got_lse is dst_lse
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-6, rtol=2e-6)
    ref_o, ref_l = ref_merge(acc.float(), acc_lse, out.float(), lse)          # the reference's sigmoid form
    torch.testing.assert_close(got, ref_o, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_lse, ref_l, atol=2e-6, rtol=2e-6)
    # inputs unchanged (bitwise, NaN padding included); outputs changed only inside their views
    for before, after in zip(inputs_before, (acc_buf, out_buf, al_buf, l_buf)):
        assert torch.equal(before.isnan(), after.isnan()) and torch.equal(before.nan_to_num(), after.nan_to_num())
    assert outside_untouched(dst_before, dst_buf, dst) and outside_untouched(dl_before, dl_buf, dst_lse)
    assert not got.isnan().any() and not got_lse.isnan().any()


@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_in_place_and_into_the_model_dtype(dst_dtype):
    """dst = acc (in place, the running result) gives the out-of-place result bit for bit; a bf16 dst is the
    fp32 result rounded once."""
    shape = (1, 3, 21, 64)
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(shape, generator=g).to(DEV)
    out = torch.randn(shape, generator=g).to(DEV).bfloat16()
    acc_lse, lse = (torch.randn(shape[:3], generator=g).to(DEV) * 3 for _ in range(2))
    want, want_lse = K.merge_attention(acc.clone(), acc_lse.clone(), out, lse,
                                       torch.empty(shape, device=DEV), torch.empty(shape[:3], device=DEV))
    if dst_dtype == torch.float32:
        got, got_lse = K.merge_attention(acc, acc_lse, out, lse)
        assert got is acc and got_lse is acc_lse
        assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
    else:
        got, _ = K.merge_attention(acc, acc_lse, out, lse, torch.empty(shape, dtype=dst_dtype, device=DEV),
                                   torch.empty(shape[:3], device=DEV))
        assert got.dtype == dst_dtype
        if DEV == "cuda":   # the GPU rounds to nearest even, as torch does
            assert torch.equal(got, want.to(dst_dtype))
        else:               # the Triton interpreter truncates to bf16: within one bf16 step of the fp32 result
            torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=0)


def test_merging_blocks_equals_one_softmax_over_all_keys():
    """Three disjoint key blocks merged one by one == one attention over all keys (the blocked prefill's use)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 9, 32, generator=g).to(DEV)
    k, v = (torch.randn(1, 2, 40, 32, generator=g).to(DEV) for _ in range(2))
    full = torch.ones(9, 40, dtype=torch.bool, device=DEV)
    want, want_lse = attention_with_lse(q.cpu(), k.cpu(), v.cpu(), full.cpu())
    acc, acc_lse = attention_with_lse(q, k[:, :, :8], v[:, :, :8], full[:, :8])
    for lo, hi in ((8, 24), (24, 40)):
        o, l = attention_with_lse(q, k[:, :, lo:hi], v[:, :, lo:hi], full[:, lo:hi])
        acc, acc_lse = K.merge_attention(acc.float(), acc_lse.contiguous(), o, l.contiguous())
    torch.testing.assert_close(acc.cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc_lse.cpu(), want_lse, atol=1e-5, rtol=1e-5)


def test_merge_rejects_bad_input():
    shape = (1, 2, 4, 16)
    acc, out = torch.zeros(shape, device=DEV), torch.zeros(shape, device=DEV)
    acc_lse, lse = torch.zeros(shape[:3], device=DEV), torch.zeros(shape[:3], device=DEV)
    with pytest.raises(TypeError, match="lse must be float32"):
        K.merge_attention(acc, acc_lse, out, lse.bfloat16())
    with pytest.raises(TypeError, match="acc must be a torch.Tensor"):
        K.merge_attention(acc.tolist(), acc_lse, out, lse)
    with pytest.raises(ValueError, match="one shape"):
        K.merge_attention(acc, acc_lse, out[:, :, :3], lse)
    with pytest.raises(ValueError, match=r"acc_lse must be \[B, H, n\]"):
        K.merge_attention(acc, acc_lse[:, :1], out, lse)
    with pytest.raises(ValueError, match=r"head dim D must be in \[1, 256\]"):
        K.merge_attention(torch.zeros(1, 1, 2, 512, device=DEV), acc_lse[:, :1, :2], torch.zeros(1, 1, 2, 512, device=DEV),
                          lse[:, :1, :2])
    with pytest.raises(ValueError, match="dst must not overlap out"):
        K.merge_attention(acc, acc_lse, out, lse, out)
    big = torch.zeros(1, 2, 5, 16, device=DEV)
    with pytest.raises(ValueError, match="dst overlaps acc; it may only be acc itself"):
        K.merge_attention(big[:, :, :4], acc_lse, out, lse, big[:, :, 1:])
    with pytest.raises(ValueError, match="dst_lse must not overlap lse"):
        K.merge_attention(acc, acc_lse, out, lse, None, lse)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        K.merge_attention(acc.long(), acc_lse, out, lse)


@pytest.mark.gpu
def test_gpu_llama_sized_merge_matches_eager():
    """A Llama-3-8B chunk (32 heads, 2048 rows, D 128) in bf16 from cuDNN's [B, n, H, D] layout."""
    g = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.randn(1, 2048, 32, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
    out = torch.randn(1, 2048, 32, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
    acc_lse, lse = (torch.randn(1, 32, 2048, device="cuda", generator=g) * 4 for _ in range(2))
    want, want_lse = K.merge_attention_ref(acc, acc_lse, out, lse)
    got, got_lse = K.merge_attention(acc, acc_lse.clone(), out, lse, torch.empty(acc.shape, device="cuda"),
                                     torch.empty_like(lse))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-6, rtol=2e-6)
