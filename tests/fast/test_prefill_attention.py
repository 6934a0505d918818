"""The fast prefill's attention (:func:`specdec.fast.model._prefill_attention`) and the chunked
:func:`specdec.fast.model.prefill` built on it.

A prefill chunk's n queries are the LAST n of the T = p0 + n positions in the layer's K/V, so query i
(position p0 + i) sees keys [0, p0 + i]: a causal mask aligned to the bottom right. The checks:

* CPU, fp32: ``_prefill_attention`` equals an explicit float64 softmax under that boolean mask (GQA and
  MHA, p0 = 0 and p0 > 0, one and several rows, K/V as views into a NaN-poisoned cache), and differs
  from the top-left-aligned mask whenever the two differ (so the alignment is really tested);
* a prompt prefilled in chunks of 3, or in two calls on one cache, gives the same logits and the same
  cache rows as one chunk, and the whole-sequence logits equal :func:`specdec.ref.model.forward`;
* bad input is a ValueError naming the argument;
* GPU (``-m gpu``): in bf16 the flash path is taken, allocates no [B, Hq, T, D] copy of the KV heads,
  and matches the pre-issue-20 path (KV heads repeated + dense boolean mask) within bf16 tolerance;
  fp32 on CUDA takes the fallback and still matches the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import specdec.ref as ref
from lossless import tiny_model
from specdec.fast.model import _prefill_attention, _prefill_sdpa, alloc_cache, as_fast_model, prefill

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bottom_right: bool = True) -> torch.Tensor:
    """Explicit float64 softmax attention, q [B, Hq, n, D] over k/v [B, Hkv, T, D], query head h on KV head
    h // (Hq / Hkv). ``bottom_right``: query i sees keys j <= T - n + i (the prefill's mask); otherwise
    j <= i (top-left, what ``is_causal`` means for n < T) -- used only to show the two differ."""
    b, hq, n, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    offset = t - n if bottom_right else 0
    visible = torch.arange(t)[None, :] <= (offset + torch.arange(n))[:, None]   # [n, T] bool
    out = torch.empty(b, hq, n, d, dtype=torch.float64)
    for h in range(hq):
        kh = k[:, h // (hq // hkv)].double().cpu()
        vh = v[:, h // (hq // hkv)].double().cpu()
        s = q[:, h].double().cpu() @ kh.transpose(-1, -2) / math.sqrt(d)
        out[:, h] = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1) @ vh
    return out


def _qkv(b, hq, hkv, p0, n, d=16, seed=0, device="cpu", dtype=torch.float32, spare=5):
    """q [B, Hq, n, D] and k, v [B, Hkv, p0 + n, D] as views into a longer NaN-filled buffer, like a
    layer's rows of the static cache (rows past T must never be read)."""
    g = torch.Generator().manual_seed(seed)
    t = p0 + n
    q = torch.randn(b, hq, n, d, generator=g)
    kbuf = torch.full((b, hkv, t + spare, d), float("nan"))
    vbuf = torch.full((b, hkv, t + spare, d), float("nan"))
    kbuf[:, :, :t] = torch.randn(b, hkv, t, d, generator=g)
    vbuf[:, :, :t] = torch.randn(b, hkv, t, d, generator=g)
    cast = dict(device=device, dtype=dtype)
    return q.to(**cast), kbuf.to(**cast)[:, :, :t], vbuf.to(**cast)[:, :, :t]


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("p0,n", [(0, 1), (0, 6), (5, 1), (5, 6)], ids=["first-1", "first-6", "after5-1", "after5-6"])
def test_prefill_attention_equals_masked_softmax(hq, hkv, p0, n):
    q, k, v = _qkv(2, hq, hkv, p0, n)
    out = _prefill_attention(q, k, v)
    assert out.shape == (2, hq, n, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    want = _attention_ref(q, k, v)
    assert torch.allclose(out.double(), want, atol=1e-5, rtol=1e-5), (out.double() - want).abs().max()
    if p0 > 0:   # the alignment matters: the top-left mask (is_causal's meaning when n < T) is another answer
        assert not torch.allclose(out.double(), _attention_ref(q, k, v, bottom_right=False), atol=1e-3)


def test_prefill_attention_rejects_bad_shapes():
    q, k, v = _qkv(1, 4, 2, 3, 2)
    with pytest.raises(ValueError, match="4-D"):
        _prefill_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v"):
        _prefill_attention(q, k, v[:, :, :-1])
    with pytest.raises(ValueError, match="k and v"):
        _prefill_attention(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match="multiple"):
        _prefill_attention(torch.randn(1, 3, 2, 16), k, v)
    with pytest.raises(ValueError, match="n = 6"):
        _prefill_attention(torch.randn(1, 4, 6, 16), k, v)   # more queries than positions


def test_prefill_sdpa_cpu_takes_no_flash():
    q, k, v = _qkv(1, 4, 2, 3, 2)
    flash, _ = _prefill_sdpa(q, k, v)
    assert flash is False


# ---------------------------------------------------------------------------------------------
# The chunked prefill of a model
# ---------------------------------------------------------------------------------------------


def _model(kv_heads: int, device="cpu", dtype=torch.float32):
    m = tiny_model("llama", vocab=64, layers=2, hidden=64, heads=4, kv_heads=kv_heads, seed=3, init_std=0.3, max_pos=512)
    m.weights = {name: w.to(device=device, dtype=dtype) for name, w in m.weights.items()}
    return m, as_fast_model(m)


PROMPT = [7, 3, 11, 60, 2, 2, 9, 41, 5, 33, 17]


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_chunked_prefill_equals_one_chunk_and_the_reference(kv_heads):
    model, fm = _model(kv_heads)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    t = ids.shape[1]
    one = alloc_cache(fm, 2, t)
    last_one = prefill(fm, one, ids)                   # a single chunk
    chunked = alloc_cache(fm, 2, t)
    last_chunked = prefill(fm, chunked, ids, chunk_size=3)  # chunks of 3, 3, 3, 2
    assert one.length == chunked.length == t
    assert last_one.shape == (2, 64)
    assert torch.allclose(last_chunked, last_one, atol=1e-4, rtol=1e-4)
    assert torch.allclose(chunked.k[:, :, :, :t], one.k[:, :, :, :t], atol=1e-4, rtol=1e-4)
    assert torch.allclose(chunked.v[:, :, :, :t], one.v[:, :, :, :t], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(one.k[1, :, :, 1:t], one.k[1, :, :, : t - 1], atol=1e-3)   # rows are not all alike
    every = prefill(fm, alloc_cache(fm, 2, t), ids, chunk_size=4, all_logits=True)
    want = ref.forward(model, ids)
    assert every.shape == want.shape == (2, t, 64)
    assert torch.allclose(every, want, atol=1e-4, rtol=1e-4), (every - want).abs().max()
    assert torch.allclose(every[:, -1], last_one, atol=1e-5, rtol=1e-5)


def test_prefill_after_a_cached_prefix_equals_one_call():
    """A prompt prefilled in two calls on one cache: the second call's chunks start at p0 > 0 and read
    the rows the first call wrote (as the draft model's catch-up does)."""
    _, fm = _model(2)
    ids = torch.tensor([PROMPT])
    t = ids.shape[1]
    whole = alloc_cache(fm, 1, t)
    want = prefill(fm, whole, ids)
    pieces = alloc_cache(fm, 1, t)
    prefill(fm, pieces, ids[:, :4])
    assert pieces.length == 4
    got = prefill(fm, pieces, ids[:, 4:], chunk_size=2)
    assert pieces.length == t
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(pieces.k[:, :, :, :t], whole.k[:, :, :, :t], atol=1e-5, rtol=1e-5)
    alone = prefill(fm, alloc_cache(fm, 1, t), ids[:, 4:])   # the same tokens without the prefix: another answer
    assert not torch.allclose(alone, want, atol=1e-3)


def test_prefill_rejects_bad_input():
    _, fm = _model(2)
    cache = alloc_cache(fm, 1, 16)
    ids = torch.tensor([PROMPT])
    with pytest.raises(ValueError, match="chunk_size"):
        prefill(fm, cache, ids, chunk_size=0)
    with pytest.raises(ValueError, match="tokens"):
        prefill(fm, cache, ids[0])
    with pytest.raises(ValueError, match="tokens"):
        prefill(fm, cache, ids[:, :0])
    cache.set_length(cache.capacity - 3)
    with pytest.raises(ValueError, match="overflow"):
        prefill(fm, cache, ids)


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------


def _old_masked_attention(q, k, v):
    """The CUDA prefill attention before issue 20: KV heads repeated for their query heads, a dense
    boolean [n, T] mask, SDPA restricted to EFFICIENT / FLASH / MATH."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, t = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    mask = torch.ones(n, t, dtype=torch.bool, device=q.device).tril(diagonal=t - n)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=mask)


def _extra_bytes(fn) -> tuple[torch.Tensor, int]:
    """``fn()``'s result and the most memory it held beyond what was allocated before it (CUDA)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("p0,n", [(0, 2048), (6144, 2048), (8000, 1)], ids=["first", "after-prefix", "one-row"])
def test_cuda_bf16_flash_path_copies_no_kv_and_matches_old_path(p0, n, monkeypatch):
    """Llama-3-8B heads (32 query, 8 KV, D 128), ``SPECDEC_PREFILL_ATTENTION=flash``: the flash path is chosen;
    one call holds its output (and a small log-sum-exp) beyond its inputs, less than the output plus half of
    ONE repeated K ([B, Hq, T, D]) -- a bound the old path, which repeats K and V, exceeds; the result is the
    old path's."""
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "flash")
    b, hq, hkv, d = 1, 32, 8, 128
    q, k, v = _qkv(b, hq, hkv, p0, n, d=d, device="cuda", dtype=torch.bfloat16, spare=256)
    assert _prefill_sdpa(q, k, v)[0] is True
    _prefill_attention(q, k, v)   # warm up outside the measurement
    _old_masked_attention(q, k, v)
    out, extra = _extra_bytes(lambda: _prefill_attention(q, k, v))
    old, extra_old = _extra_bytes(lambda: _old_masked_attention(q, k, v))
    t = p0 + n
    bound = out.numel() * out.element_size() + b * hq * t * d * 2 // 2
    assert extra < bound < extra_old, (extra, bound, extra_old)
    torch.testing.assert_close(out.float(), old.float(), atol=2e-2, rtol=2e-2)
    if t <= 2048:   # and the float64 reference where it is cheap
        torch.testing.assert_close(out.double().cpu(), _attention_ref(q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_cuda_fp32_fallback_matches_reference(hq, hkv):
    q, k, v = _qkv(2, hq, hkv, 37, 19, d=64, device="cuda", dtype=torch.float32)
    assert _prefill_sdpa(q, k, v)[0] is False   # flash takes fp16/bf16 only
    out = _prefill_attention(q, k, v)
    torch.testing.assert_close(out.double().cpu(), _attention_ref(q, k, v), atol=1e-3, rtol=1e-3)
    assert not torch.allclose(out.double().cpu(), _attention_ref(q, k, v, bottom_right=False), atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)], ids=["fp32", "bf16"])
def test_cuda_chunked_prefill_equals_one_chunk(dtype, tol, monkeypatch):
    """Chunks of 3 tokens give the one-chunk prefill's logits and cache within the dtype's rounding
    (``flash``; fp32 runs the memory-efficient path whatever the mode)."""
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "flash")
    _, fm = _model(2, device="cuda", dtype=dtype)
    ids = torch.tensor([PROMPT, PROMPT[::-1]], device="cuda")
    t = ids.shape[1]
    one = alloc_cache(fm, 2, t)
    last_one = prefill(fm, one, ids)
    chunked = alloc_cache(fm, 2, t)
    last_chunked = prefill(fm, chunked, ids, chunk_size=3)
    torch.testing.assert_close(last_chunked, last_one, atol=tol, rtol=tol)
    torch.testing.assert_close(chunked.k[:, :, :, :t].float(), one.k[:, :, :, :t].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(chunked.v[:, :, :, :t].float(), one.v[:, :, :, :t].float(), atol=tol, rtol=tol)


@pytest.mark.gpu
def test_cuda_bf16_chunked_cudnn_blocks_stay_within_bf16_rounding_of_fp32(monkeypatch):
    """The blocked design over chunks of 3 (every chunk after the first merges 2-3 blocks): its bf16 logits are
    no further from the fp32 prefill's than 3x the bf16 flash one-chunk prefill's distance, plus 0.05. (It does
    not equal the one-chunk bf16 result as flash does: each block's output is rounded to bf16 before the fp32
    merge, and this tiny model amplifies that -- 0.17 on logits of magnitude ~5, BENCHMARKS "Session 14".)
    A wrong mask or block would be off by the logits' own scale."""
    ids = torch.tensor([PROMPT, PROMPT[::-1]], device="cuda")
    t = ids.shape[1]
    _, fm32 = _model(2, device="cuda", dtype=torch.float32)
    want = prefill(fm32, alloc_cache(fm32, 2, t), ids)
    _, fm = _model(2, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "flash")
    flash_err = (prefill(fm, alloc_cache(fm, 2, t), ids) - want).abs().max().item()
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-blocks")
    blocks_err = (prefill(fm, alloc_cache(fm, 2, t), ids, chunk_size=3) - want).abs().max().item()
    print(f"max |logit - fp32|: flash one chunk {flash_err:.4f}, cudnn-blocks chunks of 3 {blocks_err:.4f}")
    assert blocks_err <= 3 * flash_err + 0.05, (blocks_err, flash_err)


# --- the blocked design (SPECDEC_PREFILL_ATTENTION=cudnn-blocks): power-of-two prefix blocks merged by LSE ---


KDEV = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the blocked design's tests run: its merge is a Triton kernel (CUDA, or the interpreter on CPU)."""


def _explicit_attend(q, k, v, causal):
    """One block's (out, natural lse): the reference's attention_with_lse (the cuDNN call's stand-in)."""
    from specdec.ref.attention import attention_with_lse

    n, s = q.shape[2], k.shape[2]
    mask = torch.ones(n, s, dtype=torch.bool, device=q.device)
    return attention_with_lse(q, k, v, mask.tril() if causal else mask)


def test_power_of_two_blocks_cover_the_prefix_with_few_sizes():
    from specdec.fast.model import power_of_two_blocks

    assert power_of_two_blocks(0) == []
    assert power_of_two_blocks(6144) == [(0, 4096), (4096, 6144)]
    assert power_of_two_blocks(13) == [(0, 8), (8, 12), (12, 13)]
    sizes = set()
    for p0 in range(0, 131072, 2048):          # every chunk start of a 128k prompt in 2048-token chunks
        blocks = power_of_two_blocks(p0)
        if blocks:   # consecutive, from 0 to p0
            assert [lo for lo, _ in blocks] == [0] + [hi for _, hi in blocks[:-1]] and blocks[-1][1] == p0
        sizes |= {hi - lo for lo, hi in blocks}
    assert len(sizes) == 6                     # 2048 ... 65536: six shapes plan the whole prefill's prefix blocks
    with pytest.raises(ValueError, match="length must be >= 0"):
        power_of_two_blocks(-1)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("p0,n", [(0, 6), (5, 6), (13, 4), (16, 1), (7, 9)])
def test_blocked_prefill_attention_equals_masked_softmax(hq, hkv, p0, n):
    from specdec.fast.model import _prefill_attention_blocks

    q, k, v = _qkv(2, hq, hkv, p0, n, device=KDEV, dtype=torch.float32)
    got = _prefill_attention_blocks(q, k, v, _explicit_attend)       # blocks in fp32, merged by the Triton kernel
    torch.testing.assert_close(got.double().cpu(), _attention_ref(q.double(), k.double(), v.double()), atol=1e-5, rtol=1e-5)


def test_prefill_attention_mode_is_checked(monkeypatch):
    from specdec.fast.model import prefill_attention_mode

    monkeypatch.delenv("SPECDEC_PREFILL_ATTENTION", raising=False)
    assert prefill_attention_mode() == "auto"
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match=r"SPECDEC_PREFILL_ATTENTION must be one of \('auto', 'flash', 'cudnn-blocks', 'cudnn-prompt'\)"):
        prefill_attention_mode()


