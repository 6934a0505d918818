"""Probe (session 6): can Hopper TMA loads / Triton's automatic warp specialisation speed up the
M = 69 prefix attention?  And where does a decode step of the 8B shapes spend its time?

``a``: a prefix-only split-KV attention kernel (the tree kernel's prefix loop, no masks) that loads
K/V tiles through tensor descriptors -- host-built (``TensorDescriptor``) or device-built
(``tl.make_tensor_descriptor``), optionally with ``tl.range(..., warp_specialize=True)`` -- for
several tile shapes and split counts, against the library's ``tree_attention`` (Llama-3-8B attention
shape, bf16, prefixes 16k and 32k, M = 69; CUDA-graph replay, L2 flushed, median of 20).
``b``: ``torch.profiler`` kernel totals of one eager ``step_forward`` (M = 1 and M = 69) at 1k
context for the Llama-3-8B and Vicuna-7B shapes, plus single-weight ``F.linear`` timings.

    python3 scripts/probes/prefix_tma.py [a] [b]      # tables on stdout, JSONL in $OUT/probe_prefix_tma.jsonl
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import traceback

import torch
import triton
import triton.language as tl
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import graphed, time_ms as _bench_time_ms  # noqa: E402  (the kernel benchmark's timers)

from specdec.fast.kernels.tree_attention import _merge_kernel, tree_attention, LOG2E

OUT = os.environ.get("OUT", "/tmp")
HQ, HKV, D = 32, 8, 128
DT = torch.bfloat16

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover
    TensorDescriptor = None

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


@triton.jit
def _pfx_kernel(Q, K, V, O_part, L_part, desc_k, desc_v,
                stride_qh, stride_qm, stride_pz, stride_pp, stride_pr, stride_lz, stride_lp,
                qk_scale, H_KV, M, SPAN, CAP, NUM_SPLITS,
                GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DEVICE_DESC: tl.constexpr, WS: tl.constexpr, TOTAL_ROWS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_z = tl.program_id(2)
    hkv = pid_z % H_KV
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < M * GROUP
    node = offs_r // GROUP
    head = hkv * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, D)
    q = tl.load(Q + head[:, None] * stride_qh + node[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if DEVICE_DESC:
        dk = tl.make_tensor_descriptor(K, shape=[TOTAL_ROWS, D], strides=[D, 1], block_shape=[BLOCK_N, D])
        dv = tl.make_tensor_descriptor(V, shape=[TOTAL_ROWS, D], strides=[D, 1], block_shape=[BLOCK_N, D])
    else:
        dk = desc_k
        dv = desc_v
    chunk = tl.cdiv(tl.cdiv(SPAN, NUM_SPLITS), BLOCK_N) * BLOCK_N
    n_start = pid_s * chunk
    n_end = tl.minimum(n_start + chunk, SPAN)
    base = pid_z * CAP
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for n0 in tl.range(n_start, n_end, BLOCK_N, warp_specialize=WS):
        k = dk.load([base + n0, 0])
        v = dv.load([base + n0, 0])
        qk = tl.dot(q, k.T) * qk_scale
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    o = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)
    p_ptrs = O_part + pid_z * stride_pz + pid_s * stride_pp + offs_r[:, None] * stride_pr + offs_d[None, :]
    tl.store(p_ptrs, o, mask=row_ok[:, None])
    tl.store(L_part + pid_z * stride_lz + pid_s * stride_lp + offs_r, lse, mask=row_ok)


def proto_attention(q, k, v, span, cfg):
    """Prefix-only attention (every query sees keys [0, span)), k/v [1, Hkv, CAP, D] contiguous."""
    b, hq, m, d = q.shape
    hkv, cap = k.shape[1], k.shape[2]
    group = hq // hkv
    rows = m * group
    bm, bn = cfg["bm"], cfg["bn"]
    splits = cfg["splits"]
    assert span % (splits * bn) == 0
    rb = triton.cdiv(rows, bm)
    o_part = torch.empty((hkv, splits, rows, d), device=q.device, dtype=torch.float32)
    l_part = torch.empty((hkv, splits, rows), device=q.device, dtype=torch.float32)
    out = torch.empty((b, m, hq, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    k2 = k.view(-1, d)
    v2 = v.view(-1, d)
    if cfg["dev"]:
        dk = dv = 0
    else:
        dk = TensorDescriptor.from_tensor(k2, [bn, d])
        dv = TensorDescriptor.from_tensor(v2, [bn, d])

    def launch():
        _pfx_kernel[(rb, splits, hkv)](
            q, k2, v2, o_part, l_part, dk, dv,
            q.stride(1), q.stride(2), o_part.stride(0), o_part.stride(1), o_part.stride(2),
            l_part.stride(0), l_part.stride(1),
            LOG2E / math.sqrt(d), hkv, m, span, cap, splits,
            GROUP=group, D=d, BLOCK_M=bm, BLOCK_N=bn, DEVICE_DESC=cfg["dev"], WS=cfg["ws"], TOTAL_ROWS=k2.shape[0],
            num_warps=cfg["warps"], num_stages=cfg["stages"])
        _merge_kernel[(triton.cdiv(rows, 8), hkv)](
            o_part, l_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
            l_part.stride(0), l_part.stride(1), *out.stride(), hkv, rows, splits,
            GROUP=group, HEAD_DIM=d, BLOCK_R=8, BLOCK_D=d, STAGES=3, num_warps=4)
        return out
    return launch


def time_ms(fn, flush, reps=20):
    """Median ms of ``fn()`` with L2 flushed before each rep (scripts/bench_kernels.py's timer)."""
    return _bench_time_ms(fn, flush, reps)


def part_a(out, flush, prefixes=(16384, 32768), m=69):
    rows_out = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for prefix in prefixes:
        g = torch.Generator(device="cuda").manual_seed(0)
        cap = prefix + 128
        q = torch.randn(1, HQ, m, D, device="cuda", dtype=DT, generator=g)
        k = torch.randn(1, HKV, cap, D, device="cuda", dtype=DT, generator=g)
        v = torch.randn(1, HKV, cap, D, device="cuda", dtype=DT, generator=g)
        # reference: prefix only
        kr = k[:, :, :prefix].repeat_interleave(HQ // HKV, 1)
        vr = v[:, :, :prefix].repeat_interleave(HQ // HKV, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr)
        del kr, vr
        mask = torch.ones(1, m, m, dtype=torch.bool, device="cuda").tril_()
        base_fn = graphed(lambda: tree_attention(q, k[:, :, :prefix + m], v[:, :, :prefix + m], prefix, mask))
        t_base = time_ms(base_fn, flush)
        one = torch.randn(1, HQ, 1, D, device="cuda", dtype=DT)
        m1 = torch.ones(1, 1, 1, dtype=torch.bool, device="cuda")
        t_m1 = time_ms(graphed(lambda: tree_attention(one, k[:, :, :prefix + 1], v[:, :, :prefix + 1], prefix, m1)), flush)
        rows_out.append(dict(prefix=prefix, variant="baseline M=1", us=t_m1 * 1e3, err=0.0))
        rows_out.append(dict(prefix=prefix, variant="baseline M=69", us=t_base * 1e3, err=0.0))
        variants = []
        for bm, bn, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 4)):
            for dev, ws in ((False, False), (True, False), (True, True)):
                for mult in (1, 2):
                    variants.append(dict(bm=bm, bn=bn, warps=warps, stages=stages, dev=dev, ws=ws, mult=mult))
        for cfg in variants:
            rb = triton.cdiv(m * HQ // HKV, cfg["bm"])
            want = max(1, (cfg["mult"] * sms) // (rb * HKV))
            splits = want
            while prefix % (splits * cfg["bn"]):
                splits -= 1
            cfg["splits"] = splits
            name = f"bm{cfg['bm']} bn{cfg['bn']} w{cfg['warps']} s{cfg['stages']} {'dev' if cfg['dev'] else 'host'}{' ws' if cfg['ws'] else ''} sp{splits}"
            try:
                fn = proto_attention(q, k, v, prefix, cfg)
                o = fn()
                torch.cuda.synchronize()
                err = (o.float() - ref.float()).abs().max().item()
                t = time_ms(graphed(fn), flush)
                rows_out.append(dict(prefix=prefix, variant=name, us=t * 1e3, err=err))
            except Exception as e:  # noqa: BLE001
                rows_out.append(dict(prefix=prefix, variant=name, us=float("nan"), err=float("nan"),
                                     error=f"{type(e).__name__}: {str(e)[:200]}"))
            print(json.dumps(rows_out[-1]), flush=True)
            out.write(json.dumps(dict(kind="proto", **rows_out[-1])) + "\n")
        del q, k, v, ref
        torch.cuda.empty_cache()
    print(tabulate([[r["prefix"], r["variant"], f"{r['us']:.1f}", f"{r['err']:.4f}", r.get("error", "")[:60]] for r in rows_out],
                   headers=["prefix", "variant", "us", "max err", "error"], tablefmt="github"), flush=True)


def part_b(out, shapes=("vicuna-7b", "llama3-8b"), ctx=1024):
    from specdec.fast.model import as_fast_model, prefill, step_forward
    from specdec.benchutil import kernel_totals, random_model

    for shape in shapes:
        fm = as_fast_model(random_model(shape, device="cuda"))
        cache = fm.ensure_cache(1, ctx + 256)
        ids = torch.randint(0, fm.config.vocab_size, (1, ctx), device="cuda")
        prefill(fm, cache, ids, chunk_size=4096)
        for m in (1, 69):
            tok = torch.zeros(1, m, dtype=torch.long, device="cuda")
            pos = torch.arange(m, device="cuda")[None] + cache.length
            mask = torch.ones(1, m, m, dtype=torch.bool, device="cuda").tril_()
            with torch.inference_mode():
                total, rows = kernel_totals(lambda: step_forward(fm, cache, tok, pos, mask, cache.length_t), reps=5, warmup=3)
            print(f"\n{shape} ctx {ctx} M={m}: kernel ms per step {total:.3f}")
            print(tabulate([[r[0], r[1], f"{r[2]:.3f}"] for r in rows[:14]], headers=["kernel", "calls/step", "ms/step"], tablefmt="github"), flush=True)
            out.write(json.dumps(dict(kind="profile", shape=shape, ctx=ctx, m=m, total_ms=total, rows=rows[:20])) + "\n")
        # GEMV micro: each weight at M=1 alone (L2 flushed)
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
        x = torch.randn(1, 1, fm.config.hidden_size, device="cuda", dtype=DT)
        res = []
        for name in ("layers.0.wqkv", "layers.0.wo", "layers.0.w13", "layers.0.w2", "lm_head"):
            w = fm.w[name]
            xi = torch.randn(1, 1, w.shape[1], device="cuda", dtype=DT)
            t = time_ms(lambda: torch.nn.functional.linear(xi, w), flush, reps=30)
            res.append([name, tuple(w.shape), f"{t * 1e3:.1f}", f"{w.numel() * 2 / (t * 1e-3) / 1e12:.2f}"])
        print(tabulate(res, headers=["weight", "shape", "us", "TB/s"], tablefmt="github"), flush=True)
        out.write(json.dumps(dict(kind="gemv", shape=shape, rows=res)) + "\n")
        fm.caches.clear(); fm.graphs.clear()
        del fm
        torch.cuda.empty_cache()


if __name__ == "__main__":
    which = sys.argv[1:] or ["a", "b"]
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    with open(os.path.join(OUT, "probe_prefix_tma.jsonl"), "a") as out:
        if "a" in which:
            try:
                part_a(out, flush)
            except Exception:
                traceback.print_exc()
        if "b" in which:
            part_b(out)
