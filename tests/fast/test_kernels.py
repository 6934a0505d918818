"""Triton kernels of the fast path against their references (docs/design.md §6, §7 and §9).

Without CUDA the kernels run under the Triton interpreter on small shapes; ``@pytest.mark.gpu``
tests run the full matrix (dtypes x GQA groups x tree sizes x head dims, long ragged prefixes).
Every attention test poisons the cache outside the valid range (NaN / 1e4 rows beyond
``prefix_len + M``, NaN head-dim padding via sliced views): results must not change.
"""

from __future__ import annotations

import pytest
import torch
from helpers import kernel_device

from specdec.fast import kernels as K
from specdec.ref.attention import tree_attention_full
from specdec.ref.attention import tree_attention as tree_attention_ref
from specdec.shared.tree import Tree

DEV = kernel_device()
CUDA = DEV == "cuda"
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def random_tree_masks(b: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """[B, M, M] ancestor masks of random trees (parent of node i uniform in [0, i))."""
    masks = []
    for _ in range(b):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, m)]
        masks.append(Tree.from_parents(parents).ancestor_mask())
    return torch.stack(masks).to(DEV)


def poisoned_cache(b, hkv, cap, d, dtype, valid_len, gen, pad_d=0, poison=float("nan")):
    """A cache [B, Hkv, cap, D] whose rows >= valid_len[b] (and the pad_d extra columns) are poison.

    Returns (view used by the kernel, clean copy with poison replaced by 0 for the reference).
    """
    full = torch.randn(b, hkv, cap, d + pad_d, generator=gen).to(dtype)
    for bi, n in enumerate(valid_len):
        full[bi, :, n:] = poison
    full[..., d:] = poison
    full = full.to(DEV)
    view = full[..., :d]
    clean = torch.nan_to_num(view.float(), nan=0.0).clone()
    for bi, n in enumerate(valid_len):
        clean[bi, :, n:] = 0
    return view, clean.to(dtype)


def assert_close(out, ref, dtype, what=""):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert torch.isfinite(out.float()).all(), f"{what}: non-finite values"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def run_tree_case(dtype, g, m, d, prefix, hkv=2, num_splits=None, seed=0, cap_extra=7, poison=float("nan")):
    """Kernel vs reference on random trees, ragged prefixes, poisoned cache; returns the output."""
    gen = torch.Generator().manual_seed(seed)
    b = len(prefix)
    hq = hkv * g
    n = max(prefix) + m                 # k/v rows the kernel is told about
    cap = n + cap_extra                 # preallocated capacity, rows [n, cap) are poison too
    k_view, k_clean = poisoned_cache(b, hkv, cap, d, dtype, [p + m for p in prefix], gen, pad_d=16, poison=poison)
    v_view, v_clean = poisoned_cache(b, hkv, cap, d, dtype, [p + m for p in prefix], gen, pad_d=16, poison=poison)
    k_view, v_view = k_view[:, :, :n], v_view[:, :, :n]
    k_clean, v_clean = k_clean[:, :, :n], v_clean[:, :, :n]
    # q as a non-contiguous view ([B, M, Hq, D] transposed), like a projection output
    q = torch.randn(b, m, hq, d, generator=gen).to(dtype).to(DEV).transpose(1, 2)
    mask = random_tree_masks(b, m, gen)
    plen = torch.tensor(prefix, device=DEV)
    out = K.tree_attention(q, k_view, v_view, plen, mask, num_splits=num_splits)
    ref = tree_attention_ref(q, k_clean, v_clean, plen, mask)
    assert_close(out, ref, dtype, f"tree dtype={dtype} G={g} M={m} D={d} prefix={prefix}")
    return out


# ---------------------------------------------------------------------------------------------
# tree attention: CPU (interpreter) subset -- also runs on GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,g,m,d,prefix,splits",
    [
        (torch.float32, 1, 5, 64, [37, 100], 3),      # ragged, one batch entry has empty splits
        (torch.float32, 4, 1, 64, [70, 0], 2),        # M = 1 (decode), a zero-length prefix
        (torch.float32, 8, 5, 128, [45], None),       # G = 8, auto splits
        (torch.bfloat16, 4, 5, 80, [61, 19], 2),      # bf16, padded head dim
        (torch.float16, 1, 69, 96, [23, 50], 2),      # M = 69 (default GLIDE tree), fp16, D = 96
        (torch.bfloat16, 8, 69, 64, [130, 10], 3),    # 552 packed rows -> several row blocks
        (torch.float16, 4, 5, 128, [200, 64], None),  # prefix a multiple of the tile, auto splits
    ],
)
def test_tree_attention_matches_reference(dtype, g, m, d, prefix, splits):
    run_tree_case(dtype, g, m, d, prefix, num_splits=splits)


