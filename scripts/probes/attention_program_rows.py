#!/usr/bin/env python3
"""Probe (session 37): how many tree nodes should one program of the decode-phase attention hold?

A program of ``decode_attention`` for the key split that holds the prefix's end L holds ``program_rows`` packed
query rows (``row = node * G + g``) in a BLOCK_M-row tile; the other splits' programs hold BLOCK_M rows. The tiles
that reach the tree run a loop over the program's nodes, two gathered loads and two dots per node (the K side,
then the V side). With the embedded model's G = 2 and BLOCK_M 16 a program held 8 nodes, and the verification of
M >= 9 nodes cost about twice the one-token step's attention (``verify_growth.py``, session 37). Fewer nodes per
program shorten that loop at the price of more programs re-reading that split's prefix tiles.

For each case (the embedded model's attention shape over a 600-token prefix, and the Llama-3-8B shape's 69-node
tree at 1k and 32k) and each (BLOCK_M, nodes per program), it times ``--layers`` back-to-back calls captured as one
CUDA graph and checks the promise every setting must keep: the output equals the library default's bit for bit.

    python3 scripts/probes/attention_program_rows.py [--layers 14] [--reps 30]
    # table on stdout, JSONL in $OUT/probe_attention_program_rows.jsonl
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

from specdec.fast.kernels.decode_attention import (ancestor_table, decode_attention, decode_attention_config,
                                                   num_splits_for)
from specdec.shared.tree import Tree

OUT = os.environ.get("OUT", "/tmp")


def shape_parents(widths: tuple[int, ...]) -> list[int]:
    """A tree with a root and ``widths[l]`` nodes at depth l + 1, each level's parents taken round robin from the
    level above (the GLIDE beam tree's node counts; which parent a node has does not change the work)."""
    parents, above = [-1], [0]
    for w in widths:
        level = list(range(len(parents), len(parents) + w))
        parents += [above[i % len(above)] for i in range(w)]
        above = level
    return parents


CASES = [  # (name, Hq, Hkv, D, prefix, capacity, tree widths)
    ("embedded chain 1", 4, 2, 64, 600, 1024, ()),
    ("embedded (4,4,4,3)", 4, 2, 64, 600, 1024, (4, 4, 4, 3)),
    ("embedded (4,8,8,8)", 4, 2, 64, 600, 1024, (4, 8, 8, 8)),
    ("embedded (6,7,6,5,4,3)", 4, 2, 64, 600, 1024, (6, 7, 6, 5, 4, 3)),
    ("embedded (63,)", 4, 2, 64, 600, 1024, (63,)),
    # a graph captured on a larger cache: the splits past the prefix are empty programs, but the rule counts them
    ("embedded (6,7,6,5,4,3) cache 4k", 4, 2, 64, 600, 4096, (6, 7, 6, 5, 4, 3)),
    ("embedded (6,7,6,5,4,3) cache 8k", 4, 2, 64, 600, 8192, (6, 7, 6, 5, 4, 3)),
    ("llama3-8b 69 @1k", 32, 8, 128, 1024, 1024 + 128, (4, 16, 48)),
    ("llama3-8b 69 @32k", 32, 8, 128, 32768, 32768 + 128, (4, 16, 48)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--block-m", type=int, nargs="*", default=[16, 32, 64])
    ap.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    log, rows = [], []
    for name, hq, hkv, d, prefix, cap, widths in CASES:
        if args.cases and name not in args.cases:
            continue
        g = hq // hkv
        tree = Tree.from_parents(shape_parents(widths))
        m = tree.size
        mask = tree.ancestor_mask(dev)[None]
        anc = ancestor_table(mask)
        gen = torch.Generator(device=dev).manual_seed(prefix + m)
        q = torch.randn(1, hq, m, d, device=dev, dtype=dt, generator=gen)
        kvs = [(torch.randn(1, hkv, cap, d, device=dev, dtype=dt, generator=gen),
                torch.randn(1, hkv, cap, d, device=dev, dtype=dt, generator=gen)) for _ in range(args.layers)]
        plen = torch.tensor([prefix], dtype=torch.int32, device=dev)
        max_prefix = cap - m   # as under graph capture: the splits sized for the whole cache
        splits = num_splits_for(max_prefix + m)
        lib = decode_attention_config(m * g, d, dt, splits * hkv, g, hkv)   # what decode_attention itself picks
        lib_rows = lib["program_rows"]

        def call(cfg):
            return [decode_attention(q, kk, vv, plen, mask, ancestors=anc, max_prefix=max_prefix, config=cfg)
                    for kk, vv in kvs]

        ref = call(lib)
        settings = sorted({(bm, min(n * g, bm)) for bm in args.block_m for n in args.nodes if n * g <= bm or n == 1}
                          | {(lib["block_m"], lib_rows)})
        best = None
        for bm, pr in settings:
            cfg = dict(lib, block_m=bm, program_rows=pr)
            out = call(cfg)
            equal = all(torch.equal(a, b) for a, b in zip(out, ref))
            t = time_ms(graphed(lambda cfg=cfg: call(cfg)), flush, args.reps) / args.layers
            programs = hkv * (-(-(m * g) // pr) + (splits - 1) * -(-(m * g) // bm))   # the grid (decode_attention)
            rec = dict(case=name, m=m, group=g, prefix=prefix, splits=splits, block_m=bm, program_rows=pr,
                       nodes_per_program=pr / g, programs=programs, us_per_call=t * 1e3, equal_to_library=equal,
                       library=(bm, pr) == (lib["block_m"], lib_rows))
            log.append(rec)
            print(json.dumps(rec), flush=True)
            rows.append([name, m, bm, pr, f"{pr / g:g}", programs, f"{t * 1e3:.2f}", "*" if rec["library"] else "",
                         equal])
            best = rec if best is None or t * 1e3 < best["us_per_call"] else best
        rows.append([name, "best", best["block_m"], best["program_rows"], "", best["programs"],
                     f"{best['us_per_call']:.2f}", "", ""])
        del kvs
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_attention_program_rows.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in log)
    print(tabulate(rows, headers=["case", "M", "BLOCK_M", "program rows", "nodes / program", "programs", "us / call",
                                  "library", "== library"], tablefmt="github"))


if __name__ == "__main__":
    main()
