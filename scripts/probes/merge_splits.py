"""Probe (session 6): split counts of ``tree_attention`` and merge-kernel variants at the 8B attention shapes.

For Llama-3-8B (Hq 32 / Hkv 8) and Vicuna-7B (32 / 32) attention, D 128, bf16, prefixes 1k/4k/32k and
M in {1, 69} it times (CUDA-graph replay, L2 flushed, median of 30; each time includes the ~4 us
replay floor): the full ``tree_attention`` with the default and other split counts; the pre-session-6
merge (``_merge_tile``: all partials of a few rows as one [parts, rows, D] tile) at several tile sizes;
and the streamed merge (``_merge_loop``: one partial per pipelined iteration, a running max -- what
``_merge_kernel`` became) at several row counts, warps and pipeline depths. Prints a table, writes
``$OUT/probe_merge_splits.jsonl``.

    python3 scripts/probes/merge_splits.py
"""
from __future__ import annotations
import json, math, os, statistics, sys
import torch, triton, triton.language as tl
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import graphed, time_ms as _bench_time_ms  # noqa: E402  (the kernel benchmark's timers)
from specdec.fast.kernels.tree_attention import tree_attention, pick_num_splits
from specdec.fast.kernels._common import sm_count

OUT = os.environ.get("OUT", "/tmp")