def test_tree_attention_m128_huge_poison():
    run_tree_case(torch.float32, 1, 128, 64, [33], hkv=1, num_splits=2, poison=1e4)


def test_tree_attention_int_prefix_scale_and_definition():
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, m, d, p = 2, 4, 2, 6, 64, 41
    q = torch.randn(b, hq, m, d, generator=gen).to(DEV)
    k = torch.randn(b, hkv, p + m, d, generator=gen).to(DEV)
    v = torch.randn(b, hkv, p + m, d, generator=gen).to(DEV)
    mask = random_tree_masks(b, m, gen)
    out = K.tree_attention(q, k, v, p, mask, sm_scale=0.3, num_splits=4)
    assert_close(out, tree_attention_full(q, k, v, p, mask, sm_scale=0.3), torch.float32, "int prefix")


def test_tree_attention_fully_masked_rows_give_zeros():
    """prefix 0 and a tree row with no allowed key: the row is 0 (as the reference), never NaN."""
    b, h, m, d = 1, 2, 4, 64
    q, k, v = (torch.randn(b, h, x, d, device=DEV) for x in (m, m, m))
    mask = torch.eye(m, dtype=torch.bool, device=DEV)[None].clone()
    mask[0, 2, :] = False
    out = K.tree_attention(q, k, v, 0, mask, num_splits=3)
    ref = tree_attention_ref(q, k, v, 0, mask)
    assert_close(out, ref, torch.float32, "fully masked")
    assert (out[0, :, 2] == 0).all()


# ---------------------------------------------------------------------------------------------
# GLIDE self / cross attention
# ---------------------------------------------------------------------------------------------


def _glide_inputs(dtype, b, hq, hkv, m, d, n, gen, valid):
    k_view, k_clean = poisoned_cache(b, hkv, n + 5, d, dtype, valid, gen, pad_d=16)
    v_view, v_clean = poisoned_cache(b, hkv, n + 5, d, dtype, valid, gen, pad_d=16)
    q = torch.randn(b, hq, m, d, generator=gen).to(dtype).to(DEV)
    return q, k_view[:, :, :n], v_view[:, :, :n], k_clean[:, :, :n], v_clean[:, :, :n]


@pytest.mark.parametrize("dtype,window", [(torch.float32, 16), (torch.bfloat16, 512)])
def test_glide_self_attention_window(dtype, window):
    gen = torch.Generator().manual_seed(5)
    b, hq, hkv, m, d, n = 2, 4, 2, 4, 64, 90
    pos = torch.tensor([[0, 1, 2, 3], [40, 41, 60, 77]], device=DEV)
    q, k, v, kc, vc = _glide_inputs(dtype, b, hq, hkv, m, d, n, gen, [4, 78])
    out = K.glide_self_attention(q, k, v, pos, window=window, num_splits=2)
    ref = K.glide_self_attention_ref(q, kc, vc, pos, window=window)
    assert_close(out, ref, dtype, "glide self")


def test_glide_self_attention_tree_level():
    gen = torch.Generator().manual_seed(6)
    b, hq, hkv, m, d, n, t = 2, 4, 1, 5, 96, 70, 9
    start = torch.tensor([30, 55], device=DEV)
    pos = start[:, None] + torch.tensor([0, 1, 1, 2, 2], device=DEV)       # node depths
    tmask = torch.rand(b, m, t, generator=gen).lt(0.4).to(DEV)
    q, k, v, kc, vc = _glide_inputs(torch.float32, b, hq, hkv, m, d, n, gen, [30 + t, 55 + t])
    out = K.glide_self_attention(q, k, v, pos, window=20, tree_mask=tmask, tree_start=start)
    ref = K.glide_self_attention_ref(q, kc, vc, pos, window=20, tree_mask=tmask, tree_start=start)
    assert_close(out, ref, torch.float32, "glide self tree")


