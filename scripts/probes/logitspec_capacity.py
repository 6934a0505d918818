#!/usr/bin/env python3
"""LogitSpec's draft tree capacity against what it buys: tau, and on the device the decode speed against vanilla
(issue 20 item 4: LogitSpec at 0.50x vanilla on the H200 with its seed capacity of 64, trees full in 175 of 177
rounds -- is a smaller tree faster?).

    python3 scripts/probes/logitspec_capacity.py --capacities 8 16 32 64 --questions 10 --max-new-tokens 96 \
        [--backend ref|fast] [--out runs/logitspec_capacity.jsonl]

The embedded model, greedy, prompts 10 .. 10 + ``--questions`` of ``stdlib_code`` (the last 512 tokens of each);
per capacity one batch-of-one call per prompt (after one untimed warm-up call per capacity on the fast path:
kernels and graphs). Reports tau (tokens / target passes over all prompts), the median over prompts of decode
tokens/s, and that over vanilla's median measured in the same run, and checks every output equals vanilla's.
Reference path: fp32 on the CPU; fast path: bf16 on CUDA (fp32 under the interpreter elsewhere: slow).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from specdec.bench import load_questions
from specdec.benchutil import report
from specdec.shared.tokenizer import encode_prompt, load_tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacities", nargs="+", default=["8", "16", "32", "64"],
                    help="capacities to run (ints >= 1), and/or auto (the capacity draft_tree_capacity='auto' picks)")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--backend", choices=["ref", "fast"], default="ref")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        args.capacities = [c if c == "auto" else int(c) for c in args.capacities]
    except ValueError:
        ap.error(f"--capacities: ints >= 1 or auto, got {args.capacities}")
    if any(c != "auto" and c < 1 for c in args.capacities):
        ap.error("--capacities: each must be >= 1")
    if args.backend == "ref":
        from specdec import ref as path

        target = path.load_model("default")
    else:
        import specdec.fast as path

        cuda = torch.cuda.is_available()
        target = path.load_model("default", dtype=torch.bfloat16 if cuda else torch.float32,
                                 device="cuda" if cuda else "cpu")
    tok = load_tokenizer("default")
    prompts = [torch.tensor([encode_prompt(tok, q["turns"][0])[-512:]])
               for q in load_questions("stdlib_code", 10, 10 + args.questions)]
    kw = dict(max_gen_len=args.max_new_tokens, eos_id=[])
    configs = {"vanilla": lambda ids: path.vanilla_generate(target, ids, ids.shape[1], **kw)}
    for cap in args.capacities:
        label = f"logitspec {cap}"
        if cap == "auto":   # resolved once, before anything is timed (its first call calibrates the device)
            cap = path.logitspec_generate(target, prompts[0], prompts[0].shape[1], draft_tree_capacity="auto", max_gen_len=2).draft_tree_capacity
            print(f"auto -> capacity {cap}", file=sys.stderr)
            label = f"logitspec {cap} (auto)"
        configs[label] = (lambda c: lambda ids: path.logitspec_generate(
            target, ids, ids.shape[1], draft_tree_capacity=c, **kw))(cap)
    if args.backend == "fast":
        for run in configs.values():
            run(prompts[0])
    results = {name: [] for name in configs}
    for ids in prompts:   # prompt by prompt, every configuration: they see the same machine
        for name, run in configs.items():
            results[name].append(run(ids))
    base = statistics.median(r.output_ids.shape[1] / r.elapsed_time for r in results["vanilla"])
    rows, records = [], []
    for name, res in results.items():
        tau = sum(r.output_ids.shape[1] for r in res) / sum(r.num for r in res)
        tps = statistics.median(r.output_ids.shape[1] / r.elapsed_time for r in res)
        same = all(torch.equal(r.output_ids, v.output_ids) for r, v in zip(res, results["vanilla"]))
        rec = {"config": name, "backend": args.backend, "tau": tau, "median_tokens_per_s": tps, "vs_vanilla": tps / base,
               "same_as_vanilla": same}
        records.append(rec)
        rows.append([name, f"{tau:.3f}", f"{tps:.1f}", f"{tps / base:.2f}x", same])
    report(rows, ["config", "tau", "median tok/s", "vs vanilla", "== vanilla"], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