def test_auto_mode_picks_blocks_on_hopper_and_falls_back_once(monkeypatch):
    """The decision and the fallback of ``auto``, on the CPU with the device queries and cuDNN stood in: blocks on
    capability >= 9 with cuDNN, not below; a refusal warns once, is remembered, and yields None (-> flash);
    an explicit ``cudnn-blocks`` raises it; ``flash`` never tries."""
    import specdec.fast.model as fmod

    q, k, v = _qkv(1, 4, 2, 40, 8, device=KDEV)
    monkeypatch.setattr(fmod, "_CUDNN_UNUSABLE", set())
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    cap = {"major": 9}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (cap["major"], 0))
    monkeypatch.delenv("SPECDEC_PREFILL_ATTENTION", raising=False)
    assert fmod._use_cudnn_blocks(q)
    cap["major"] = 8
    assert not fmod._use_cudnn_blocks(q)
    cap["major"] = 9
    calls = []
    monkeypatch.setattr(fmod, "_cudnn_attend", lambda *a: (_explicit_attend(*a), calls.append(1))[0])
    got = fmod._try_cudnn_blocks(q, k, v)          # works: the blocked result (here on the stand-in kernel)
    torch.testing.assert_close(got.double().cpu(), _attention_ref(q, k, v), atol=1e-5, rtol=1e-5)

    def refuse(*args):
        raise RuntimeError("cuDNN Frontend error: no valid execution plans built\nmore")

    monkeypatch.setattr(fmod, "_cudnn_attend", refuse)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-blocks")
    with pytest.raises(RuntimeError, match="no valid execution plans"):
        fmod._try_cudnn_blocks(q, k, v)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "auto")
    with pytest.warns(UserWarning, match=r"cuDNN attention refused torch.float32 head dim 16 .*no valid execution plans built\)"):
        assert fmod._try_cudnn_blocks(q, k, v) is None
    assert fmod._CUDNN_UNUSABLE == {(q.device.index, torch.float32, 16)}
    assert not fmod._use_cudnn_blocks(q)            # remembered: no second try, no second warning
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "flash")
    assert fmod._try_cudnn_blocks(q, k, v) is None


