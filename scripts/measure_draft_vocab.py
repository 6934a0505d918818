#!/usr/bin/env python
"""Tau of the GLIDE beam tree against the size N of a truncated draft vocabulary (issue 20, docs/design.md §12).

For every N the map is built by ``specdec draft-vocab`` (the same code, :func:`specdec.draft_vocab.run_draft_vocab`)
from prompts ``[--build-begin:]`` of the shipped ``stdlib_code`` set -- either their text (default) or, with
``--generate``, the target's greedy continuations of them -- and the tree decoder runs greedy on the
DISJOINT prompts ``[0:--prompts)`` (reference path, CPU). N = V is the full vocabulary (no map). Every run is
checked against vanilla greedy decoding (lossless: the same tokens), and the table prints tau (tokens per
target forward pass, all prompts pooled) and the map's coverage of the measured outputs.

    python scripts/measure_draft_vocab.py --sizes 256,512,1024,2048,4096 --prompts 8 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,512,1024,2048,4096", help="comma-separated N (V = the full vocabulary)")
    ap.add_argument("--prompts", type=int, default=8, help="measure on stdlib_code prompts [0, this)")
    ap.add_argument("--build-begin", type=int, default=10, help="build the maps from stdlib_code prompts [this:]")
    ap.add_argument("--generate", action="store_true", help="build from the target's greedy continuations, not the prompts' text")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--tree-shape", default="4,16,16,16,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.build_begin < args.prompts:
        print("measure_draft_vocab: error: --build-begin must be >= --prompts (build and measure prompts disjoint)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    import specdec.ref as ref
    from specdec.draft_vocab import read_prompt_set, run_draft_vocab, add_draft_vocab_args
    from specdec.shared.assets import resolve_model_path
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    target = ref.load_model("default")
    full = ref.load_glide("default-glide", target)
    v = target.config.vocab_size
    tok = load_tokenizer(resolve_model_path("default"))
    prompts = [encode_prompt(tok, p) for p in read_prompt_set("stdlib_code", 0, args.prompts)]
    shape = tuple(int(s) for s in args.tree_shape.split(","))
    want = []
    for ids in prompts:
        x = torch.tensor([ids])
        want.append(ref.vanilla_generate(target, x, x.shape[1], max_gen_len=args.max_new_tokens).tolist())

    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            if n >= v:
                glide, coverage_build = full, 1.0
            else:
                p = argparse.ArgumentParser()
                add_draft_vocab_args(p)
                cli = ["--size", str(n), "--prompts", "stdlib_code", "--begin", str(args.build_begin),
                       "--output", os.path.join(tmp, f"n{n}"), "--max-new-tokens", str(args.max_new_tokens)]
                with open(os.devnull, "w") as null:
                    run_draft_vocab(p.parse_args(cli + (["--generate"] if args.generate else [])), stdout=null)
                glide = ref.load_glide(os.path.join(tmp, f"n{n}"), target)
                with open(os.path.join(tmp, f"n{n}", "draft_vocab.json")) as f:
                    coverage_build = json.load(f)["coverage"]
            tokens = passes = inside = 0
            t0 = time.perf_counter()
            for ids, w in zip(prompts, want):
                x = torch.tensor([ids])
                res = ref.tree_spec_generate(target, glide, x, x.shape[1], tree_shape=shape, max_gen_len=args.max_new_tokens)
                assert res.tolist() == w, f"N={n}: output differs from vanilla greedy"  # lossless
                tokens += len(w)
                passes += sum(res.row_nums)
                vm = set(glide.vocab_map.tolist()) if glide.vocab_map is not None else None
                inside += len(w) if vm is None else sum(t in vm for t in w)
            rows.append({"N": n, "tau": tokens / passes, "tokens": tokens, "target_passes": passes,
                         "coverage_build": coverage_build, "coverage_measured": inside / tokens,
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    src = "the target's greedy continuations of" if args.generate else "the text of"
    print(f"\ncommit {commit}; maps from {src} stdlib_code prompts [{args.build_begin}:]; measured on prompts "
          f"[0:{args.prompts}], {args.max_new_tokens} new tokens, greedy, tree {list(shape)}, ref path, CPU\n")
    print("| N | share of V | tau | target passes | map covers (build set) | map covers (measured outputs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['N']}{' (full)' if r['N'] >= v else ''} | {r['N'] / v:.3f} | {r['tau']:.3f} | {r['target_passes']} | "
              f"{r['coverage_build']:.3f} | {r['coverage_measured']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"commit": commit, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
