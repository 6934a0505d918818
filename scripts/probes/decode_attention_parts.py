#!/usr/bin/env python3
"""Probe (session 33): where the one-token step's decode attention spends its time -- the split kernel vs the merge.

``decode_attention`` is two launches: the split kernel (one program per row block x KV head x split, each writing
an fp32 partial) and :func:`merge_partials` (the partials merged in split order). At the Llama-3-8B attention
shape (32 query heads, 8 KV heads, D 128, bf16) this probe times, per call, as a CUDA graph of ``--layers``
back-to-back calls each on its own K/V (L2 flushed before the graph):

* ``full``: the library call (split kernel + merge);
* ``split only``: the same call with the merge replaced by nothing (the partials are written, never merged);
* ``merge only``: :func:`merge_partials` alone on partials of that call's shape, at each ``--merge-stages``
  pipeline depth (the same bits at every depth), and a third design, ``lanes`` (see :func:`_merge_lanes_kernel`;
  the second, a max-first chunked merge, was 1.4-4x slower than the library's and is recorded in BENCHMARKS
  "Session 34"). Its check: a row merged over P partials equals the same row merged over P + 3 with the last
  three empty (a one-token step vs a deeper tree row at the same position), and a row merged alone equals it
  merged among others.

    python3 scripts/probes/decode_attention_parts.py [--contexts 32768 131072] [--rows 1 69] [--layers 8] [--reps 10] [--merge-stages 3 10] [--lanes 8:8:32 16:4:32:2]
    # table on stdout, JSONL in $OUT/probe_decode_attention_parts.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import copy_bandwidth, graphed, time_ms  # noqa: E402  (the kernel benchmark's timers)

import importlib

da = importlib.import_module("specdec.fast.kernels.decode_attention")   # the module (the package exports the function)
from specdec.fast.kernels.tree_attention import merge_partials  # noqa: E402
from specdec.shared.tree import Tree  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
HQ, HKV, D = 32, 8, 128


@triton.jit(do_not_specialize=["ROWS", "NUM_PARTS"])
def _merge_lanes_kernel(
    O_part, L_part, Out,
    stride_pz, stride_pp, stride_pr, stride_lz, stride_lp,
    stride_ob, stride_oh, stride_om, stride_od,
    H_KV, ROWS, NUM_PARTS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    LANES: tl.constexpr, STAGES: tl.constexpr,
):
    """The third merge design ("lanes"): partial p goes to lane p % LANES; each lane keeps the library's running
    base-2 max merge over its own partials (LANES partials loaded per iteration, so the serial chain is
    ceil(P / LANES) long instead of P), then the LANES states are combined by one fixed-shape reduction. Grid:
    (row blocks, B*Hkv, D blocks). Every constexpr is the same for every M, so a row's order is fixed; a partial
    that is empty for the row (lse -inf, o 0) leaves its lane's state unchanged exactly, so extra trailing
    partials (a deeper tree row at the same position) change no bit. Its row mapping and output store are
    :func:`specdec.fast.kernels.tree_attention._merge_kernel`'s, written out here only while the design is a
    candidate; if it wins, it replaces that kernel rather than sitting beside it."""
    pid_r = tl.program_id(0)
    pid_z = tl.program_id(1)
    pid_d = tl.program_id(2)
    b = pid_z // H_KV
    hkv = pid_z % H_KV
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < ROWS
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_w = tl.arange(0, LANES)
    l_base = L_part + pid_z.to(tl.int64) * stride_lz + offs_r[None, :]                               # [1, R]
    o_base = (O_part + pid_z.to(tl.int64) * stride_pz + offs_r[None, :, None] * stride_pr
              + offs_d[None, None, :])                                                                # [1, R, D]
    m = tl.full([LANES, BLOCK_R], float("-inf"), dtype=tl.float32)
    wsum = tl.zeros([LANES, BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([LANES, BLOCK_R, BLOCK_D], dtype=tl.float32)
    for p0 in tl.range(0, NUM_PARTS, LANES, num_stages=STAGES):
        p = p0 + offs_w
        ok = (p < NUM_PARTS)[:, None] & r_ok[None, :]                                                 # [W, R]
        lse = tl.load(l_base + p[:, None] * stride_lp, mask=ok, other=float("-inf"))
        o_p = tl.load(o_base + p[:, None, None] * stride_pp, mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        acc = acc * alpha[:, :, None] + w[:, :, None] * o_p
        wsum = wsum * alpha + w
        m = m_new
    mx = tl.max(m, 0)                                                  # [R], exact in any order
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    s = tl.math.exp2(m - mx_safe[None, :])                             # [W, R]; a lane that saw nothing: 0
    num = tl.sum(acc * s[:, :, None], 0)
    den = tl.sum(wsum * s, 0)
    out = num / tl.where(den > 0.0, den, 1.0)[:, None]
    node = offs_r // GROUP
    head = hkv * GROUP + offs_r % GROUP
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh
              + node[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def merge_lanes(o_part, l_part, out, hkv, group, lanes=8, block_r=8, block_d=32, stages=2, num_warps=4):
    """Launch :func:`_merge_lanes_kernel` (same arguments and result layout as ``merge_partials``)."""
    rows, d, parts = o_part.shape[2], o_part.shape[3], o_part.shape[1]
    _merge_lanes_kernel[(triton.cdiv(rows, block_r), o_part.shape[0], triton.cdiv(d, block_d))](
        o_part, l_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
        *out.stride(), hkv, rows, parts, GROUP=group, HEAD_DIM=d, BLOCK_R=block_r, BLOCK_D=block_d,
        LANES=lanes, STAGES=stages, num_warps=num_warps, enable_fp_fusion=False)
    return out


def lanes_trailing_empty_ok(o_part, l_part, hkv, group, **cfg) -> bool:
    """A row merged over P partials == the same row over P + 3 (and P + LANES + 1) partials whose extra ones are
    empty for it, and a row's bits do not depend on how many rows the call merges."""
    z, parts, rows, d = o_part.shape
    dev = o_part.device
    ok = True
    a = merge_lanes(o_part, l_part, torch.empty(1, z * group, rows // group, d, device=dev), hkv, group, **cfg)
    for extra in (3, cfg.get("lanes", 8) + 1):
        o2 = torch.cat([o_part, torch.zeros(z, extra, rows, d, device=dev)], 1)
        l2 = torch.cat([l_part, torch.full((z, extra, rows), float("-inf"), device=dev)], 1)
        ok &= torch.equal(a, merge_lanes(o2, l2, torch.empty_like(a), hkv, group, **cfg))
    if rows > group:   # the first node's rows merged alone
        a1 = merge_lanes(o_part[:, :, :group].contiguous(), l_part[:, :, :group].contiguous(),
                         torch.empty(1, z * group, 1, d, device=dev), hkv, group, **cfg)
        ok &= torch.equal(a1[:, :, 0], a[:, :, 0])
    return bool(ok)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 69])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--merge-stages", type=int, nargs="*", default=[3], help="pipeline depths of the merge to time "
                    "(merge only; outputs compared bitwise against the first)")
    ap.add_argument("--lanes", nargs="*", default=["8:8:32"], help="lanes merge configs LANES:BLOCK_R:BLOCK_D[:WARPS]")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    bw = copy_bandwidth(flush) * 1e9
    table, log = [], []
    for ctx in args.contexts:
        g = torch.Generator(device=dev).manual_seed(ctx)
        kvs = [(torch.randn(1, HKV, ctx + 128, D, device=dev, dtype=dt, generator=g),
                torch.randn(1, HKV, ctx + 128, D, device=dev, dtype=dt, generator=g)) for _ in range(args.layers)]
        for m in args.rows:
            parents = [-1] + [max(0, (i - 1) // 4) for i in range(1, m)]
            mask = Tree.from_parents(parents).ancestor_mask(dev)[None]
            anc = da.ancestor_table(mask)
            q = torch.randn(1, HQ, m, D, device=dev, dtype=dt, generator=g)
            plen = torch.tensor([ctx], dtype=torch.int32, device=dev)

            def call(kk, vv):
                return da.decode_attention(q, kk, vv, plen, mask, ancestors=anc, max_prefix=ctx)

            def per_call_us(calls) -> float:   # ``calls()`` runs len(kvs) calls: one graph of them, us per call
                return time_ms(graphed(calls), flush, args.reps) / len(kvs) * 1e3

            full = per_call_us(lambda: [call(kk, vv) for kk, vv in kvs])
            real_merge = da.merge_partials
            da.merge_partials = lambda o_part, l_part, out, hkv, group: out   # the split kernel alone
            try:
                split = per_call_us(lambda: [call(kk, vv) for kk, vv in kvs])
            finally:
                da.merge_partials = real_merge
            group = HQ // HKV
            parts = da.num_splits_for(ctx + m)
            o_part = torch.randn(HKV, parts, m * group, D, device=dev, dtype=torch.float32, generator=g)
            l_part = torch.randn(HKV, parts, m * group, device=dev, dtype=torch.float32, generator=g)
            outs = [torch.empty(1, HQ, m, D, device=dev, dtype=dt) for _ in kvs]
            stage_us, stage_same, first = {}, {}, None     # the library merge at each pipeline depth
            for st in args.merge_stages:
                stage_us[st] = per_call_us(lambda: [merge_partials(o_part, l_part, o, HKV, group, stages=st) for o in outs])
                first = outs[0].clone() if first is None else first
                stage_same[st] = torch.equal(outs[0], first)
            lane_us, lane_ok = {}, {}                      # the third design: close to the library, trailing-empty exact
            for spec in args.lanes:
                w_, r_, d_, *nw = (int(x) for x in spec.split(":"))
                cfg = dict(lanes=w_, block_r=r_, block_d=d_, num_warps=nw[0] if nw else 4)
                lane_us[spec] = per_call_us(lambda: [merge_lanes(o_part, l_part, o, HKV, group, **cfg) for o in outs])
                lane_ok[spec] = (torch.allclose(outs[0].float(), first.float(), atol=2e-2, rtol=2e-2)
                                 and lanes_trailing_empty_ok(o_part, l_part, HKV, group, **cfg))
            best = min(lane_us, key=lane_us.get)
            w_, r_, d_, *nw = (int(x) for x in best.split(":"))
            best_cfg = dict(lanes=w_, block_r=r_, block_d=d_, num_warps=nw[0] if nw else 4)
            da.merge_partials = lambda o_part, l_part, out, hkv, group: merge_lanes(o_part, l_part, out, hkv, group, **best_cfg)
            try:
                full_lanes = per_call_us(lambda: [call(kk, vv) for kk, vv in kvs])
            finally:
                da.merge_partials = real_merge
            merge = stage_us[args.merge_stages[0]]
            kv_bytes = 2 * HKV * ctx * D * kvs[0][0].element_size()
            pct = {name: 100 * kv_bytes / (us * 1e-6) / bw for name, us in (("full", full), ("split", split), ("lanes", full_lanes))}
            rec = dict(context=ctx, m=m, splits=parts, full_us=full, split_only_us=split, merge_only_us=merge,
                       merge_us_by_stages=stage_us, merge_same_bits_by_stages=stage_same,
                       lanes_merge_us=lane_us, lanes_merge_ok=lane_ok, full_lanes_best=best, full_lanes_us=full_lanes,
                       kv_read_pct_of_copy=pct["full"], copy_gbs=bw / 1e9)
            log.append(rec)
            print(json.dumps(rec), flush=True)
            table.append([ctx, m, parts, f"{full:.1f}", f"{split:.1f}", f"{merge:.1f}",
                          f"{pct['full']:.0f} %", f"{pct['split']:.0f} %",
                          " ".join(f"{st}:{us:.1f}{'' if stage_same[st] else '!'}" for st, us in stage_us.items()),
                          " ".join(f"{k}:{us:.1f}{'' if lane_ok[k] else '!'}" for k, us in lane_us.items()),
                          f"{full_lanes:.1f} ({pct['lanes']:.0f} %)"])
        del kvs
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_decode_attention_parts.jsonl"), "w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e9:.0f} GB/s; Hq {HQ} Hkv {HKV} D {D} bf16; "
          f"{args.layers} calls per graph, L2 flushed")
    print(tabulate(table, headers=["context", "M", "splits", "full us", "split kernel only us", "merge only us",
                                   "KV read / copy BW (full)", "(split only)",
                                   "merge us by pipeline depth (! = other bits)",
                                   "lanes merge us by W:R:D[:warps] (! = not close or invariance fails)",
                                   "full with best lanes merge us"], tablefmt="github"))


if __name__ == "__main__":
    main()
