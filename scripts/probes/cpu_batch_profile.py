#!/usr/bin/env python3
"""Probe (session 41): where a batched speculative run of the reference engine spends its time on a CPU.

``specdec generate --prompts-file`` on a CPU found every speculative method slower than batched vanilla at 4
requests (BENCHMARKS "The CLI's batched requests on a 2-core CPU"). This times ``ref.vanilla_generate`` and
``ref.speculative_generate`` (the embedded target and draft, fp32) at one prompt and at ``--batch`` prompts, then
prints cProfile's cumulative table of one batched speculative run: the draft model's proposals
(``DraftModelDrafter.propose``, row by row) against the target's verifications (``verify_batch``).

    python3 scripts/probes/cpu_batch_profile.py [--batch 4] [--tokens 48] [--rows 25]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from tabulate import tabulate

from specdec import ref
from specdec.shared.tokenizer import encode_prompt, load_tokenizer

PROMPTS = ["def read_config(path):", "import os\n\ndef list_files(path):", "class Stack:", "def fib(n):",
           "import json\n", "def parse_args():", "class Node:", "def main():"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, choices=range(2, len(PROMPTS) + 1), metavar="B",
                    help=f"prompts in the batch, 2..{len(PROMPTS)}")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per row (no EOS)")
    ap.add_argument("--rows", type=int, default=25, help="rows of the cProfile table")
    args = ap.parse_args()
    tok = load_tokenizer("default")
    target, draft = ref.load_model("default"), ref.load_model("default-draft")
    prompts = [torch.tensor(encode_prompt(tok, p)) for p in PROMPTS[: args.batch]]
    kw = dict(max_gen_len=args.tokens, eos_id=[])
    runs = {"vanilla": lambda ps: ref.vanilla_generate(target, ps, None, **kw),
            "speculative": lambda ps: ref.speculative_generate(target, draft, ps, None, **kw)}
    table = []
    for name, fn in runs.items():
        for ps in (prompts[:1], prompts):
            fn(ps)                                     # warm-up
            t = time.perf_counter()
            res = fn(ps)
            dt = time.perf_counter() - t
            table.append([name, len(ps), res.num, f"{dt * 1e3:.0f}", f"{sum(res.row_lengths) / dt:.0f}"])
    prof = cProfile.Profile()
    prof.enable()
    runs["speculative"](prompts)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(args.rows)
    print(tabulate(table, headers=["decoder", "B", "passes", "ms", "tokens/s"], tablefmt="github"))


if __name__ == "__main__":
    main()
