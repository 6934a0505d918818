#!/usr/bin/env python3
"""Per-kernel GPU time of one batched vanilla decode step (issue 19's "% of copy bandwidth" table), by torch.profiler.

    python3 scripts/probes/batch_step_profile.py [--batches 1 8 32 64] [--context 1024] [--shape llama3-8b]

Random bf16 weights, the cache filled with random values (as ``scripts/bench_batch.py --parts vanilla``), CUDA
graphs off so the kernels are listed one by one. For each B: the kernels by total time per step, their sum, and
the same kernels grouped (GEMMs / decode attention / the rest), so the batched step's gap to the copy bandwidth
can be put on the kernel that owns it. Prints tables; ``--out`` writes JSONL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_batch import filled_cache, kv_bytes_per_token  # noqa: E402
from bench_fast import step_weight_bytes  # noqa: E402

from specdec.benchutil import MODEL_SHAPES, copy_bandwidth, kernel_totals, random_model  # noqa: E402
from specdec.fast.model import as_fast_model, run_step  # noqa: E402

GROUPS = (("GEMM", ("row_linear", "gemm", "gemv", "linear", "matmul", "sm90", "cutlass", "nvjet")),
          ("attention", ("attention", "attn", "merge", "split")))


def group_of(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64], help="rows per step")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens per row")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(MODEL_SHAPES), help="model shape (random weights)")
    ap.add_argument("--top", type=int, default=10, help="kernels listed per batch")
    ap.add_argument("--out", default=None, help="JSONL file for the per-kernel rows")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (it profiles GPU kernels)")
    fm = as_fast_model(random_model(args.shape))
    fm.use_graphs = False
    bw = copy_bandwidth(fm.device)
    wbytes, kvb = step_weight_bytes(fm), kv_bytes_per_token(fm)
    summary, out = [], []
    for b in args.batches:
        cache = filled_cache(fm, b, args.context, 8, "main")
        if cache is None:
            continue
        dev = fm.device
        tokens = torch.randint(0, fm.config.vocab_size, (b, 1), device=dev)
        positions = torch.full((b, 1), cache.length, dtype=torch.long, device=dev)
        mask = torch.ones(b, 1, 1, dtype=torch.bool, device=dev)
        total, rows = kernel_totals(lambda: run_step(fm, cache, tokens, positions, mask), reps=5)
        groups: dict[str, float] = {}
        for name, launches, ms in rows:
            groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
            out.append(dict(batch=b, context=args.context, kernel=name, launches=launches, ms=ms))
        kv = b * args.context * kvb
        print(f"\nB = {b} x {args.context}: {total:.3f} ms of kernels per step")
        print(tabulate([[r[0][:60], f"{r[1]:.0f}", f"{r[2]:.3f}"] for r in rows[:args.top]],
                       headers=["kernel", "launches", "ms"], tablefmt="github"))
        summary.append([b, f"{total:.3f}", f"{groups.get('GEMM', 0):.3f}", f"{wbytes / bw * 1e3:.3f}",
                        f"{groups.get('attention', 0):.3f}", f"{kv / bw * 1e3:.3f}", f"{groups.get('other', 0):.3f}",
                        f"{100 * (wbytes + kv) / bw / (total / 1e3):.0f}%"])
        del cache
        fm.drop_caches()
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; weights {wbytes / 1e9:.2f} GB per step")
    print(tabulate(summary, headers=["B", "kernels ms", "GEMM ms", "weights floor ms", "attention ms", "KV floor ms",
                                     "other ms", "% copy BW (kernel sum)"], tablefmt="github"))
    if args.out:
        with open(args.out, "w") as f:
            for r in out:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