@pytest.mark.gpu
@pytest.mark.parametrize("p0,n", [(0, 2048), (6144, 2048), (8000, 1), (10240, 777)], ids=["first", "after-prefix", "one-row", "ragged"])
def test_cuda_bf16_cudnn_blocks_match_flash(p0, n, monkeypatch):
    """Llama-3-8B heads: the blocked cuDNN attention (grouped KV heads read in place, LSE merge) equals the
    flash path within bf16 rounding, on cache-like views with NaN rows past T."""
    q, k, v = _qkv(1, 32, 8, p0, n, d=128, device="cuda", dtype=torch.bfloat16, spare=256)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "flash")
    want = _prefill_attention(q, k, v)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-blocks")
    got = _prefill_attention(q, k, v)
    assert got.dtype == want.dtype and got.shape == want.shape and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("p0,n", [(6144, 2048), (126976, 2048)], ids=["8k", "128k"])
def test_cuda_bf16_cudnn_blocks_hold_little_beyond_the_output(p0, n, monkeypatch):
    """The blocked design folds each block into one fp32 running result as it comes, so a call holds beyond its
    inputs at most four bf16 outputs' worth -- during the first merge the diagonal block's output, the fp32
    result (two) and one prefix block's output; during the last the fp32 result, the block's output and the
    bf16 result -- plus a few [B, H, n] fp32 log-sum-exps and cuDNN's small state, whatever the number of
    prefix blocks (6 at 126976)."""
    q, k, v = _qkv(1, 32, 8, p0, n, d=128, device="cuda", dtype=torch.bfloat16, spare=256)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-blocks")
    _prefill_attention(q, k, v)   # plans the shapes outside the measurement
    out, extra = _extra_bytes(lambda: _prefill_attention(q, k, v))
    out_bytes, lse_bytes = out.numel() * out.element_size(), out.shape[0] * out.shape[1] * out.shape[2] * 4
    assert extra <= 4 * out_bytes + 4 * lse_bytes, (extra, out_bytes, lse_bytes)


