#!/usr/bin/env python3
"""Per-kernel GPU time of one decode-phase step (M = 1) and one 69-node verification, by torch.profiler.

    python3 scripts/probes/decode_profile.py [shape] [context]     # default: llama3-8b 1024

Random bf16 weights of a :data:`specdec.benchutil.MODEL_SHAPES` shape, CUDA graphs off (the kernels one
by one). Prints the kernels by total time per call for both passes.
"""

from __future__ import annotations

import sys

import torch
from tabulate import tabulate

from specdec.benchutil import kernel_totals, random_model
from specdec.fast.model import as_fast_model, prefill, step_forward
from specdec.shared.tree import Tree


def main() -> None:
    shape = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
    ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    fm = as_fast_model(random_model(shape))
    fm.use_graphs = False
    cache = fm.ensure_cache(1, ctx + 200)
    prefill(fm, cache, torch.randint(0, fm.config.vocab_size, (1, ctx), device="cuda"))
    for m in (1, 69):
        parents = [-1] + [max(0, (i - 1) // 4) for i in range(1, m)]
        mask = Tree.from_parents(parents).ancestor_mask("cuda")[None]
        pos = cache.length + mask.sum(-1) - 1
        toks = torch.randint(0, fm.config.vocab_size, (1, m), device="cuda")
        total, rows = kernel_totals(lambda: step_forward(fm, cache, toks, pos, mask, cache.length_t), reps=5)
        print(f"\n{shape} context {ctx}, M = {m}: {total:.3f} ms of kernels per call")
        print(tabulate([[r[0][:60], f"{r[1]:.0f}", f"{r[2]:.3f}"] for r in rows[:12]], headers=["kernel", "launches", "ms"]))


if __name__ == "__main__":
    main()
