#!/usr/bin/env python3
"""A/B (session 24): the reference GLIDE drafter's catch-up -- the previous form (every position since the
last round through the whole draft layer, in window-sized chunks, cross-attention over the target's cache
included) against the library's (K/V projections only for the positions before the root, the last
``window - 1`` of them, and the whole layer for the root alone).

Per prompt, interleaved: vanilla, the tree with the library's catch-up, the tree with the previous one
(patched in for that call only). Prints per-prompt times, tau and whether the outputs are identical, then
a table; writes JSONL.

    python3 scripts/probes/glide_catch_up_ab.py --bench stdlib_long --begin 7 --end 10 --max-new-tokens 64
    python3 scripts/probes/glide_catch_up_ab.py --bench stdlib_code --begin 0 --end 10 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from tabulate import tabulate

import specdec.ref.glide as ref_glide
from specdec import ref
from specdec.benchutil import question_prompts


def previous_catch_up(self, tokens, target_k, target_v):
    """The catch-up before session 24: positions [processed, L] through the whole layer, window-sized chunks."""
    dev, window = self.glide.device, self.glide.window
    L = len(tokens) - 1
    hidden = None
    for start in range(self.processed, L + 1, window):
        stop = min(start + window, L + 1)
        ids = torch.tensor(tokens[start:stop], dtype=torch.long, device=dev)[None]
        pos = torch.arange(start, stop, device=dev)
        self_mask = ref_glide.window_mask(pos, torch.cat([self.cache.pos, pos]), window)
        cross_mask = torch.arange(L, device=dev)[None, :] < pos[:, None]
        h, k, v = ref_glide.glide_layer(self.target, self.glide, ids, pos, self.cache.k, self.cache.v, self_mask,
                                        target_k, target_v, cross_mask, fused=True)
        self.cache.append(k, v, pos)
        hidden = h[0, -1]
    self.processed = L + 1
    return hidden


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="stdlib_long")
    ap.add_argument("--begin", type=int, default=7)
    ap.add_argument("--end", type=int, default=10)
    ap.add_argument("--tree-shape", default="2,2,2")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/glide_catch_up_ab.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(x) for x in args.tree_shape.split(","))
    target = ref.load_model("default")
    glide = ref.load_glide("default-glide", target=target)
    library = ref_glide.GlideDrafter._catch_up
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    with open(args.out, "w") as f:
        for q, ids in question_prompts(args.bench, args.begin, args.end):
            t, n = ids.shape[1], args.max_new_tokens
            ref.tree_spec_generate(target, glide, ids, t, tree_shape=shape, max_gen_len=4)   # warm-up
            rv = ref.vanilla_generate(target, ids, t, max_gen_len=n)
            new = ref.tree_spec_generate(target, glide, ids, t, tree_shape=shape, max_gen_len=n)
            ref_glide.GlideDrafter._catch_up = previous_catch_up
            try:
                old = ref.tree_spec_generate(target, glide, ids, t, tree_shape=shape, max_gen_len=n)
            finally:
                ref_glide.GlideDrafter._catch_up = library
            rec = dict(question_id=q["question_id"], prompt_tokens=t, vanilla_s=rv.elapsed_time, new_s=new.elapsed_time,
                       old_s=old.elapsed_time, tau_new=new.tau, tau_old=old.tau,
                       same_as_vanilla=bool(torch.equal(new.output_ids, rv.output_ids) and torch.equal(old.output_ids, rv.output_ids)))
            f.write(json.dumps(rec) + "\n")
            rows.append(rec)
            print(f"q{rec['question_id']} ({t} tokens): vanilla {rv.elapsed_time:.2f} s, tree new {new.elapsed_time:.2f} s "
                  f"(tau {new.tau:.2f}), previous {old.elapsed_time:.2f} s (tau {old.tau:.2f}), == vanilla {rec['same_as_vanilla']}",
                  flush=True)
    med = lambda key: statistics.median(r["vanilla_s"] / r[key] for r in rows)  # noqa: E731
    print(tabulate([["library (K/V only before the root)", f"{med('new_s'):.2f}x", statistics.median(r["tau_new"] for r in rows)],
                    ["previous (whole layer, every position)", f"{med('old_s'):.2f}x", statistics.median(r["tau_old"] for r in rows)]],
                   headers=["catch-up", "median speedup over vanilla", "median tau"]))
    print(f"outputs == vanilla: {sum(r['same_as_vanilla'] for r in rows)} / {len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
