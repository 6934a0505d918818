#!/usr/bin/env python3
"""README command 1 over held-out prompts: what a new user's ``specdec generate --compare`` shows.

For each prompt this runs the CLI itself (in-process, ``specdec.cli.main``), exactly as README command 1
does -- ``specdec generate --method M --compare --json PROMPT`` plus any extra CLI flags -- once per
configuration, and records the CLI's own figures: tokens/s of the method and of vanilla measured back to
back in the same call (so machine load hits both alike), the speedup it prints, whether the output equals
vanilla's, the tree shape that ran, and how repetitive the completion is (the share of distinct 4-grams
among its token 4-grams). Prints a table and writes JSONL.

    python scripts/measure_front_door.py                                   # questions 0-9 of stdlib_code
    python scripts/measure_front_door.py --method tree_spec --configs "auto=" "seed=--tree-shape 4,16,16,16,16" --begin 0 --end 10
    python scripts/measure_front_door.py --method spec --configs "auto=" "gamma4=--gamma 4"
    python scripts/measure_front_door.py --method logitspec --configs "auto=" "seed64=--draft-tree-capacity 64"

``--configs NAME=FLAGS`` (repeatable): extra CLI flags per configuration (empty = the CLI's defaults); the
configurations are interleaved prompt by prompt. The CLI caches the loaded models in-process, so only the
first call pays for loading; its first ``auto`` call also pays for the one-time cost calibration (cached
under ``$XDG_CACHE_HOME/specdec``), which happens before the timed decode and is reported separately.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import statistics
import sys
import time

from tabulate import tabulate

from specdec.bench import load_questions
from specdec.benchutil import distinct_ngram_share
from specdec.cli import main as cli_main


def run_cli(argv: list[str]) -> tuple[dict, float]:
    """One in-process CLI call with --json; returns its JSON object and the call's wall time."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"specdec {' '.join(map(shlex.quote, argv[:6]))} ... exited {rc}: {err.getvalue().strip()}")
    return json.loads(out.getvalue().strip().splitlines()[-1]), wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="stdlib_code", help="prompt set (Spec-Bench question.jsonl, folder or shipped name)")
    ap.add_argument("--begin", type=int, default=0)
    ap.add_argument("--end", type=int, default=10)
    ap.add_argument("--method", default="speculative", help="README command 1's method (speculative since session 25)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="README command 1's default (128)")
    ap.add_argument("--configs", nargs="+", default=["cli-default="], metavar="NAME=FLAGS")
    ap.add_argument("--out", default="runs/front_door.jsonl")
    args = ap.parse_args()
    configs = []
    for c in args.configs:
        name, sep, flags = c.partition("=")
        if not sep or not name:
            ap.error(f"--configs entries are NAME=FLAGS, got {c!r}")
        configs.append((name, shlex.split(flags)))
    questions = load_questions(args.bench, args.begin, args.end)
    records = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for i, q in enumerate(questions):
            prompt = q["turns"][0]
            for name, flags in configs:
                argv = ["generate", "--method", args.method, "--compare", "--json", "--max-new-tokens",
                        str(args.max_new_tokens), *flags, prompt]
                obj, wall = run_cli(argv)
                rec = dict(config=name, question_id=q["question_id"], prompt_tokens=obj["prompt_tokens"],
                           tokens_per_s=obj["tokens_per_s"], vanilla_tokens_per_s=obj["vanilla"]["tokens_per_s"],
                           speedup=obj["speedup"], tau=obj["tau"], same_output_as_vanilla=obj["same_output_as_vanilla"],
                           tree_shape=obj.get("tree_shape"), draft_tree_capacity=obj.get("draft_tree_capacity"),
                           distinct_4grams=distinct_ngram_share(obj["output_ids"], 4),
                           call_s=wall, completion=obj["completion"])
                records.append(rec)
                f.write(json.dumps(rec) + "\n")
                f.flush()
                print(f"[{i + 1}/{len(questions)}] {name}: q{q['question_id']} {rec['prompt_tokens']} tokens, speedup "
                      f"{rec['speedup']:.2f}x (tau {rec['tau']:.2f}, shape {rec['tree_shape'] or rec['draft_tree_capacity']}), same as vanilla: "
                      f"{rec['same_output_as_vanilla']}, call {wall:.1f} s", file=sys.stderr, flush=True)
    rows = []
    for name, _ in configs:
        rs = [r for r in records if r["config"] == name]
        rows.append([name, len(rs), f"{statistics.median(r['speedup'] for r in rs):.2f}",
                     f"{min(r['speedup'] for r in rs):.2f}-{max(r['speedup'] for r in rs):.2f}",
                     f"{statistics.median(r['tau'] for r in rs):.2f}",
                     f"{statistics.median(r['tokens_per_s'] for r in rs):.1f}",
                     f"{statistics.median(r['vanilla_tokens_per_s'] for r in rs):.1f}",
                     sum(r["same_output_as_vanilla"] for r in rs),
                     f"{statistics.median(r['distinct_4grams'] for r in rs):.2f}",
                     ",".join(sorted({str(tuple(r['tree_shape'])) if r['tree_shape'] else str(r['draft_tree_capacity'] or '-')
                                      for r in rs}))])
    print(tabulate(rows, headers=["config", "prompts", "median speedup", "range", "median tau", "method tok/s",
                                  "vanilla tok/s", "same as vanilla", "distinct 4-grams", "tree shapes / capacities"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
