#!/usr/bin/env python3
"""Probe (session 40): the decode attention of a BATCHED one-token step, and the launch settings that keep its bits.

``scripts/probes/batch_step_profile.py`` put the batched vanilla step's gap to the copy bandwidth at B = 64 x 1k on
the decode attention (H100: 3.97 ms for 8.6 GB of KV, 73 % of copy bandwidth; 2048 programs of one 256-key split
each). num_warps and num_stages are not part of a row's arithmetic (``decode_attention``'s ``config``: only
block_n changes lanes), so they may follow the batch. This probe times the step's attention at the Llama-3-8B
attention shape (32 query heads, 8 KV heads, D 128, bf16) for B x context, with the library's config and with every
(num_warps, num_stages) in the sweep, as CUDA-graph replays with L2 flushed, and checks each setting's output
bitwise against the library's.

    python3 scripts/probes/decode_attention_batch.py [--batches 1 8 32 64] [--contexts 1024 8192]
        [--warps 2 4 8] [--stages 2 3 4] [--reps 20] [--out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import graphed, time_ms  # noqa: E402  (the kernel benchmark's timers)

from specdec.benchutil import copy_bandwidth  # noqa: E402
from specdec.fast.kernels.decode_attention import (ancestor_table, decode_attention,  # noqa: E402
                                                   decode_attention_config, num_splits_for)

HQ, HKV, D = 32, 8, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="rows of the step")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192], help="cached tokens per row")
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8], help="num_warps settings to time")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4], help="num_stages settings to time")
    ap.add_argument("--reps", type=int, default=20, help="timed replays per setting (median)")
    ap.add_argument("--out", default=None, help="JSONL file, one record per setting")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    dev, dt = "cuda", torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    bw = copy_bandwidth(dev)   # bytes / s, read + write
    rows, log = [], []
    for ctx, b in itertools.product(args.contexts, args.batches):
        g = torch.Generator(device=dev).manual_seed(ctx + b)
        k = torch.randn(b, HKV, ctx + 8, D, device=dev, dtype=dt, generator=g)
        v = torch.randn(b, HKV, ctx + 8, D, device=dev, dtype=dt, generator=g)
        q = torch.randn(b, HQ, 1, D, device=dev, dtype=dt, generator=g)
        plen = torch.full((b,), ctx, dtype=torch.int32, device=dev)
        mask = torch.ones(b, 1, 1, dtype=torch.bool, device=dev)
        anc = ancestor_table(mask)
        splits = num_splits_for(ctx + 1)
        lib = decode_attention_config(HQ // HKV, D, dt, programs_per_tile=splits * b * HKV, group=HQ // HKV, heads=b * HKV)

        def run(cfg):
            return decode_attention(q, k, v, plen, mask, ancestors=anc, max_prefix=ctx, config=cfg)

        want = run(lib)
        kv_bytes = 2 * b * HKV * ctx * D * k.element_size()
        best = lib_rec = None
        settings = sorted(set(itertools.product(args.warps, args.stages)) | {(lib["num_warps"], lib["num_stages"])})
        for w, st in settings:
            cfg = dict(lib, num_warps=w, num_stages=st)
            try:
                out = run(cfg)
                t = time_ms(graphed(lambda: run(cfg)), flush, args.reps)
            except Exception as e:   # a setting the compiler refuses is reported, not fatal
                print(f"B {b} ctx {ctx} warps {w} stages {st}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            rec = dict(batch=b, context=ctx, num_warps=w, num_stages=st, block_m=lib["block_m"], splits=splits,
                       library=(w, st) == (lib["num_warps"], lib["num_stages"]), us=t * 1e3,
                       pct_copy_bw=100 * kv_bytes / (t / 1e3) / bw, bitwise_equal_library=torch.equal(out, want))
            log.append(rec)
            print(json.dumps(rec), flush=True)
            if rec["library"]:
                lib_rec = rec
            if best is None or t * 1e3 < best["us"]:
                best = rec
        if lib_rec is None or best is None:
            continue
        rows.append([b, ctx, splits, f"{lib_rec['us']:.1f}", f"{lib_rec['pct_copy_bw']:.0f}%",
                     f"{best['num_warps']}/{best['num_stages']}", f"{best['us']:.1f}", f"{best['pct_copy_bw']:.0f}%",
                     all(r["bitwise_equal_library"] for r in log if r["batch"] == b and r["context"] == ctx)])
        del k, v, q
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            for r in log:
                f.write(json.dumps(r) + "\n")
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s")
    print(tabulate(rows, headers=["B", "context", "splits", "library us", "library % BW", "best warps/stages",
                                  "best us", "best % BW", "every setting == library"], tablefmt="github"))


if __name__ == "__main__":
    main()