@pytest.mark.gpu
def test_cuda_auto_falls_back_to_flash_when_cudnn_refuses(monkeypatch):
    """``auto`` (the default): cuDNN refusing the inputs costs one warning and the flash result, every time
    after that too; an explicit ``cudnn-blocks`` raises instead."""
    import specdec.fast.model as fmod

    q, k, v = _qkv(1, 8, 2, 300, 64, d=64, device="cuda", dtype=torch.bfloat16, spare=16)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "flash")
    want = _prefill_attention(q, k, v)

    def refuse(*args):
        raise RuntimeError("cuDNN Frontend error: no valid execution plans built")

    monkeypatch.setattr(fmod, "_cudnn_attend", refuse)
    monkeypatch.setattr(fmod, "_CUDNN_UNUSABLE", set())
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-blocks")
    with pytest.raises(RuntimeError, match="no valid execution plans"):
        _prefill_attention(q, k, v)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "auto")
    if torch.cuda.get_device_capability()[0] >= 9:
        with pytest.warns(UserWarning, match="cuDNN attention refused torch.bfloat16 head dim 64"):
            got = _prefill_attention(q, k, v)
        assert torch.equal(got, want)
    assert torch.equal(_prefill_attention(q, k, v), want)     # no second try, no second warning


# --- the layer-major prefill (SPECDEC_PREFILL_ATTENTION=cudnn-prompt): one whole-prompt attention per layer ---


