#!/usr/bin/env python3
"""Probe (session 33): where the one-token step's decode attention spends its time -- the split kernel vs the merge.

``decode_attention`` is two launches: the split kernel (one program per row block x KV head x split, each writing
an fp32 partial) and :func:`merge_partials` (the partials merged in split order). At the Llama-3-8B attention
shape (32 query heads, 8 KV heads, D 128, bf16) this probe times, per call, as a CUDA graph of ``--layers``
back-to-back calls each on its own K/V (L2 flushed before the graph):

* ``full``: the library call (split kernel + merge);
* ``split only``: the same call with the merge replaced by nothing (the partials are written, never merged);
* ``merge only``: :func:`merge_partials` alone on partials of that call's shape.

    python3 scripts/probes/decode_attention_parts.py [--contexts 32768 131072] [--rows 1 69] [--layers 8] [--reps 10]
    # table on stdout, JSONL in $OUT/probe_decode_attention_parts.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import copy_bandwidth, graphed, time_ms  # noqa: E402  (the kernel benchmark's timers)

import importlib

da = importlib.import_module("specdec.fast.kernels.decode_attention")   # the module (the package exports the function)
from specdec.fast.kernels.tree_attention import merge_partials  # noqa: E402
from specdec.shared.tree import Tree  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
HQ, HKV, D = 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 69])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--merge-stages", type=int, nargs="*", default=[3], help="pipeline depths of the merge to time "
                    "(merge only; outputs compared bitwise against the first)")
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

            def timed(fn) -> float:   # us per call
                return time_ms(graphed(lambda: [fn(kk, vv) for kk, vv in kvs]), flush, args.reps) / len(kvs) * 1e3

            full = timed(call)
            real_merge = da.merge_partials
            da.merge_partials = lambda o_part, l_part, out, hkv, group: out   # the split kernel alone
            try:
                split = timed(call)
            finally:
                da.merge_partials = real_merge
            rows = m * (HQ // HKV)
            parts = da.num_splits_for(ctx + m)
            o_part = torch.randn(HKV, parts, rows, D, device=dev, dtype=torch.float32, generator=g)
            l_part = torch.randn(HKV, parts, rows, device=dev, dtype=torch.float32, generator=g)
            outs = [torch.empty(1, HQ, m, D, device=dev, dtype=dt) for _ in kvs]
            merges, first = {}, None
            for st in args.merge_stages:
                merges[st] = time_ms(graphed(lambda: [merge_partials(o_part, l_part, o, HKV, HQ // HKV, stages=st)
                                                      for o in outs]), flush, args.reps) / len(outs) * 1e3
                first = outs[0].clone() if first is None else first
                merges[f"equal_{st}"] = torch.equal(outs[0], first)
            merge = merges[args.merge_stages[0]]
            kv_bytes = 2 * HKV * ctx * D * 2
            rec = dict(context=ctx, m=m, splits=parts, full_us=full, split_only_us=split, merge_only_us=merge,
                       merge_by_stages={str(k): v for k, v in merges.items()},
                       kv_read_pct_of_copy=100 * kv_bytes / (full * 1e-6) / bw, copy_gbs=bw / 1e9)
            log.append(rec)
            print(json.dumps(rec), flush=True)
            table.append([ctx, m, parts, f"{full:.1f}", f"{split:.1f}", f"{merge:.1f}",
                          f"{100 * kv_bytes / (full * 1e-6) / bw:.0f} %", f"{100 * kv_bytes / (split * 1e-6) / bw:.0f} %",
                          " ".join(f"{st}:{merges[st]:.1f}{'' if merges[f'equal_{st}'] else '!'}" for st in args.merge_stages)])
        del kvs
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_decode_attention_parts.jsonl"), "w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bw / 1e9:.0f} GB/s; Hq {HQ} Hkv {HKV} D {D} bf16; "
          f"{args.layers} calls per graph, L2 flushed")
    print(tabulate(table, headers=["context", "M", "splits", "full us", "split kernel only us", "merge only us",
                                   "KV read / copy BW (full)", "(split only)",
                                   "merge us by pipeline depth (! = other bits)"], tablefmt="github"))


if __name__ == "__main__":
    main()
