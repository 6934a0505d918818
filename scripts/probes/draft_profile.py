"""Probe (session 7): where do a GLIDE draft round and a decode step spend their GPU time?

For the Llama-3-8B and Vicuna-7B shapes (random bf16 weights, a random GLIDE draft) at a 1k context:
``torch.profiler`` kernel totals of

* one decode step (``run_step``, M = 1, its CUDA graph replayed),
* one 69-node verification (``run_step``, M = 69),
* one draft round of ``tree_spec_generate`` (catch-up on the root + the five beam levels of the
  default tree, as ``scripts/bench_fast.py --glide`` times it),

next to each one's CUDA-event time, so "kernel time" vs "launch gaps" can be read off.

    python3 scripts/probes/draft_profile.py [--shapes ...] [--ctx 1024]   # tables; JSONL in $OUT/draft_profile.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_fast import default_tree, glide_drafter  # noqa: E402

from specdec.fast.engine import TreeTensors
from specdec.fast.model import as_fast_model, prefill, run_step
from specdec.benchutil import cuda_time_ms, kernel_totals, random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["vicuna-7b", "llama3-8b"])
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--top", type=int, default=16, help="kernel rows printed per table")
    args = ap.parse_args()
    out_path = os.path.join(os.environ.get("OUT", "runs"), "draft_profile.jsonl")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    summary = []
    with open(out_path, "w") as out, torch.inference_mode():
        for shape in args.shapes:
            fm = as_fast_model(random_model(shape, device="cuda"))
            cache = fm.ensure_cache(1, args.ctx + 256)
            prefill(fm, cache, torch.randint(0, fm.config.vocab_size, (1, args.ctx), device="cuda"), chunk_size=4096)
            L = cache.length
            tree = default_tree()
            tt = TreeTensors.get(tree, tree.size, fm.device)
            one = torch.ones(1, 1, 1, dtype=torch.bool, device="cuda")
            tok1 = torch.zeros(1, 1, dtype=torch.long, device="cuda")
            pos1 = torch.full((1, 1), L, dtype=torch.long, device="cuda")
            tok69 = torch.zeros(1, tree.size, dtype=torch.long, device="cuda")
            pos69 = (tt.depth + L)[None]
            _, _, draft_round = glide_drafter(fm, cache)
            cases = {
                "step M=1": lambda: run_step(fm, cache, tok1, pos1, one),
                "verify M=69": lambda: run_step(fm, cache, tok69, pos69, tt.mask),
                "draft round": draft_round,
            }
            for name, fn in cases.items():
                ms = cuda_time_ms(fn, reps=20)
                total, rows = kernel_totals(fn, reps=5)
                launches = sum(r[1] for r in rows)
                print(f"\n{shape} ctx {L} {name}: {ms:.3f} ms (CUDA events), kernels {total:.3f} ms, "
                      f"{launches:.0f} launches", flush=True)
                print(tabulate([[r[0], f"{r[1]:.0f}", f"{r[2] * 1e3:.1f}"] for r in rows[: args.top]],
                               headers=["kernel", "launches", "us"], tablefmt="github"), flush=True)
                rec = dict(shape=shape, ctx=L, case=name, event_ms=ms, kernel_ms=total, launches=launches, rows=rows[:40])
                out.write(json.dumps(rec) + "\n")
                summary.append([shape, name, f"{ms:.3f}", f"{total:.3f}", f"{ms - total:.3f}", f"{launches:.0f}"])
            fm.caches.clear(); fm.graphs.clear()
            del fm
            torch.cuda.empty_cache()
    print()
    print(tabulate(summary, headers=["shape", "case", "event ms", "kernel ms", "gaps ms", "launches"], tablefmt="github"))


if __name__ == "__main__":
    main()