def _sdpa_prompt_attend(q, k, v):
    """The whole-prompt causal attention's CPU stand-in for cuDNN: square, top-left = bottom-right."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("t,chunk", [(37, 8), (11, 64), (48, 16)], ids=["ragged", "one-chunk", "padless"])
def test_layer_major_prefill_equals_chunk_major(kv_heads, t, chunk, monkeypatch):
    """:func:`_prefill_by_layer` (per layer: projections in chunks, one whole-prompt attention, the rest in
    chunks) gives the chunk-major prefill's logits -- last and every position -- and cache rows in fp32, on a
    NaN-poisoned cache whose padding rows [T, Tp) it must zero before the attention reads them (granule 16 here,
    so T = 37 attends over 48 rows; without the zeroing every logit is NaN)."""
    import specdec.fast.model as fmod

    monkeypatch.setattr(fmod, "PROMPT_ATTENTION_GRANULE", 16)
    _, fm = _model(kv_heads)
    ids = torch.randint(0, 64, (1, t), generator=torch.Generator().manual_seed(t))
    want_cache = alloc_cache(fm, 1, t)
    want = prefill(fm, want_cache, ids, chunk_size=chunk, all_logits=True)
    for all_logits in (True, False):
        cache = alloc_cache(fm, 1, t)
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        got = fmod._prefill_by_layer(fm, cache, ids, chunk, all_logits, _sdpa_prompt_attend)
        assert cache.length == t
        torch.testing.assert_close(got, want if all_logits else want[:, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.k[:, :, :, :t], want_cache.k[:, :, :, :t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[:, :, :, :t], want_cache.v[:, :, :, :t], atol=1e-5, rtol=1e-5)


def test_layer_major_prefill_is_never_chosen_on_the_cpu(monkeypatch):
    """The CPU (fp32) never takes the layer-major path, whatever the mode: it is a cuDNN path."""
    import specdec.fast.model as fmod

    _, fm = _model(2)
    cache = alloc_cache(fm, 1, 16)
    for mode in ("cudnn-prompt", "auto", "cudnn-blocks", "flash"):
        monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", mode)
        assert not fmod._use_prompt_attention(fm, cache, 16)


def test_auto_layer_major_refusal_restarts_the_row_chunk_major(monkeypatch):
    """Under ``auto``, a refusal of the layer-major whole-prompt call (raised here by a stand-in on the CPU, where
    the path is taken by force) warns once, marks the inputs unusable, and prefills the row chunk-major from the
    start: exactly the chunk-major logits and cache. An explicit ``cudnn-prompt`` raises the refusal; the choice
    itself reads the prompt length against :data:`PROMPT_PREFILL_MAX_TOKENS`, with the device queries stood in."""
    import specdec.fast.model as fmod

    _, fm = _model(2)
    t = 23
    ids = torch.randint(0, 64, (1, t), generator=torch.Generator().manual_seed(5))
    want_cache = alloc_cache(fm, 1, t)
    want = prefill(fm, want_cache, ids, chunk_size=8)

    def refuse(*args):
        raise RuntimeError("cuDNN Frontend error: no valid execution plans built")

    monkeypatch.setattr(fmod, "_use_prompt_attention", lambda fm, cache, t: True)
    monkeypatch.setattr(fmod, "_cudnn_prompt_attend", refuse)
    monkeypatch.setattr(fmod, "_CUDNN_UNUSABLE", set())
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-prompt")
    with pytest.raises(RuntimeError, match="no valid execution plans"):
        prefill(fm, alloc_cache(fm, 1, t), ids, chunk_size=8)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "auto")
    cache = alloc_cache(fm, 1, t)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    with pytest.warns(UserWarning, match="cuDNN attention refused torch.float32 head dim 16"):
        got = prefill(fm, cache, ids, chunk_size=8)
    assert torch.equal(got, want) and cache.length == t
    for got_kv, want_kv in ((cache.k, want_cache.k), (cache.v, want_cache.v)):
        assert torch.equal(got_kv[:, :, :, :t], want_kv[:, :, :, :t])
    assert fmod._CUDNN_UNUSABLE == {(None, torch.float32, 16)}

    monkeypatch.undo()                       # the real rule, on a stand-in CUDA device of compute capability 9
    empty = alloc_cache(fm, 1, 16)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "auto")
    monkeypatch.setattr(fmod, "_CUDNN_UNUSABLE", set())
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(type(fm), "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(type(fm), "dtype", property(lambda self: torch.bfloat16))
    assert fmod._use_prompt_attention(fm, empty, fmod.PROMPT_PREFILL_MAX_TOKENS)
    assert not fmod._use_prompt_attention(fm, empty, fmod.PROMPT_PREFILL_MAX_TOKENS + 1)
    empty.set_length(3)
    assert not fmod._use_prompt_attention(fm, empty, 10)                    # a cached prefix: chunk-major
    empty.set_length(0)
    fmod._CUDNN_UNUSABLE.add((0, torch.bfloat16, 16))
    assert not fmod._use_prompt_attention(fm, empty, 10)                    # refused before: chunk-major
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-blocks")
    assert not fmod._use_prompt_attention(fm, empty, 10)


def test_prefill_chunk_size_is_checked_and_defaults_per_path():
    """``chunk_size``: None (each path's default) or an int >= 1; anything else is a ValueError naming it. On the
    CPU (chunk-major) None means :data:`PREFILL_CHUNK` rows: the same logits as passing it."""
    import specdec.fast.model as fmod

    _, fm = _model(2)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    for bad in (0, -4, 2.5, "8"):
        with pytest.raises(ValueError, match=r"chunk_size must be None or an int >= 1"):
            prefill(fm, alloc_cache(fm, 1, 12), ids, chunk_size=bad)
    got = prefill(fm, alloc_cache(fm, 1, 12), ids)
    assert torch.equal(got, prefill(fm, alloc_cache(fm, 1, 12), ids, chunk_size=fmod.PREFILL_CHUNK))


def _cuda_heads_model(dtype=torch.bfloat16):
    """Two layers with Llama-3-8B's head geometry scaled down: 4 query / 2 KV heads of D 128."""
    m = tiny_model("llama", vocab=256, layers=2, hidden=512, heads=4, kv_heads=2, seed=5, init_std=0.05, max_pos=4096,
                   intermediate=1024)
    m.weights = {name: w.to(device="cuda", dtype=dtype) for name, w in m.weights.items()}
    return as_fast_model(m)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1500, 2048, 3001], ids=["ragged", "whole-granule", "two-granules"])