@pytest.mark.parametrize("per_row", [True, False])
def test_glide_cross_attention_bounds(per_row):
    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, m, d, n = 2, 8, 2, 5, 128, 150
    bound = torch.tensor([[0, 1, 64, 100, 150], [3, 4, 5, 6, 7]], device=DEV) if per_row else torch.tensor([150, 33], device=DEV)
    valid = [150, 7] if per_row else [150, 33]
    q, k, v, kc, vc = _glide_inputs(torch.bfloat16, b, hq, hkv, m, d, n, gen, valid)
    out = K.glide_cross_attention(q, k, v, bound, num_splits=3)
    ref = K.glide_cross_attention_ref(q, kc, vc, bound)
    assert_close(out, ref, torch.bfloat16, "glide cross")
    if per_row:
        assert (out[0, :, 0] == 0).all()     # bound 0: nothing to see


# ---------------------------------------------------------------------------------------------
# KV compaction
# ---------------------------------------------------------------------------------------------


def _accept_case(device, dtype=torch.float32, layers=3, b=2, hkv=2, cap=48, d=64):
    gen = torch.Generator().manual_seed(8)
    kc = torch.randn(layers, b, hkv, cap, d, generator=gen).to(dtype).to(device)
    vc = torch.randn(layers, b, hkv, cap, d, generator=gen).to(dtype).to(device)
    # batch 0: prefix 20, accepted nodes 0, 2, 5, 9 (src >= dst, overlapping ranges);
    # batch 1: prefix 8, accepted nodes 0, 1, 4 (first two already in place); n_accept 3 of J = 4
    src = torch.tensor([[20, 22, 25, 29], [8, 9, 12, 0]], device=device)
    dst = torch.tensor([20, 8], device=device)
    nacc = torch.tensor([4, 3], device=device)
    return kc, vc, src, dst, nacc


def test_compact_kv_5d_overlapping():
    kc, vc, src, dst, nacc = _accept_case(DEV)
    k2, v2 = kc.clone(), vc.clone()
    K.compact_kv(kc, vc, src, dst, nacc)
    K.compact_kv_ref(k2, v2, src, dst, nacc)
    assert torch.equal(kc, k2) and torch.equal(vc, v2)


def test_compact_kv_moves_onto_sources():
    """dst range covers later sources (dst row j == src row k for k < j): gather-then-scatter."""
    kc, vc, _, _, _ = _accept_case(DEV, layers=2, b=1, hkv=1)
    src = torch.tensor([[14, 10, 11, 12]], device=DEV)
    k2, v2 = kc.clone(), vc.clone()
    K.compact_kv(kc, vc, src, 10)
    K.compact_kv_ref(k2, v2, src, 10)
    assert torch.equal(kc, k2) and torch.equal(vc, v2)


@pytest.mark.parametrize("same_storage", [True, False])
def test_compact_kv_layer_lists(same_storage):
    kc, vc, src, dst, nacc = _accept_case(DEV, dtype=torch.bfloat16)
    k2, v2 = kc.clone(), vc.clone()
    if same_storage:
        kl, vl = list(kc.unbind(0)), list(vc.unbind(0))
    else:
        kl, vl = [t.clone() for t in kc.unbind(0)], [t.clone() for t in vc.unbind(0)]
    K.compact_kv(kl, vl, src, dst, nacc)
    K.compact_kv_ref(k2, v2, src, dst, nacc)
    assert torch.equal(torch.stack(kl), k2) and torch.equal(torch.stack(vl), v2)


# ---------------------------------------------------------------------------------------------
# bad input -> clear errors, never a launch
# ---------------------------------------------------------------------------------------------


def _ok(b=1, hq=4, hkv=2, m=3, d=64, n=10, dtype=torch.float32):
    q = torch.randn(b, hq, m, d, device=DEV, dtype=dtype)
    k = torch.randn(b, hkv, n, d, device=DEV, dtype=dtype)
    v = torch.randn(b, hkv, n, d, device=DEV, dtype=dtype)
    mask = torch.ones(b, m, m, dtype=torch.bool, device=DEV).tril()
    return q, k, v, mask


