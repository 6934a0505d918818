#!/usr/bin/env python3
"""Where a reference GLIDE tree round spends its time, by phase: draft (and its catch-up and draft-layer passes),
verification, acceptance, compaction -- against a vanilla step on the same prompt.

    python3 scripts/probes/ref_round_phases.py                      # shipped pair, stdlib_code 0-4, (3, 2, 2), 128 tokens
    python3 scripts/probes/ref_round_phases.py --bench stdlib_long --begin 7 --end 8 --tree-shape 2,2,2 --max-new-tokens 32

Each phase's function is wrapped with a wall-clock timer (no profiler, so the figures are the real ones); per prompt
one untimed warm-up, then vanilla and the tree back to back. Prints one line per prompt (ms per round and per step).
"""

from __future__ import annotations

import argparse
import time

import torch

import specdec.ref.engine as engine
import specdec.ref.glide as ref_glide
from specdec import ref
from specdec.benchutil import question_prompts

PHASES = [(ref_glide.GlideDrafter, "propose", "draft"), (ref_glide.GlideDrafter, "_catch_up", "catch-up"),
          (ref_glide, "glide_layer", "draft layer"), (engine, "verify_batch", "verify"), (engine, "accept_draft", "accept"),
          (engine, "compact_batch", "compact")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="stdlib_code", help="shipped prompt set (stdlib_long: the 7.4-7.7k prompts are 7-9)")
    ap.add_argument("--begin", type=int, default=0)
    ap.add_argument("--end", type=int, default=5)
    ap.add_argument("--tree-shape", default="3,2,2")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spent: dict[str, float] = {}

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    for owner, name, key in PHASES:
        setattr(owner, name, timed(getattr(owner, name), key))
    shape = tuple(int(x) for x in args.tree_shape.split(","))
    target = ref.load_model("default")
    glide = ref.load_glide("default-glide", target=target)
    n = args.max_new_tokens
    for q, ids in question_prompts(args.bench, args.begin, args.end):
        t = ids.shape[1]
        ref.tree_spec_generate(target, glide, ids, t, tree_shape=shape, max_gen_len=8)   # warm-up
        rv = ref.vanilla_generate(target, ids, t, max_gen_len=n)
        spent.clear()
        rt = ref.tree_spec_generate(target, glide, ids, t, tree_shape=shape, max_gen_len=n)
        step, rnd = rv.elapsed_time / rv.output_ids.shape[1], rt.elapsed_time / rt.num
        phases = " ".join(f"{key} {spent.get(key, 0.0) / rt.num * 1e3:.2f}" for _, _, key in PHASES)
        print(f"q{q['question_id']} ({t} tokens): tau {rt.tau:.2f}, vanilla step {step * 1e3:.2f} ms, round {rnd * 1e3:.2f} ms, "
              f"speedup {rv.elapsed_time / rt.elapsed_time:.2f}x | ms per round: {phases}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
