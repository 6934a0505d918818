"""Probe (session 8): the row-invariant GEMM (``specdec.fast.kernels.rowgemm.row_linear``) against the decode
GEMV (M = 1) and cuBLAS ``F.linear`` (M = 1 and M = 69), on every decode-step weight of Llama-3-8B and
Vicuna-7B in bf16, timed as inside a decode step (gemv_sweep's method: one CUDA graph of back-to-back calls
over distinct weight copies, per-call time = graph time / calls, median of 20 replays).

For every tile configuration it also checks the property the kernel exists for: the rows of an M = 69 call
and of an M = 128 call are bitwise equal to the same rows computed alone (M = 1) and at M = 5.
Prints a table, writes ``$OUT/probe_rowgemm.jsonl``.

    python3 scripts/probes/rowgemm_sweep.py            # all configs
    python3 scripts/probes/rowgemm_sweep.py quick      # the library's config only
    python3 scripts/probes/rowgemm_sweep.py split      # fixed split-K configs: M = 1 (16-row tile) against the
                                                       # GEMV, M = 69 (64- and 128-row tiles) against cuBLAS,
                                                       # and the rows of all three bitwise equal
    python3 scripts/probes/rowgemm_sweep.py swap       # (session 9) the SWAP design -- the weight tile as the MMA's
                                                       # row operand, x rows as its columns (16 at M = 1, 128 at
                                                       # M = 69: the weight read once) -- against the library's
                                                       # config, the GEMV and cuBLAS; rows bitwise equal across
    python3 scripts/probes/rowgemm_sweep.py m69        # M = 69 with one 128-row tile (the weight read once),
                                                       # against cuBLAS at M = 1 / 69 / 128 (padding every
                                                       # decode pass to 128 rows is the other invariant design)
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from tabulate import tabulate

from gemv_sweep import SHAPES, graph_ms, weight_copies  # the sibling probe (this folder is sys.path[0])
from specdec.fast.kernels import gemv, gemv_silu
from specdec.fast.kernels.rowgemm import row_linear, row_linear_config

OUT = os.environ.get("OUT", "/tmp")
CONFIGS = [(16, 32, 128, 4, 4), (16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 16, 256, 4, 4), (16, 64, 256, 4, 3),
           (16, 32, 512, 4, 3), (32, 32, 128, 4, 4), (16, 128, 128, 8, 3), (64, 64, 64, 4, 4)]


def invariant(w: torch.Tensor, silu: bool, cfg) -> bool:
    """Rows of M = 69 and M = 128 calls equal the same rows at M = 1 and M = 5, bit for bit."""
    k = w.shape[1]
    x = torch.randn(128, k, device="cuda", dtype=torch.bfloat16)
    full = row_linear(x, w, silu=silu, config=cfg)
    mid = row_linear(x[:69], w, silu=silu, config=cfg)
    five = row_linear(x[:5], w, silu=silu, config=cfg)
    ok = torch.equal(mid, full[:69]) and torch.equal(five, full[:5])
    for r in (0, 37, 68, 127):
        ok = ok and torch.equal(row_linear(x[r:r + 1], w, silu=silu, config=cfg), full[r:r + 1])
    return ok


M69_CONFIGS = [(128, bn, bk, 8, st) for bn in (128, 256) for bk in (64, 128) for st in (3, 4)]


def main_m69() -> None:
    rows, log = [], []
    jsonl = open(os.path.join(OUT, "probe_rowgemm_swap.jsonl"), "w")   # written as it goes (a timed-out run keeps rows)
    for name, (n, k, silu) in SHAPES.items():
        if not name.startswith("llama"):
            continue
        ws = weight_copies(name, n, k)
        calls = 2 * len(ws)

        def lin(x, w):
            y = F.linear(x, w)
            if silu:
                g, u = y.chunk(2, -1)
                y = F.silu(g) * u
            return y

        xs = {m: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for m in (1, 69, 128)}
        cub = {m: graph_ms(lambda: [lin(xs[m], ws[i % len(ws)]) for i in range(calls)]) / calls for m in xs}
        g1 = graph_ms(lambda: [(gemv_silu if silu else gemv)(xs[1], ws[i % len(ws)]) for i in range(calls)]) / calls
        rows.append([name, "cuBLAS", "", f"{g1 * 1e3:.1f}", f"{cub[1] * 1e3:.1f}", f"{cub[69] * 1e3:.1f}", f"{cub[128] * 1e3:.1f}"])
        log.append(dict(shape=name, kind="cublas", gemv_1_ms=g1, **{f"cublas_{m}_ms": v for m, v in cub.items()}))
        for cfg in M69_CONFIGS:
            try:
                same = torch.equal(row_linear(xs[69], ws[0], silu=silu, config=cfg)[5:6],
                                   row_linear(xs[69][5:6], ws[0], silu=silu, config=(16,) + cfg[1:]))
                t = graph_ms(lambda: [row_linear(xs[69], ws[i % len(ws)], silu=silu, config=cfg) for i in range(calls)]) / calls
            except Exception as e:
                print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:100]}")
                continue
            rows.append([name, "x".join(map(str, cfg)), same, "", "", f"{t * 1e3:.1f}", ""])
            log.append(dict(shape=name, kind="row", config=cfg, row_69_ms=t, equal_to_bm16_row=same))
        del ws
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_rowgemm_m69.jsonl"), "w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    print(tabulate(rows, headers=["weight", "kernel BMxBNxBKxWxS", "row == BM16 row", "gemv M=1 us",
                                  "M=1 us", "M=69 us", "M=128 us"]))


SPLIT_CONFIGS = [(32, 128, 4), (64, 128, 4), (64, 128, 2), (64, 64, 4), (128, 64, 4), (64, 64, 8)]


def main_split() -> None:
    rows, log = [], []
    jsonl = open(os.path.join(OUT, "probe_rowgemm_swap.jsonl"), "w")   # written as it goes (a timed-out run keeps rows)
    for name, (n, k, silu) in SHAPES.items():
        if not name.startswith("llama"):
            continue
        ws = weight_copies(name, n, k)
        calls = 2 * len(ws)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x69 = torch.randn(69, k, device="cuda", dtype=torch.bfloat16)

        def lin(x, w):
            y = F.linear(x, w)
            if silu:
                g, u = y.chunk(2, -1)
                y = F.silu(g) * u
            return y

        g1 = graph_ms(lambda: [(gemv_silu if silu else gemv)(x1, ws[i % len(ws)]) for i in range(calls)]) / calls
        c69 = graph_ms(lambda: [lin(x69, ws[i % len(ws)]) for i in range(calls)]) / calls
        for bn, bk, sp in SPLIT_CONFIGS:
            c1, c64, c128 = (16, bn, bk, 4, 4, sp), (64, bn, bk, 4, 3, sp), (128, bn, bk, 8, 3, sp)
            try:
                alone = row_linear(x69[5:6], ws[0], silu=silu, config=c1)
                same = all(torch.equal(row_linear(x69, ws[0], silu=silu, config=c)[5:6], alone) for c in (c64, c128))
                t1 = graph_ms(lambda: [row_linear(x1, ws[i % len(ws)], silu=silu, config=c1) for i in range(calls)]) / calls
                t64 = graph_ms(lambda: [row_linear(x69, ws[i % len(ws)], silu=silu, config=c64) for i in range(calls)]) / calls
                t128 = graph_ms(lambda: [row_linear(x69, ws[i % len(ws)], silu=silu, config=c128) for i in range(calls)]) / calls
            except Exception as e:
                print(f"{name} {(bn, bk, sp)}: {type(e).__name__}: {str(e)[:100]}")
                continue
            rows.append([name, f"{bn}x{bk} split {sp}", same, f"{g1 * 1e3:.1f}", f"{t1 * 1e3:.1f}", f"{t1 / g1:.2f}",
                         f"{c69 * 1e3:.1f}", f"{t64 * 1e3:.1f}", f"{t128 * 1e3:.1f}", f"{min(t64, t128) / c69:.2f}"])
            log.append(dict(shape=name, bn=bn, bk=bk, split=sp, rows_equal=same, gemv_1_ms=g1, row_1_ms=t1,
                            cublas_69_ms=c69, row_69_bm64_ms=t64, row_69_bm128_ms=t128))
        del ws
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_rowgemm_split.jsonl"), "w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    print(tabulate(rows, headers=["weight", "BNxBK split", "rows equal (BM 16/64/128)", "gemv M=1 us", "row M=1 us",
                                  "row/gemv", "cuBLAS M=69 us", "row BM64 us", "row BM128 us", "best/cuBLAS"]))


SWAP_CONFIGS = [(bn, bk, sp, w, st) for bn in (64, 128) for bk in (64, 128) for sp in (1, 4) for w, st in ((4, 4), (8, 3))]
# session 10's first run measured the (4, 4) half (52 s on the H200); the (8, 3) half and a 64-row tile at
# M = 69 (two tiles, fewer registers per program) are for the next run


def main_swap() -> None:
    rows, log = [], []
    jsonl = open(os.path.join(OUT, "probe_rowgemm_swap.jsonl"), "w")   # written as it goes (a timed-out run keeps rows)
    for name, (n, k, silu) in SHAPES.items():
        if not name.startswith("llama"):
            continue
        ws = weight_copies(name, n, k)
        calls = 2 * len(ws)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x69 = torch.randn(69, k, device="cuda", dtype=torch.bfloat16)

        def lin(x, w):
            y = F.linear(x, w)
            if silu:
                g, u = y.chunk(2, -1)
                y = F.silu(g) * u
            return y

        def timed(x, cfg):
            return graph_ms(lambda: [row_linear(x, ws[i % len(ws)], silu=silu, config=cfg) for i in range(calls)]) / calls

        g1 = graph_ms(lambda: [(gemv_silu if silu else gemv)(x1, ws[i % len(ws)]) for i in range(calls)]) / calls
        c69 = graph_ms(lambda: [lin(x69, ws[i % len(ws)]) for i in range(calls)]) / calls
        f = n // 2 if silu else n
        lib1, lib69 = row_linear_config(f, k, torch.bfloat16, 1), row_linear_config(f, k, torch.bfloat16, 69)
        cands = [("lib", lib1, lib69)] + [(f"swap {bn}x{bk} s{sp} w{w}/{st} BM{bm}", (16, bn, bk, w, st, sp, 1),
                                           (bm, bn, bk, w, st, sp, 1))
                                          for bn, bk, sp, w, st in SWAP_CONFIGS for bm in (64, 128)]
        for label, c1, c69cfg in cands:
            try:
                alone = row_linear(x69[5:6], ws[0], silu=silu, config=c1)
                same = torch.equal(row_linear(x69, ws[0], silu=silu, config=c69cfg)[5:6], alone)
                t1, t69 = timed(x1, c1), timed(x69, c69cfg)
            except Exception as e:
                print(f"{name} {label}: {type(e).__name__}: {str(e)[:100]}")
                continue
            rows.append([name, label, same, f"{g1 * 1e3:.1f}", f"{t1 * 1e3:.1f}", f"{t1 / g1:.2f}",
                         f"{c69 * 1e3:.1f}", f"{t69 * 1e3:.1f}", f"{t69 / c69:.2f}"])
            jsonl.write(json.dumps(dict(shape=name, label=label, config_1=c1, config_69=c69cfg, rows_equal=same,
                                        gemv_1_ms=g1, row_1_ms=t1, cublas_69_ms=c69, row_69_ms=t69)) + "\n")
            jsonl.flush()
            print(" ".join(map(str, rows[-1])), flush=True)
        del ws
        torch.cuda.empty_cache()
    jsonl.close()
    print(tabulate(rows, headers=["weight", "design", "rows equal (M 1 / 69)", "gemv M=1 us", "M=1 us", "/gemv",
                                  "cuBLAS M=69 us", "M=69 us", "/cuBLAS"]))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "swap":
        return main_swap()
    if len(sys.argv) > 1 and sys.argv[1] == "m69":
        return main_m69()
    if len(sys.argv) > 1 and sys.argv[1] == "split":
        return main_split()
    quick = len(sys.argv) > 1 and sys.argv[1] == "quick"
    rows, log = [], []
    for name, (n, k, silu) in SHAPES.items():
        ws = weight_copies(name, n, k)
        calls = 2 * len(ws)
        x1 = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x69 = torch.randn(69, k, device="cuda", dtype=torch.bfloat16)

        def run(fn, x):
            return lambda: [fn(x, ws[i % len(ws)]) for i in range(calls)]

        def lin(x, w):
            y = F.linear(x, w)
            if silu:
                g, u = y.chunk(2, -1)
                y = F.silu(g) * u
            return y

        base = {
            "gemv_1": graph_ms(run(gemv_silu if silu else gemv, x1)) / calls,
            "cublas_1": graph_ms(run(lin, x1)) / calls,
            "cublas_69": graph_ms(run(lin, x69)) / calls,
        }
        lib = row_linear_config(n // 2 if silu else n, k, torch.bfloat16)
        for cfg in ([lib] if quick else [lib] + [c for c in CONFIGS if c != lib]):
            try:
                ok = invariant(ws[0], silu, cfg)
                t1 = graph_ms(run(lambda x, w: row_linear(x, w, silu=silu, config=cfg), x1)) / calls
                t69 = graph_ms(run(lambda x, w: row_linear(x, w, silu=silu, config=cfg), x69)) / calls
            except Exception as e:  # a config that does not compile for this shape
                print(f"{name} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rec = dict(shape=name, n=n, k=k, silu=silu, config=cfg, library=cfg == lib, invariant=ok,
                       row_1_ms=t1, row_69_ms=t69, **{f"{kk}_ms": v for kk, v in base.items()})
            log.append(rec)
            rows.append([name, "x".join(map(str, cfg)) + (" *" if cfg == lib else ""), ok,
                         f"{base['gemv_1'] * 1e3:.1f}", f"{t1 * 1e3:.1f}", f"{t1 / base['gemv_1']:.2f}",
                         f"{base['cublas_69'] * 1e3:.1f}", f"{t69 * 1e3:.1f}", f"{t69 / base['cublas_69']:.2f}"])
        del ws
        torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_rowgemm.jsonl"), "w") as f:
        for r in log:
            f.write(json.dumps(r) + "\n")
    print(tabulate(rows, headers=["weight", "BMxBNxBKxWxS (* lib)", "row-invariant", "gemv M=1 us", "row M=1 us",
                                  "row/gemv", "cuBLAS M=69 us", "row M=69 us", "row/cuBLAS"]))


if __name__ == "__main__":
    main()
