#!/usr/bin/env python3
"""Where a batched speculative round spends its time (issue 19): cProfile of fast ``tree_spec`` / ``spec`` on the
embedded model at batch B (the methods part of scripts/bench_batch.py showed total tokens/s flat in B).

    python3 scripts/probes/batch_host_profile.py --batch 8 --out $OUT/batch_profile.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import specdec.fast as fast
from specdec.bench import load_questions
from specdec.shared.tokenizer import encode_prompt, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["tree_spec", "spec", "vanilla"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="out/batch_profile.txt")
    args = ap.parse_args()
    target = fast.load_model("default", dtype=torch.bfloat16, device="cuda")
    glide = fast.load_glide("default-glide", target)
    tok = load_tokenizer("default")
    prompts = [encode_prompt(tok, q["turns"][0])[-1024:] for q in load_questions("stdlib_code", 0, args.batch)]
    calls = {"tree_spec": lambda: fast.tree_spec_generate(target, glide, prompts, None, max_gen_len=args.max_new_tokens, eos_id=[]),
             "spec": lambda: fast.spec_generate(target, glide, prompts, None, max_gen_len=args.max_new_tokens, eos_id=[]),
             "vanilla": lambda: fast.vanilla_generate(target, prompts, None, max_gen_len=args.max_new_tokens, eos_id=[])}
    report = io.StringIO()
    for name in args.methods:
        calls[name]()
        prof = cProfile.Profile()
        prof.enable()
        res = calls[name]()
        torch.cuda.synchronize()
        prof.disable()
        rounds = res.num if isinstance(res.num, int) else res.num
        head = f"== {name} B={args.batch}: {sum(res.row_lengths) / res.elapsed_time:.0f} tok/s, tau {res.tau:.2f}, num {rounds}"
        print(head, flush=True)
        report.write(head + "\n")
        st = pstats.Stats(prof, stream=report)
        st.sort_stats("tottime").print_stats(args.top)
    with open(args.out, "w") as f:
        f.write(report.getvalue())
    print(report.getvalue()[:6000])


if __name__ == "__main__":
    main()
