"""Probe: the cuDNN blocked prefill on small shapes (head dim 16, chunks of 3) against fp64 -- why
test_cuda_chunked_prefill_equals_one_chunk[bf16] fails under ``auto``."""
import os, torch
from specdec.fast import model as fmod
from specdec.ref.attention import attention_with_lse

torch.manual_seed(0)
for (b, hq, hkv, p0, n, d) in [(2, 4, 2, 0, 3, 16), (2, 4, 2, 3, 3, 16), (2, 4, 2, 8, 3, 16), (2, 4, 2, 9, 2, 16),
                              (1, 32, 8, 6144, 2048, 128), (2, 4, 2, 0, 11, 16), (1, 4, 4, 5, 3, 16)]:
    t = p0 + n
    q = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, t, d, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(n, t, dtype=torch.bool).tril(diagonal=p0)
    g = hq // hkv
    ref = attention_with_lse(q.double().cpu(), k.double().cpu(), v.double().cpu(), mask)[0] if t <= 4096 else None
    for mode in ("flash", "cudnn-blocks"):
        os.environ["SPECDEC_PREFILL_ATTENTION"] = mode
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        out = fmod._prefill_attention(q, k, v)
        torch.cuda.synchronize(); extra = torch.cuda.max_memory_allocated() - base
        if ref is None:
            ref = out.double().cpu()
        err = (out.double().cpu() - ref).abs().max().item()
        print(f"b{b} hq{hq} hkv{hkv} p0 {p0} n {n} d {d} {mode:13s} maxerr {err:.4f} extraMB {extra/2**20:.1f}")
    # raw cudnn block lse layout
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k[:, :, p0:], v[:, :, p0:], None, True, 0.0, True, False, scale=d ** -0.5)
    print("   lse shape", tuple(r[1].shape), "stride", r[1].stride(), "out stride", r[0].stride())

# the chunked-prefill drift of tests/fast/test_prefill_attention.py::test_cuda_chunked_prefill_equals_one_chunk
import sys
sys.path.insert(0, "tests")
from lossless import tiny_model
from specdec.fast.model import alloc_cache, as_fast_model, prefill

PROMPT = [7, 3, 11, 60, 2, 2, 9, 41, 5, 33, 17]
m = tiny_model("llama", vocab=64, layers=2, hidden=64, heads=4, kv_heads=2, seed=3, init_std=0.3, max_pos=512)
m.weights = {name: w.to(device="cuda", dtype=torch.bfloat16) for name, w in m.weights.items()}
fm = as_fast_model(m)
ids = torch.tensor([PROMPT, PROMPT[::-1]], device="cuda")
t = ids.shape[1]
for mode in ("flash", "cudnn-blocks"):
    os.environ["SPECDEC_PREFILL_ATTENTION"] = mode
    one = alloc_cache(fm, 2, t); a = prefill(fm, one, ids)
    ch = alloc_cache(fm, 2, t); c = prefill(fm, ch, ids, chunk_size=3)
    dk = (ch.k[:, :, :, :t].float() - one.k[:, :, :, :t].float()).abs().max().item()
    print(f"chunked(3) vs one chunk, {mode:13s}: logits max|diff| {(a - c).abs().max().item():.4f} "
          f"(max|logit| {a.abs().max().item():.2f}), k max|diff| {dk:.4f}")
