#!/usr/bin/env python3
"""Probe (session 10): one decode step (M = 1) and one 69-node verification of the fast target under two
``row_linear`` tile rules in the same process -- the session-8/9 rule (every weight unswapped), the
sessions 10-27 rule (tall weights swapped), the library's current ``row_linear_config`` with pointer loads
and as it is (session 28: TMA tiles; session 29: a 16-row TAIL tile for 65-80 rows, and the attention's
BLOCK_M following the grid -- "library, s28 attention tiles" runs it with the old BLOCK_M 64) -- timed as
CUDA graphs (gemv_sweep.graph_ms, median of 30).
Also checks the property the rule must keep: the verification's root row equals the one-token step's
logits bit for bit. Prints a table, writes ``$OUT/probe_step_config_ab.jsonl``.

    python3 scripts/probes/step_config_ab.py [shape ...] [--ctx N]     # default: llama3-8b, ctx 1024
    python3 scripts/probes/step_config_ab.py --ctx 32768 --library-only --attention-impl decode_attention_main

``--attention-impl MODULE`` adds a row: the library's rule with the decode attention of
``specdec.fast.kernels.MODULE`` (e.g. a copy of another commit's ``decode_attention.py``) swapped in;
``--library-only`` skips the historical GEMM rules.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

import torch
import triton
from tabulate import tabulate

from gemv_sweep import graph_ms   # the sibling probe (this folder is sys.path[0])
import specdec.fast.kernels as kern
import specdec.fast.kernels.rowgemm as RG
from specdec.benchutil import random_model
from specdec.fast.model import as_fast_model, prefill, step_forward
from specdec.shared.tree import Tree

OUT = os.environ.get("OUT", "/tmp")
DA = importlib.import_module("specdec.fast.kernels.decode_attention")   # (the package re-exports a function of that name)
LIBRARY_RULE = RG.row_linear_config


def unswapped_rule(n, k, dtype, rows=1, silu=False):
    """The session-8/9 rule: 64 x 64 split-K tiles below N = 8192, 32 x 128 tiles above, never swapped."""
    bm = 16 if rows <= 16 else 32 if rows <= 32 else 64
    if n >= 8192:
        bn, bk, split = 32, 128, 1
    else:
        bn, bk = 64, 64
        split = max(1, min(8, 512 // triton.cdiv(n, bn), triton.cdiv(k, 2 * bk)))
    if dtype == torch.float32:
        bk = min(bk, 64)
    return bm, min(bn, max(16, triton.next_power_of_2(n))), min(bk, max(16, triton.next_power_of_2(k))), 4, 4, split


def s27_rule(n, k, dtype, rows=1, silu=False):
    """The rule of sessions 10-27: SWAP 64 x 64 (4 K splits) / 128 x 64 tiles from N = 8192 (16-bit), the
    unswapped session-8/9 tiles below; pointer loads."""
    if n >= 8192 and dtype != torch.float32:
        bm = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
        bn, bk, split = (128, 64, 1) if n >= 32768 else (64, 64, 4)
        return bm, bn, min(bk, max(16, triton.next_power_of_2(k))), 4, 4, split, 1
    return unswapped_rule(n, k, dtype, rows)


def no_tma_rule(n, k, dtype, rows=1, silu=False):
    """The library's rule with pointer loads (TMA off): the same bits, another load path."""
    cfg = LIBRARY_RULE(n, k, dtype, rows, silu)
    return cfg[:7] + (0,) + cfg[8:]


def s28_rule(n, k, dtype, rows=1, silu=False):
    """The session-28 rule: the library's tiles without the 16-row TAIL tile (69 rows in one 128-row tile)."""
    cfg = LIBRARY_RULE(n, k, dtype, rows, silu)
    return (128 if cfg[8] else cfg[0],) + cfg[1:8] + (0,)


def main() -> None:
    args = sys.argv[1:]
    ctx = 1024
    if "--ctx" in args:
        i = args.index("--ctx"); ctx = int(args[i + 1]); del args[i:i + 2]
    impls = []
    while "--attention-impl" in args:
        i = args.index("--attention-impl"); impls.append(args[i + 1]); del args[i:i + 2]
    library_only = "--library-only" in args
    if library_only:
        args.remove("--library-only")
    shapes = args or ["llama3-8b"]
    library_attention = kern.decode_attention
    swapped = {impl: importlib.import_module(f"specdec.fast.kernels.{impl}").decode_attention for impl in impls}
    rows, log = [], []
    for shape in shapes:
        fm = as_fast_model(random_model(shape))
        fm.use_graphs = False
        cache = fm.ensure_cache(1, ctx + 200)
        prefill(fm, cache, torch.randint(0, fm.config.vocab_size, (1, ctx), device="cuda"))
        parents = [-1] + [max(0, (i - 1) // 4) for i in range(1, 69)]
        mask69 = Tree.from_parents(parents).ancestor_mask("cuda")[None]
        pos69 = cache.length + mask69.sum(-1) - 1
        toks69 = torch.randint(0, fm.config.vocab_size, (1, 69), device="cuda")
        one = mask69[:, :1, :1].contiguous()
        res = {}
        rules = [("unswapped (s9)", unswapped_rule, None), ("SWAP tall (s10-s27)", s27_rule, None),
                 ("library, pointer loads", no_tma_rule, None), ("session 28 (no tail)", s28_rule, None),
                 ("library, s28 attention tiles", LIBRARY_RULE, None)] if not library_only else []
        rules += [(f"library, attention {impl}", LIBRARY_RULE, fn) for impl, fn in swapped.items()]
        rules += [("library", LIBRARY_RULE, None)]
        for label, rule, attention in rules:
            RG.row_linear_config = rule
            kern.decode_attention = attention or library_attention
            min_programs = DA.MIN_PROGRAMS
            if "s28 attention" in label:
                DA.MIN_PROGRAMS = 0   # BLOCK_M = min(64, rows): the session-28 rule
            try:
                step = lambda: step_forward(fm, cache, toks69[:, :1], pos69[:, :1], one, cache.length_t)
                verify = lambda: step_forward(fm, cache, toks69, pos69, mask69, cache.length_t)
                same = torch.equal(step()[:, 0], verify()[:, 0])
                t1 = min(graph_ms(step, reps=30) for _ in range(2))
                t69 = min(graph_ms(verify, reps=30) for _ in range(2))
            finally:
                RG.row_linear_config = LIBRARY_RULE
                DA.MIN_PROGRAMS = min_programs
                kern.decode_attention = library_attention
            res[label] = (t1, t69)
            rows.append([shape, ctx, label, same, f"{t1:.3f}", f"{t69:.3f}", f"{t69 / t1:.2f}"])
            log.append(dict(shape=shape, ctx=ctx, rule=label, root_row_equals_step=same, step_ms=t1, verify69_ms=t69))
            print(json.dumps(log[-1]), flush=True)
        del fm, cache
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_step_config_ab.jsonl"), "w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    print(tabulate(rows, headers=["shape", "ctx", "row_linear rule", "root row == step", "step ms", "verify-69 ms",
                                  "verify/step"], tablefmt="github"))


if __name__ == "__main__":
    main()