@pytest.mark.parametrize("span", [0, 100, 1024, 4096, 32768, 131072])
@pytest.mark.parametrize("pps,block_m,block_n", [(8, 16, 64), (32, 16, 64), (24, 128, 64), (32, 128, 64), (1, 128, 64)])
def test_pick_num_splits_rules(span, pps, block_m, block_n):
    """The split heuristic's documented rules on a 132-SM device: chunks of >= 4 * block_n keys;
    128-row blocks never start a partial extra wave, and take two waves only for long chunks."""
    from specdec.fast.kernels.tree_attention import pick_num_splits

    sms = 132
    s = pick_num_splits(span, pps, sms, block_n, block_m)
    assert s >= 1
    if span <= 4 * block_n:
        assert s == 1
    else:
        assert s <= -(-span // (4 * block_n))
    if block_m >= 128 and s > 1:
        assert s * pps <= 2 * sms
        if s * pps > sms:  # a second wave: only for long chunks
            assert span // s >= 8192
    if block_m < 128 and span >= 4 * block_n * sms:
        assert s == -(-sms // pps)   # about one program per SM


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v, mk: (q[0], k, v, 2, mk), ValueError, "q must have 4 dims"),
        (lambda q, k, v, mk: (q, k[:, :, :, :32], v, 2, mk), ValueError, "same shape"),
        (lambda q, k, v, mk: (q[:, :3], k, v, 2, mk), ValueError, "multiple of Hkv"),
        (lambda q, k, v, mk: (q[..., :40], k[..., :40], v[..., :40], 2, mk), ValueError, "head dim D=40"),
        (lambda q, k, v, mk: (q, k, v, 2, mk[:, :2]), ValueError, "tree_mask must have shape"),
        (lambda q, k, v, mk: (q, k, v, 2, mk.float()), TypeError, "tree_mask must be a bool"),
        (lambda q, k, v, mk: (q, k, v, 8, mk), ValueError, r"prefix_len must be in \[0, N - M\] = \[0, 7\]"),
        (lambda q, k, v, mk: (q, k, v, -1, mk), ValueError, "prefix_len must be in"),
        (lambda q, k, v, mk: (q, k, v, torch.tensor([9]), mk), ValueError, "prefix_len must be in"),
        (lambda q, k, v, mk: (q, k, v, torch.tensor([2, 2]), mk), ValueError, "prefix_len must have shape"),
        (lambda q, k, v, mk: (q, k, v, torch.tensor([2.0]), mk), TypeError, "integers"),
        (lambda q, k, v, mk: (q, k, v, 2.0, mk), TypeError, "prefix_len must be an int"),
        (lambda q, k, v, mk: (q.half(), k, v, 2, mk), TypeError, "share one dtype"),
        (lambda q, k, v, mk: (q.double(), k.double(), v.double(), 2, mk), TypeError, "supported: float16"),
        (lambda q, k, v, mk: ("q", k, v, 2, mk), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v, mk: (q[:, :, :0], k, v, 2, mk[:, :0, :0]), ValueError, "M >= 1"),
    ],
)
def test_tree_attention_bad_input(mutate, exc, match):
    args = mutate(*_ok())
    with pytest.raises(exc, match=match):
        K.tree_attention(*args)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    q, k, v, mk = (t.cpu() for t in _ok())
    from specdec.fast.kernels import _common

    monkeypatch.setattr(_common, "interpreter_active", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        K.tree_attention(q, k, v, 2, mk)


def test_glide_and_compact_bad_input():
    q, k, v, mk = _ok()
    with pytest.raises(ValueError, match=r"q_pos must be in \[0, N\)"):
        K.glide_self_attention(q, k, v, torch.tensor([[0, 1, 10]], device=DEV))
    with pytest.raises(ValueError, match="window must be"):
        K.glide_self_attention(q, k, v, torch.tensor([[0, 1, 2]], device=DEV), window=0)
    with pytest.raises(ValueError, match="tree_start"):
        K.glide_self_attention(q, k, v, torch.tensor([[0, 1, 2]], device=DEV), tree_mask=mk)
    with pytest.raises(ValueError, match=r"tree_start must be in \[0, N - T\]"):
        K.glide_self_attention(q, k, v, torch.tensor([[8, 8, 9]], device=DEV), tree_mask=mk, tree_start=8)
    with pytest.raises(ValueError, match=r"kv_bound must be in \[0, N\]"):
        K.glide_cross_attention(q, k, v, torch.tensor([[0, 1, 11]], device=DEV))
    with pytest.raises(ValueError, match="kv_bound must have shape"):
        K.glide_cross_attention(q, k, v, torch.tensor([[[1]]], device=DEV))
    kc, vc, src, dst, nacc = _accept_case(DEV)
    with pytest.raises(ValueError, match="5 dims"):
        K.compact_kv(kc[0], vc[0], src, dst, nacc)
    with pytest.raises(ValueError, match="src_index"):
        K.compact_kv(kc, vc, src + 100, dst, nacc)
    with pytest.raises(ValueError, match="destination rows"):
        K.compact_kv(kc, vc, src, dst + 100, nacc)
    with pytest.raises(ValueError, match="n_accept must be in"):
        K.compact_kv(kc, vc, src, dst, nacc + 5)
    with pytest.raises(TypeError, match="share one dtype"):
        K.compact_kv(kc, vc.half(), src, dst, nacc)


# ---------------------------------------------------------------------------------------------
# GPU: the full matrix
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("m", [1, 5, 69, 128])
def test_gpu_tree_matrix_d128(dtype, g, m):
    run_tree_case(dtype, g, m, 128, [1000, 77, 4099], hkv=2, seed=m * 10 + g)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 80, 96])
