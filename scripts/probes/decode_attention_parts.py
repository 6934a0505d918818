#!/usr/bin/env python3
"""Probe (sessions 33-34): where the one-token step's decode attention spends its time -- the split kernel vs the merge.

``decode_attention`` is two launches: the split kernel (one program per row block x KV head x split, each writing
an fp32 partial) and :func:`merge_partials` (the partials merged in an order fixed by the split index). At the
Llama-3-8B attention shape (32 query heads, 8 KV heads, D 128, bf16) this probe times, per call, as a CUDA graph of
``--layers`` back-to-back calls each on its own K/V (L2 flushed before the graph):

* ``full``: the library call (split kernel + merge);
* ``split only``: the same call with the merge replaced by nothing (the partials are written, never merged);
* ``merge only``: :func:`merge_partials` alone on partials of that call's shape, at each ``--merge-stages``
  pipeline depth (the same bits at every depth), and with each other tile in ``--tiles`` (the library's merge
  with its module constants set for the call: no copy of the kernel). Each tile's check: close to the library's
  result; a row merged over P partials equals the same row merged over P + 3 and P + LANES + 1 with the extra
  ones empty (a one-token step vs a deeper tree row at the same position); a node's rows merged alone equal
  them merged among others.

Session 33 used this probe to find the merge's cost; session 34 (BENCHMARKS "Session 34: the merge in lanes")
A/B'd three designs with it -- a deeper pipeline, a max-first chunked merge and the lanes merge the library now
has -- from candidate kernels in the probe (commit dca640b), removed once the lanes merge replaced the library's.

    python3 scripts/probes/decode_attention_parts.py [--contexts 32768 131072] [--rows 1 69] [--layers 8] [--reps 10] [--merge-stages 2 3] [--tiles 8:4:16:4 4:8:32:4]
    # table on stdout, JSONL in $OUT/probe_decode_attention_parts.jsonl
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_kernels import copy_bandwidth, graphed, time_ms  # noqa: E402  (the kernel benchmark's timers)

da = importlib.import_module("specdec.fast.kernels.decode_attention")   # the module (the package exports the function)
ta = importlib.import_module("specdec.fast.kernels.tree_attention")
from specdec.fast.kernels.tree_attention import merge_partials  # noqa: E402
from specdec.shared.tree import Tree  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
HQ, HKV, D = 32, 8, 128


@contextlib.contextmanager
def merge_tile(spec: str):
    """The library merge with another tile: ``W:R:D[:warps]`` sets :data:`...tree_attention.MERGE_LANES`,
    ``MERGE_BLOCK_R``, ``MERGE_BLOCK_D`` (and ``MERGE_WARPS``, default 2) for the duration -- the probe's way to
    sweep tiles without a copy of the kernel (the library's tile is one fixed choice: it sets the row's order)."""
    names = ["MERGE_LANES", "MERGE_BLOCK_R", "MERGE_BLOCK_D", "MERGE_WARPS"]
    vals = [int(x) for x in spec.split(":")]
    vals += [2] * (4 - len(vals))
    old = [getattr(ta, n) for n in names]
    for n, v in zip(names, vals):
        setattr(ta, n, v)
    try:
        yield
    finally:
        for n, v in zip(names, old):
            setattr(ta, n, v)


def merge_invariant(o_part, l_part, hkv, group) -> bool:
    """A row merged over P partials == the same row over P + 3 (and P + LANES + 1) partials whose extra ones are
    empty for it, and a row's bits do not depend on how many rows the call merges."""
    z, parts, rows, d = o_part.shape
    dev = o_part.device
    ok = True
    a = merge_partials(o_part, l_part, torch.empty(1, z * group, rows // group, d, device=dev), hkv, group)
    for extra in (3, ta.MERGE_LANES + 1):
        o2 = torch.cat([o_part, torch.zeros(z, extra, rows, d, device=dev)], 1)
        l2 = torch.cat([l_part, torch.full((z, extra, rows), float("-inf"), device=dev)], 1)
        ok &= torch.equal(a, merge_partials(o2, l2, torch.empty_like(a), hkv, group))
    if rows > group:   # the first node's rows merged alone
        a1 = merge_partials(o_part[:, :, :group].contiguous(), l_part[:, :, :group].contiguous(),
                            torch.empty(1, z * group, 1, d, device=dev), hkv, group)
        ok &= torch.equal(a1[:, :, 0], a[:, :, 0])
    return bool(ok)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 69])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--merge-stages", type=int, nargs="*", default=[3], help="pipeline depths of the merge to time "
                    "(merge only; outputs compared bitwise against the first)")
    ap.add_argument("--tiles", nargs="*", default=[], help="other tiles of the library merge to time, "
                    "LANES:BLOCK_R:BLOCK_D[:WARPS] (merge only, and the full call with the fastest)")
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
            tile_us, tile_ok = {}, {}                      # other merge tiles: close to the library's, invariant
            for spec in args.tiles:
                with merge_tile(spec):
                    tile_us[spec] = per_call_us(lambda: [merge_partials(o_part, l_part, o, HKV, group) for o in outs])
                    tile_ok[spec] = (torch.allclose(outs[0].float(), first.float(), atol=2e-2, rtol=2e-2)
                                     and merge_invariant(o_part, l_part, HKV, group))
            lib_tile = f"{ta.MERGE_LANES}:{ta.MERGE_BLOCK_R}:{ta.MERGE_BLOCK_D}:{ta.MERGE_WARPS}"
            lib_ok = merge_invariant(o_part, l_part, HKV, group)
            best = min(tile_us, key=tile_us.get) if tile_us else None
            if best is not None:
                with merge_tile(best):
                    full_best = per_call_us(lambda: [call(kk, vv) for kk, vv in kvs])
            else:
                full_best = full
            merge = stage_us[args.merge_stages[0]]
            kv_bytes = 2 * HKV * ctx * D * kvs[0][0].element_size()
            pct = {name: 100 * kv_bytes / (us * 1e-6) / bw for name, us in (("full", full), ("split", split), ("best", full_best))}
            rec = dict(context=ctx, m=m, splits=parts, full_us=full, split_only_us=split, merge_only_us=merge,
                       merge_us_by_stages=stage_us, merge_same_bits_by_stages=stage_same,
                       merge_tile=lib_tile, merge_invariant=lib_ok, tile_merge_us=tile_us, tile_merge_ok=tile_ok,
                       full_best_tile=best, full_best_tile_us=full_best,
                       kv_read_pct_of_copy=pct["full"], copy_gbs=bw / 1e9)
            log.append(rec)
            print(json.dumps(rec), flush=True)
            table.append([ctx, m, parts, f"{full:.1f}", f"{split:.1f}", f"{merge:.1f}{'' if lib_ok else ' (not invariant!)'}",
                          f"{pct['full']:.0f} %", f"{pct['split']:.0f} %",
                          " ".join(f"{st}:{us:.1f}{'' if stage_same[st] else '!'}" for st, us in stage_us.items()),
                          " ".join(f"{k}={us:.1f}{'' if tile_ok[k] else '!'}" for k, us in tile_us.items()),
                          f"{full_best:.1f} ({pct['best']:.0f} %)" if best else ""])
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
                                   "merge us by tile W:R:D:warps (! = not close or not invariant)",
                                   "full with the fastest tile us"], tablefmt="github"))
    print(f"library merge tile {ta.MERGE_LANES}:{ta.MERGE_BLOCK_R}:{ta.MERGE_BLOCK_D}:{ta.MERGE_WARPS}")


if __name__ == "__main__":
    main()
