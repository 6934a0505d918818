#!/usr/bin/env python3
"""Probe (session 30): the decode-phase attention's whole tile configuration, one-token step and 69-node verification.

``decode_attention`` fixes BLOCK_N / num_warps / num_stages per dtype (BLOCK_N is part of every row's arithmetic:
lanes are positions) and lets only BLOCK_M follow the rows. Session 29 measured the 69-row verification at a 32k
prefix at 2.99x the one-token step with the library's 64-key tiles and 4 warps. This probe times every setting of
(BLOCK_N, num_warps, num_stages) for the step (M = 1) and the verification (M = 69, each BLOCK_M), at the
Llama-3-8B attention shape (32 query heads, 8 KV heads, D 128, bf16), as CUDA-graph replays with L2 flushed, and
checks the exactness each setting must keep: the verification's rows are bitwise the same at every BLOCK_M, and
node 5 (depth 2) equals the one-token step at its position computed with the same setting.

    python3 scripts/probes/decode_attention_tiles.py [--contexts 32768 131072 1024] [--block-n 64 128] [--warps 4 8]
        [--stages 2 3] [--impl decode_attention ...] [--reps 20] [--layers 1]
    # table on stdout, JSONL in $OUT/probe_decode_attention_tiles.jsonl
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import graphed, time_ms  # noqa: E402  (the kernel benchmark's timers)

from specdec.fast.kernels.decode_attention import ancestor_table, decode_attention_config
from specdec.shared.tree import Tree

OUT = os.environ.get("OUT", "/tmp")
HQ, HKV, D = 32, 8, 128
NODE = 5   # the node (depth 2) whose one-token step the probes compare against


def tree_case(ctx: int, dev: str = "cuda", dt: torch.dtype = torch.bfloat16) -> dict:
    """The probes' verification case: a 69-node tree (1 + 4 + 16 + 48, the default-like shape) over a
    ``ctx``-token prefix at the Llama-3-8B attention shape, random K/V with room for the tree, and node
    :data:`NODE`'s one-token step -- its ancestors' K/V written at positions ctx, ctx + 1, itself at ctx + 2
    (``k1``, ``v1``, ``plen1``), and the one-token step's mask and ancestor table (``one_mask``, ``one_anc``)."""
    parents = [-1] + [max(0, (i - 1) // 4) for i in range(1, 69)]
    mask = Tree.from_parents(parents).ancestor_mask(dev)[None]
    depth = mask.sum(-1)[0] - 1
    g = torch.Generator(device=dev).manual_seed(ctx)
    k = torch.randn(1, HKV, ctx + 128, D, device=dev, dtype=dt, generator=g)
    v = torch.randn(1, HKV, ctx + 128, D, device=dev, dtype=dt, generator=g)
    q = torch.randn(1, HQ, 69, D, device=dev, dtype=dt, generator=g)
    k1, v1 = k.clone(), v.clone()
    for d, i in enumerate(i for i in range(69) if mask[0, NODE, i]):
        k1[:, :, ctx + d] = k[:, :, ctx + i]
        v1[:, :, ctx + d] = v[:, :, ctx + i]
    one_mask = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
    return dict(q=q, k=k, v=v, mask=mask, anc=ancestor_table(mask), plen=torch.tensor([ctx], dtype=torch.int32, device=dev),
                k1=k1, v1=v1, plen1=torch.tensor([ctx + int(depth[NODE])], dtype=torch.int32, device=dev),
                one_mask=one_mask, one_anc=ancestor_table(one_mask))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072, 1024])
    ap.add_argument("--block-n", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 3])
    ap.add_argument("--block-m", type=int, nargs="*", default=[16, 32, 64, 128])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layers", type=int, default=1, help="time a graph of this many back-to-back calls, each on its "
                    "own K/V copy (as a model step's layers run), and report the time per call: a lone call's time "
                    "includes the graph launch and the cold start that a step's layers overlap")
    ap.add_argument("--impl", nargs="*", default=["decode_attention"], help="kernel modules of specdec.fast.kernels to "
                    "time side by side (e.g. a copy of another commit's decode_attention.py); rows compared bitwise "
                    "against the first")
    args = ap.parse_args()
    if args.layers < 1:
        ap.error(f"--layers: got {args.layers}; expected an integer >= 1")
    dev, dt = "cuda", torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    rows, log = [], []
    for ctx in args.contexts:
        c = tree_case(ctx, dev, dt)
        q, k, v, mask, anc, plen = c["q"], c["k"], c["v"], c["mask"], c["anc"], c["plen"]
        k1, v1, plen1, one_mask, one_anc = c["k1"], c["v1"], c["plen1"], c["one_mask"], c["one_anc"]
        kvs = [(k, v)] + [(k.clone(), v.clone()) for _ in range(args.layers - 1)]   # every call its own K/V

        def timed(call) -> float:   # ms per call: one graph of len(kvs) calls, L2 flushed before it
            return time_ms(graphed(lambda: [call(kk, vv) for kk, vv in kvs]), flush, args.reps) / len(kvs)

        lib = decode_attention_config(69 * HQ // HKV, D, dt)
        first_out = {}
        for bn, w, st, impl in itertools.product(args.block_n, args.warps, args.stages, args.impl):
            decode_attention = importlib.import_module(f"specdec.fast.kernels.{impl}").decode_attention
            base = dict(lib, block_n=bn, num_warps=w, num_stages=st)
            try:
                step_cfg = dict(base, block_m=16)
                # the step passes its ancestor table, as the model's step does (one per step, not per layer);
                # before session 31 it was rebuilt inside every timed call (a few small kernels more per call)
                t1 = timed(lambda kk, vv: decode_attention(q[:, :, :1], kk, vv, plen, one_mask, ancestors=one_anc,
                                                           max_prefix=ctx, config=step_cfg))
                one = decode_attention(q[:, :, NODE:NODE + 1], k1, v1, plen1, one_mask, config=step_cfg)
            except Exception as e:   # a tile the compiler refuses is reported, not fatal
                print(f"ctx {ctx} {base}: step failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            ref = best = None
            exact = True   # every BLOCK_M: rows equal across BLOCK_M and to the first kernel, node 5 == its step
            for bm in args.block_m:
                cfg = dict(base, block_m=bm)
                try:
                    out = decode_attention(q, k, v, plen, mask, ancestors=anc, max_prefix=ctx, config=cfg)
                    t = timed(lambda kk, vv: decode_attention(q, kk, vv, plen, mask, ancestors=anc, max_prefix=ctx,
                                                              config=cfg))
                except Exception as e:
                    print(f"ctx {ctx} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                ref = out if ref is None else ref
                same_impl = torch.equal(out, first_out.setdefault((bn, w, st), out))
                rec = dict(context=ctx, layers=args.layers, impl=impl, block_n=bn, num_warps=w, num_stages=st, block_m=bm,
                           rows_equal_first_impl=same_impl,
                           rows_equal_across_block_m=torch.equal(out, ref),
                           node5_equals_step=torch.equal(one[:, :, 0], out[:, :, NODE]), m1_ms=t1, m69_ms=t,
                           library=(bn, w, st) == (lib["block_n"], lib["num_warps"], lib["num_stages"]))
                exact &= rec["rows_equal_first_impl"] and rec["rows_equal_across_block_m"] and rec["node5_equals_step"]
                log.append(rec)
                print(json.dumps(rec), flush=True)
                if best is None or t < best["m69_ms"]:
                    best = rec
            if best is not None:
                kv_bytes = 2 * HKV * ctx * D * k.element_size()          # the step reads every K and V once
                flops = 4 * 69 * HQ * ctx * D                              # the verification's q K^T and p V
                rows.append([ctx, impl, bn, w, st, "*" if best["library"] else "", f"{t1 * 1e3:.1f}",
                             f"{kv_bytes / (t1 * 1e-3) / 1e12:.2f}", best["block_m"], f"{best['m69_ms'] * 1e3:.1f}",
                             f"{flops / (best['m69_ms'] * 1e-3) / 1e12:.0f}", f"{best['m69_ms'] / t1:.2f}", exact])
        del c, k, v, k1, v1, kvs
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_decode_attention_tiles.jsonl"), "w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    print(tabulate(rows, headers=["context", "kernel", "BLOCK_N", "warps", "stages", "library", "M=1 us", "M=1 KV TB/s",
                                  "best BLOCK_M", "M=69 us", "M=69 TFLOP/s", "69 / 1", "exact (rows, node 5, = first kernel)"], tablefmt="github"))


if __name__ == "__main__":
    main()