def test_cuda_bf16_prompt_prefill_matches_chunk_major(t, monkeypatch):
    """``cudnn-prompt`` on CUDA bf16 (layer-major, one whole-prompt cuDNN call per layer, padded to the granule
    and capped by the cache): the flash chunk-major prefill's logits within bf16 rounding, the same first token,
    the same cache rows within rounding, on a NaN-poisoned cache."""
    fm = _cuda_heads_model()
    ids = torch.randint(0, 256, (1, t), generator=torch.Generator().manual_seed(t)).cuda()
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "flash")
    want_cache = alloc_cache(fm, 1, t)
    want = prefill(fm, want_cache, ids, chunk_size=512, all_logits=True)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-prompt")
    cache = alloc_cache(fm, 1, t)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    got = prefill(fm, cache, ids, chunk_size=512, all_logits=True)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=6e-2, rtol=6e-2)
    assert torch.equal(got[:, -1].argmax(-1), want[:, -1].argmax(-1))
    torch.testing.assert_close(cache.k[:, :, :, :t].float(), want_cache.k[:, :, :, :t].float(), atol=6e-2, rtol=6e-2)


@pytest.mark.gpu
def test_cuda_auto_takes_the_layer_major_prefill_onto_an_empty_cache(monkeypatch):
    """``auto`` on Hopper: an empty cache runs layer-major with its own chunk (:data:`PROMPT_PREFILL_CHUNK`),
    giving the explicit ``cudnn-prompt`` prefill's bits; a cached prefix, or a prompt longer than
    :data:`PROMPT_PREFILL_MAX_TOKENS`, runs chunk-major; free memory plays no part."""
    import specdec.fast.model as fmod

    if torch.cuda.get_device_capability()[0] < 9 or not torch.backends.cudnn.is_available():
        pytest.skip("auto takes the cuDNN paths on Hopper-or-newer GPUs with cuDNN only")
    monkeypatch.setattr(fmod, "_CUDNN_UNUSABLE", set())
    fm = _cuda_heads_model()
    t = 3001
    ids = torch.randint(0, 256, (1, t), generator=torch.Generator().manual_seed(1)).cuda()
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-prompt")
    want = prefill(fm, alloc_cache(fm, 1, t + 100), ids, chunk_size=fmod.PROMPT_PREFILL_CHUNK)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "auto")
    cache = alloc_cache(fm, 1, t + 100)
    calls = []
    by_layer = fmod._prefill_by_layer
    monkeypatch.setattr(fmod, "_prefill_by_layer", lambda *a: calls.append(a[3]) or by_layer(*a))
    monkeypatch.setattr(fmod, "free_gpu_bytes", lambda dev: 0)       # not consulted
    assert torch.equal(prefill(fm, cache, ids), want)
    assert calls == [fmod.PROMPT_PREFILL_CHUNK]
    assert not fmod._use_prompt_attention(fm, cache, 5)                                  # a cached prefix
    cache.set_length(0)
    assert fmod._use_prompt_attention(fm, cache, fmod.PROMPT_PREFILL_MAX_TOKENS)
    assert not fmod._use_prompt_attention(fm, cache, fmod.PROMPT_PREFILL_MAX_TOKENS + 1)


