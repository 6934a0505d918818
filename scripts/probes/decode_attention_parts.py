#!/usr/bin/env python3
"""Probe (session 33): where the one-token step's decode attention spends its time -- the split kernel vs the merge.

``decode_attention`` is two launches: the split kernel (one program per row block x KV head x split, each writing
an fp32 partial) and :func:`merge_partials` (the partials merged in split order). At the Llama-3-8B attention
shape (32 query heads, 8 KV heads, D 128, bf16) this probe times, per call, as a CUDA graph of ``--layers``
back-to-back calls each on its own K/V (L2 flushed before the graph):

* ``full``: the library call (split kernel + merge);
* ``split only``: the same call with the merge replaced by nothing (the partials are written, never merged);
* ``merge only``: :func:`merge_partials` alone on partials of that call's shape, at each ``--merge-stages``
  pipeline depth (the same bits at every depth), and a second design, ``chunked``: the row's maximum lse over all
  partials first (one load; the max is exact in any order), then the partials CHUNK at a time, each chunk's
  weighted sum taken by one fixed-shape ``tl.sum`` (a fixed order for every row whatever M, since the tile's shape
  never changes; other bits than the library's running-max merge, and a partial that is empty for this row --
  lse -inf -- adds an exact zero wherever it falls). Its check: a row merged over P partials equals the same row
  merged over P + 3 with the last three empty (a one-token step vs a deeper tree row at the same position).

    python3 scripts/probes/decode_attention_parts.py [--contexts 32768 131072] [--rows 1 69] [--layers 8] [--reps 10]
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
def _merge_chunked_kernel(
    O_part, L_part, Out,
    stride_pz, stride_pp, stride_pr, stride_lz, stride_lp,
    stride_ob, stride_oh, stride_om, stride_od,
    H_KV, ROWS, NUM_PARTS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    P_MAX: tl.constexpr, CHUNK: tl.constexpr, STAGES: tl.constexpr,
):
    """The second merge design: max over all partials (one [P_MAX, R] load), then CHUNK partials per iteration.
    Its row mapping and output store are :func:`specdec.fast.kernels.tree_attention._merge_kernel`'s, written out
    here only while the design is a candidate; if it wins, it replaces that kernel's loop rather than sitting beside it."""
    pid_r = tl.program_id(0)
    pid_z = tl.program_id(1)
    b = pid_z // H_KV
    hkv = pid_z % H_KV
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < ROWS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    l_base = L_part + pid_z.to(tl.int64) * stride_lz
    o_base = O_part + pid_z.to(tl.int64) * stride_pz
    offs_p = tl.arange(0, P_MAX)
    lse_all = tl.load(l_base + offs_p[:, None] * stride_lp + offs_r[None, :],
                      mask=(offs_p[:, None] < NUM_PARTS) & r_ok[None, :], other=float("-inf"))
    m = tl.max(lse_all, 0)                                        # [R], exact in any order
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_R], dtype=tl.float32)
    offs_c = tl.arange(0, CHUNK)
    for c in tl.range(0, NUM_PARTS, CHUNK, num_stages=STAGES):
        p_ok = (c + offs_c) < NUM_PARTS
        lse = tl.load(l_base + (c + offs_c)[:, None] * stride_lp + offs_r[None, :],
                      mask=p_ok[:, None] & r_ok[None, :], other=float("-inf"))                      # [C, R]
        o = tl.load(o_base + (c + offs_c)[:, None, None] * stride_pp + offs_r[None, :, None] * stride_pr
                    + offs_d[None, None, :], mask=p_ok[:, None, None] & r_ok[None, :, None] & d_ok[None, None, :],
                    other=0.0)                                                                      # [C, R, D]
        w = tl.math.exp2(lse - m_safe[None, :])                                                     # empty: 0
        acc += tl.sum(w[:, :, None] * o, 0)
        wsum += tl.sum(w, 0)
    out = acc / tl.where(wsum > 0.0, wsum, 1.0)[:, None]
    node = offs_r // GROUP
    head = hkv * GROUP + offs_r % GROUP
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + head.to(tl.int64)[:, None] * stride_oh
              + node[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def merge_chunked(o_part, l_part, out, hkv, group, chunk=8, stages=2, block_r=8):
    """Launch :func:`_merge_chunked_kernel` (same arguments and result layout as ``merge_partials``)."""
    rows, d, parts = o_part.shape[2], o_part.shape[3], o_part.shape[1]
    _merge_chunked_kernel[(triton.cdiv(rows, block_r), o_part.shape[0])](
        o_part, l_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), l_part.stride(0), l_part.stride(1),
        *out.stride(), hkv, rows, parts, GROUP=group, HEAD_DIM=d, BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(d),
        P_MAX=triton.next_power_of_2(parts), CHUNK=chunk, STAGES=stages, num_warps=4, enable_fp_fusion=False)
    return out


def chunked_trailing_empty_ok(o_part, l_part, hkv, group, chunk) -> bool:
    """A row merged over P partials == the same row over P + 3 partials whose last three are empty for it."""
    z, parts, rows, d = o_part.shape
    o2 = torch.cat([o_part, torch.randn(z, 3, rows, d, device=o_part.device)], 1)
    l2 = torch.cat([l_part, torch.full((z, 3, rows), float("-inf"), device=l_part.device)], 1)
    a = merge_chunked(o_part, l_part, torch.empty(1, z * group, rows // group, d, device=o_part.device), hkv, group, chunk)
    b = merge_chunked(o2, l2, torch.empty_like(a), hkv, group, chunk)
    return torch.equal(a, b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 69])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--merge-stages", type=int, nargs="*", default=[3], help="pipeline depths of the merge to time "
                    "(merge only; outputs compared bitwise against the first)")
    ap.add_argument("--chunks", type=int, nargs="*", default=[8], help="partials per iteration of the chunked merge")
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
            chunk_us, chunk_ok = {}, {}                    # the second design: close to the library, trailing-empty exact
            for ch in args.chunks:
                chunk_us[ch] = per_call_us(lambda: [merge_chunked(o_part, l_part, o, HKV, group, chunk=ch) for o in outs])
                chunk_ok[ch] = (torch.allclose(outs[0].float(), first.float(), atol=2e-2, rtol=2e-2)
                                and chunked_trailing_empty_ok(o_part, l_part, HKV, group, ch))
            merge = stage_us[args.merge_stages[0]]
            kv_bytes = 2 * HKV * ctx * D * kvs[0][0].element_size()
            pct = {name: 100 * kv_bytes / (us * 1e-6) / bw for name, us in (("full", full), ("split", split))}
            rec = dict(context=ctx, m=m, splits=parts, full_us=full, split_only_us=split, merge_only_us=merge,
                       merge_us_by_stages=stage_us, merge_same_bits_by_stages=stage_same,
                       chunked_merge_us=chunk_us, chunked_merge_ok=chunk_ok,
                       kv_read_pct_of_copy=pct["full"], copy_gbs=bw / 1e9)
            log.append(rec)
            print(json.dumps(rec), flush=True)
            table.append([ctx, m, parts, f"{full:.1f}", f"{split:.1f}", f"{merge:.1f}",
                          f"{pct['full']:.0f} %", f"{pct['split']:.0f} %",
                          " ".join(f"{st}:{us:.1f}{'' if stage_same[st] else '!'}" for st, us in stage_us.items()),
                          " ".join(f"{ch}:{us:.1f}{'' if chunk_ok[ch] else '!'}" for ch, us in chunk_us.items())])
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
                                   "chunked merge us by chunk (! = not close or trailing-empty bits differ)"], tablefmt="github"))


if __name__ == "__main__":
    main()