@pytest.mark.parametrize("m", [1, 5, 69, 128])
def test_gpu_tree_head_dims(dtype, d, m):
    run_tree_case(dtype, 4, m, d, [333, 2050], hkv=2, seed=d + m)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 7, 64])
def test_gpu_tree_long_prefix_splits(splits):
    run_tree_case(torch.bfloat16, 4, 69, 128, [17000, 9], hkv=8, num_splits=splits, cap_extra=300, poison=1e4)


@pytest.mark.gpu
def test_gpu_tree_cuda_graph_capture():
    """Capturable: tensor prefix_len, no host sync; replays with new prefix lengths."""
    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, m, d, cap = 2, 8, 2, 5, 128, 3000
    q = torch.randn(b, hq, m, d, generator=gen).bfloat16().cuda()
    k = torch.randn(b, hkv, cap, d, generator=gen).bfloat16().cuda()
    v = torch.randn(b, hkv, cap, d, generator=gen).bfloat16().cuda()
    mask = random_tree_masks(b, m, gen)
    plen = torch.tensor([100, 200], device="cuda")
    K.tree_attention(q, k, v, plen, mask)   # compile outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        K.tree_attention(q, k, v, plen, mask)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.tree_attention(q, k, v, plen, mask)
    for p in ([100, 200], [2990, 7]):
        plen.copy_(torch.tensor(p))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, tree_attention_ref(q, k, v, plen, mask), torch.bfloat16, f"graph replay {p}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_glide(dtype, d):
    gen = torch.Generator().manual_seed(d)
    b, hq, hkv, m, n = 2, 32, 8, 6, 5000
    q, k, v, kc, vc = _glide_inputs(dtype, b, hq, hkv, m, d, n, gen, [n, 3000])
    pos = torch.tensor([[600, 601, 1000, 1500, 4000, 4999], [10, 20, 2000, 2500, 2998, 2999]], device=DEV)
    out = K.glide_self_attention(q, k, v, pos, window=512)
    assert_close(out, K.glide_self_attention_ref(q, kc, vc, pos, window=512), dtype, "gpu glide self")
    bound = pos + 1
    out = K.glide_cross_attention(q, k, v, bound)
    assert_close(out, K.glide_cross_attention_ref(q, kc, vc, bound), dtype, "gpu glide cross")
    start = torch.tensor([4000, 2900], device=DEV)
    tmask = random_tree_masks(b, m, gen)
    tpos = start[:, None] + torch.arange(m, device=DEV)
    out = K.glide_self_attention(q, k, v, tpos, tree_mask=tmask, tree_start=start)
    assert_close(out, K.glide_self_attention_ref(q, kc, vc, tpos, tree_mask=tmask, tree_start=start), dtype, "gpu glide tree")
    out = K.glide_cross_attention(q, k, v, torch.tensor([4000, 2900], device=DEV))
    assert_close(out, K.glide_cross_attention_ref(q, kc, vc, torch.tensor([4000, 2900], device=DEV)), dtype, "gpu cross L")


@pytest.mark.gpu
def test_gpu_compact_kv_llama_shape():
    gen = torch.Generator().manual_seed(12)
    layers, b, hkv, cap, d = 32, 2, 8, 4096, 128
    kc = torch.randn(layers, b, hkv, cap, d, generator=gen).bfloat16().cuda()
    vc = torch.randn(layers, b, hkv, cap, d, generator=gen).bfloat16().cuda()
    src = torch.tensor([[3000, 3001, 3004, 3010, 3030, 3060], [100, 103, 104, 150, 0, 0]], device="cuda")
    dst = torch.tensor([3000, 100], device="cuda")
    nacc = torch.tensor([6, 4], device="cuda")
    k2, v2 = kc.clone(), vc.clone()
    K.compact_kv(kc, vc, src, dst, nacc)
    K.compact_kv_ref(k2, v2, src, dst, nacc)
    assert torch.equal(kc, k2) and torch.equal(vc, v2)
