#!/usr/bin/env python3
"""Probe (session 28): the decode-phase attention's BLOCK_M for a 69-node verification.

``decode_attention`` packs ``M * G`` query rows into tiles of BLOCK_M rows (64 for M = 69 at the Llama-3-8B
shape: 16 nodes per program), and the key tile that reaches the tree is built node by node -- a serial loop of
16 gathers and two MMAs per program. BLOCK_M does not change a row's bits (design §8), so a smaller BLOCK_M
(fewer nodes per program, more programs) is free to choose by M and context. This probe times the kernel at
M = 1 and M = 69 (the default tree's shape of parents) for BLOCK_M 16 / 32 / 64, contexts 1k / 4k / 32k, at the
Llama-3-8B attention shape (32 query heads, 8 KV heads, D 128, bf16), as CUDA-graph replays with the K/V cache
flushed from L2 between replays, and checks every row bitwise against BLOCK_M 64 and the M = 1 step.

    python3 scripts/probes/decode_attention_blockm.py [--contexts 1024 4096 32768] [--reps 20]
    # table on stdout, JSONL in $OUT/probe_decode_attention_blockm.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import graphed, time_ms  # noqa: E402  (the kernel benchmark's timers)

from decode_attention_tiles import D, HKV, HQ, NODE, tree_case  # noqa: E402  (the sibling probe's case)

from specdec.fast.kernels import decode_attention
from specdec.fast.kernels.decode_attention import decode_attention_config

OUT = os.environ.get("OUT", "/tmp")


def graph_ms(fn, flush: torch.Tensor, reps: int) -> float:
    """Median ms of one replay of ``fn`` captured as a CUDA graph, L2 flushed before each (the kernel
    benchmark's timers: scripts/bench_kernels.py)."""
    return time_ms(graphed(fn), flush, reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 32768])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    rows, log = [], []
    for ctx in args.contexts:
        c = tree_case(ctx, dev, dt)   # the 69-node tree and node 5's one-token step (decode_attention_tiles.py)
        q, k, v, mask, anc, plen = c["q"], c["k"], c["v"], c["mask"], c["anc"], c["plen"]
        lib = decode_attention_config(69 * HQ // HKV, D, dt)
        ref = decode_attention(q, k, v, plen, mask, ancestors=anc, max_prefix=ctx, config=dict(lib, block_m=64))
        one = decode_attention(q[:, :, NODE:NODE + 1], c["k1"], c["v1"], c["plen1"], c["one_mask"])
        step_same = torch.equal(one[:, :, 0], ref[:, :, NODE])
        t1 = graph_ms(lambda: decode_attention(q[:, :, :1], k, v, plen, c["one_mask"], ancestors=c["one_anc"],
                                               max_prefix=ctx), flush, args.reps)   # the table once, as the step
        for bm in (16, 32, 64):
            cfg = dict(lib, block_m=bm)
            try:
                out = decode_attention(q, k, v, plen, mask, ancestors=anc, max_prefix=ctx, config=cfg)
                same = torch.equal(out, ref)
                t = graph_ms(lambda: decode_attention(q, k, v, plen, mask, ancestors=anc, max_prefix=ctx, config=cfg),
                             flush, args.reps)
            except Exception as e:  # a tile the compiler refuses is reported, not fatal
                print(f"ctx {ctx} block_m {bm}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            rec = dict(context=ctx, block_m=bm, library_block_m=lib["block_m"], rows_equal_bm64=same,
                       node5_equals_step=step_same, m1_ms=t1, m69_ms=t)
            log.append(rec)
            print(json.dumps(rec), flush=True)
            rows.append([ctx, bm, "*" if bm == lib["block_m"] else "", same, step_same, f"{t1 * 1e3:.1f}",
                         f"{t * 1e3:.1f}", f"{t / t1:.2f}"])
        del c, k, v
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_decode_attention_blockm.jsonl"), "w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    print(tabulate(rows, headers=["context", "BLOCK_M", "library", "rows == BM 64", "node 5 == its step",
                                  "M=1 us", "M=69 us", "69 / 1"], tablefmt="github"))


if __name__ == "__main__":
    main()
