#!/usr/bin/env python3
"""cProfile of one reference ``tree_spec_generate`` call (README command 1's method) on the CPU, ops by own time.

    python3 scripts/probes/ref_tree_profile.py      # shipped pair, stdlib_code question 4, tree (3, 2, 2), 128 tokens

One untimed warm-up call (16 tokens) first, so the profile holds the decode rounds and not one-time setup.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from specdec import ref
from specdec.benchutil import question_prompts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--question", type=int, default=4, help="stdlib_code question id")
    ap.add_argument("--tree-shape", default="3,2,2")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=18, help="how many ops to print")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(x) for x in args.tree_shape.split(","))
    target = ref.load_model("default")
    glide = ref.load_glide("default-glide", target=target)
    _, ids = question_prompts("stdlib_code", args.question, args.question + 1)[0]
    ref.tree_spec_generate(target, glide, ids, ids.shape[1], tree_shape=shape, max_gen_len=16)   # warm-up
    prof = cProfile.Profile()
    prof.enable()
    ref.tree_spec_generate(target, glide, ids, ids.shape[1], tree_shape=shape, max_gen_len=args.max_new_tokens)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