@pytest.mark.gpu
def test_cuda_prompt_prefill_raises_a_refusal_and_auto_falls_back_to_flash(monkeypatch):
    """An explicit ``cudnn-prompt`` raises a cuDNN refusal of its whole-prompt call; ``auto`` (chunk-major, blocked
    on Hopper) turns the refusal into one warning and exactly the flash chunk-major result."""
    import specdec.fast.model as fmod

    fm = _cuda_heads_model()
    ids = torch.randint(0, 256, (1, 700), generator=torch.Generator().manual_seed(7)).cuda()
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "flash")
    want = prefill(fm, alloc_cache(fm, 1, 700), ids)

    def refuse(*args):
        raise RuntimeError("cuDNN Frontend error: no valid execution plans built")

    monkeypatch.setattr(fmod, "_cudnn_attend", refuse)
    monkeypatch.setattr(fmod, "_cudnn_prompt_attend", refuse)
    monkeypatch.setattr(fmod, "_CUDNN_UNUSABLE", set())
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "cudnn-prompt")
    with pytest.raises(RuntimeError, match="no valid execution plans"):
        prefill(fm, alloc_cache(fm, 1, 700), ids)
    monkeypatch.setenv("SPECDEC_PREFILL_ATTENTION", "auto")
    if torch.cuda.get_device_capability()[0] >= 9:
        with pytest.warns(UserWarning, match="cuDNN attention refused torch.bfloat16 head dim 128"):
            got = prefill(fm, alloc_cache(fm, 1, 700), ids)
        assert torch.equal(got, want)
    assert torch.equal(prefill(fm, alloc_cache(fm, 1, 700), ids), want)     # remembered: flash from now on