@triton.jit(do_not_specialize=["ROWS", "NUM_PARTS"])
def _merge_tile(
    O_part, L_part, Out,
    stride_pz, stride_pp, stride_pr,
    stride_lz, stride_lp,
    stride_ob, stride_oh, stride_om, stride_od,
    H_KV, ROWS, NUM_PARTS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program merges BLOCK_R packed rows; their partials are loaded as one [BLOCK_P, BLOCK_R,
    # BLOCK_D] tile (a loop over single partials would be a chain of dependent memory latencies).
    pid_r = tl.program_id(0)
    pid_z = tl.program_id(1)
    b = pid_z // H_KV
    hkv = pid_z % H_KV
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < ROWS
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    l_base = L_part + pid_z.to(tl.int64) * stride_lz + offs_r[None, :]                          # [1, R]
    o_base = (O_part + pid_z.to(tl.int64) * stride_pz + offs_r[None, :, None] * stride_pr
              + offs_d[None, None, :])                                                        # [1, R, D]

    # -- pass 1: the largest base-2 lse of every row over all partials ---------------------------
    m_tile = tl.full([BLOCK_P, BLOCK_R], float("-inf"), dtype=tl.float32)
    for p0 in range(0, NUM_PARTS, BLOCK_P):
        p_ok = (p0 + offs_p < NUM_PARTS)[:, None] & r_ok[None, :]
        lse = tl.load(l_base + (p0 + offs_p)[:, None] * stride_lp, mask=p_ok, other=float("-inf"))
        m_tile = tl.maximum(m_tile, lse)
    m = tl.max(m_tile, 0)
    m = tl.where(m == float("-inf"), 0.0, m)   # all partials empty: every weight is exp2(-inf) = 0

    # -- pass 2: weights 2^(lse_p - max), weighted sum of the normalised partial outputs ---------
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    w_tile = tl.zeros([BLOCK_P, BLOCK_R], dtype=tl.float32)
    for p0 in range(0, NUM_PARTS, BLOCK_P):
        p_ok = (p0 + offs_p < NUM_PARTS)[:, None] & r_ok[None, :]
        w = tl.math.exp2(tl.load(l_base + (p0 + offs_p)[:, None] * stride_lp, mask=p_ok, other=float("-inf")) - m[None, :])
        o_p = tl.load(o_base + (p0 + offs_p)[:, None, None] * stride_pp,
                      mask=p_ok[:, :, None] & d_ok[None, None, :], other=0.0)
        acc += tl.sum(w[:, :, None] * o_p, 0)
        w_tile += w
    wsum = tl.sum(w_tile, 0)
    out = acc / tl.where(wsum > 0.0, wsum, 1.0)[:, None]

    # -- write rows r = node * GROUP + g of [B, Hq, M, D] in the output dtype ---------------------
    node = offs_r // GROUP
    head = hkv * GROUP + offs_r % GROUP
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh
              + node[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])



@triton.jit(do_not_specialize=["ROWS", "NUM_PARTS"])
def _merge_loop(O_part, L_part, Out, stride_pz, stride_pp, stride_pr, stride_lz, stride_lp,
                stride_ob, stride_oh, stride_om, stride_od, H_KV, ROWS, NUM_PARTS,
                GROUP: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr):
    pid_r = tl.program_id(0); pid_z = tl.program_id(1)
    b = pid_z // H_KV; hkv = pid_z % H_KV
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R); r_ok = offs_r < ROWS
    offs_d = tl.arange(0, D)
    lb = L_part + pid_z.to(tl.int64) * stride_lz + offs_r
    ob = O_part + pid_z.to(tl.int64) * stride_pz + offs_r[:, None] * stride_pr + offs_d[None, :]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    w = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for p in tl.range(0, NUM_PARTS, num_stages=STAGES):
        lse = tl.load(lb + p * stride_lp, mask=r_ok, other=float("-inf"))
        o = tl.load(ob + p * stride_pp, mask=r_ok[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        ms = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.math.exp2(m - ms); e = tl.math.exp2(lse - ms)
        acc = acc * a[:, None] + o * e[:, None]
        w = w * a + e
        m = m_new
    out = acc / tl.where(w > 0, w, 1.0)[:, None]
    node = offs_r // GROUP; head = hkv * GROUP + offs_r % GROUP
    tl.store(Out + b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh + node[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=r_ok[:, None])


def time_ms(fn, flush, reps=30):
    """Median ms of ``fn()`` with L2 flushed before each rep (scripts/bench_kernels.py's timer)."""
    return _bench_time_ms(fn, flush, reps)


def main():
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    sms = sm_count(torch.device("cuda"))
    res = []
    out_f = open(os.path.join(OUT, "probe_merge_splits.jsonl"), "a")
    for hq, hkv in ((32, 8), (32, 32)):
        for span in (1024, 4096, 32768):
            for m in (1, 69):
                g = torch.Generator(device="cuda").manual_seed(0)
                q = torch.randn(1, hq, m, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                k = torch.randn(1, hkv, span + m, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                v = torch.randn_like(k)
                mask = torch.ones(1, m, m, dtype=torch.bool, device="cuda").tril_()
                ref = tree_attention(q, k, v, span, mask)
                t0 = time_ms(graphed(lambda: tree_attention(q, k, v, span, mask)), flush)
                rows = m * hq // hkv
                from specdec.fast.kernels.tree_attention import pick_config
                cfg = pick_config(rows, 128, torch.bfloat16)
                rb = triton.cdiv(rows, cfg["block_m"])
                nsd = pick_num_splits(span, hkv * rb, sms, cfg["block_n"], cfg["block_m"])
                res.append(dict(hq=hq, hkv=hkv, span=span, m=m, what=f"default sp{nsd}", us=t0 * 1e3))
                print(json.dumps(res[-1]), flush=True)
                for ns in sorted({max(1, nsd // 2), nsd * 2, nsd * 4, triton.cdiv(span, cfg["block_n"])}):
                    if ns > triton.cdiv(span, cfg["block_n"]) or ns == nsd:
                        continue
                    t = time_ms(graphed(lambda: tree_attention(q, k, v, span, mask, num_splits=ns)), flush)
                    res.append(dict(hq=hq, hkv=hkv, span=span, m=m, what=f"splits {ns}", us=t * 1e3)); print(json.dumps(res[-1]), flush=True)
                # merge alone on the default partials
                parts = nsd + 1
                o_part = torch.randn((hkv, parts, rows, 128), device="cuda")
                l_part = torch.randn((hkv, parts, rows), device="cuda")
                out = torch.empty((1, m, hq, 128), device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                for bp, br, nw in ((16, 4, 4), (8, 8, 4), (16, 8, 4), (8, 4, 4), (8, 16, 8), (16, 4, 2), (8, 2, 2)):
                    def mk(bp=bp, br=br, nw=nw):
                        def f():
                            _merge_tile[(triton.cdiv(rows, br), hkv)](o_part, l_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                l_part.stride(0), l_part.stride(1), *out.stride(), hkv, rows, parts, GROUP=hq // hkv, HEAD_DIM=128,
                                BLOCK_R=br, BLOCK_P=bp, BLOCK_D=128, num_warps=nw)
                        return f
                    t = time_ms(graphed(mk()), flush)
                    res.append(dict(hq=hq, hkv=hkv, span=span, m=m, what=f"merge p{bp} r{br} w{nw} parts{parts}", us=t * 1e3)); print(json.dumps(res[-1]), flush=True)
                ref_out = out.clone()
                for br, nw, st in ((4, 4, 2), (8, 4, 2), (16, 4, 2), (8, 4, 3), (32, 4, 2), (16, 8, 2), (2, 1, 2), (4, 2, 2)):
                    def mk2(br=br, nw=nw, st=st):
                        def f():
                            _merge_loop[(triton.cdiv(rows, br), hkv)](o_part, l_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                l_part.stride(0), l_part.stride(1), *out.stride(), hkv, rows, parts, GROUP=hq // hkv, D=128,
                                BLOCK_R=br, STAGES=st, num_warps=nw)
                        return f
                    out.zero_(); mk2()(); torch.cuda.synchronize()
                    err = (out.float() - ref_out.float()).abs().max().item()
                    t = time_ms(graphed(mk2()), flush)
                    res.append(dict(hq=hq, hkv=hkv, span=span, m=m, what=f"loop r{br} w{nw} st{st} err{err:.3g}", us=t * 1e3)); print(json.dumps(res[-1]), flush=True)
                for r in res:
                    out_f.write(json.dumps(r) + "\n")
                del q, k, v
    print(tabulate([[r["hq"], r["hkv"], r["span"], r["m"], r["what"], f"{r['us']:.1f}"] for r in res], headers=["hq", "hkv", "span", "M", "what", "us"], tablefmt="github"))


if __name__ == "__main__":
    main()
