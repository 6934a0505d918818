#!/usr/bin/env python3
"""Probe (session 24): what an fp32 ``F.linear`` costs on this CPU by row count, at the embedded default model's
weight shapes -- does a verification's extra rows cost compute (the time grows with M at near-peak FLOP/s) or only
per-call overhead? The mean over ``--reps`` calls after 50 warm-up calls, ``--threads`` threads.

    python3 scripts/probes/cpu_linear_rows.py            # 2 threads, M = 1 2 8 15 16 32
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

SHAPES = [(256, 512, "q|k|v-sized / gate, up (256 -> 512)"), (256, 256, "q, o (256 -> 256)"),
          (512, 256, "down (512 -> 256)"), (256, 4096, "lm_head (256 -> 4096)")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 15, 16, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    table = []
    for k, n, name in SHAPES:
        w = torch.randn(n, k)
        row = [name]
        for m in args.rows:
            x = torch.randn(1, m, k)
            for _ in range(50):
                F.linear(x, w)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                F.linear(x, w)
            us = (time.perf_counter() - t0) / args.reps * 1e6
            row.append(f"{us:.1f} us, {2 * m * k * n / us / 1e3:.0f} GF/s")
        table.append(row)
    print(tabulate(table, headers=["weight"] + [f"M = {m}" for m in args.rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
