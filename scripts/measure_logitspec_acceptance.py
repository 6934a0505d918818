#!/usr/bin/env python3
"""Measure LogitSpec's expected tokens per round at every capacity, and write it next to the target's weights.

``draft_tree_capacity="auto"`` (:mod:`specdec.shared.capacity`) needs ``E(c)``, the tokens a round emits when
the trie holds ``c`` drafts. The tree of capacity ``c`` is the first ``c`` nodes the trie of any larger
capacity creates, so this script decodes held-out prompts greedily ONCE at the largest capacity (``--capacity``,
default 127), records every round's accepted path through ``on_round`` with the drafter's insertion indices,
and counts what each smaller capacity would have accepted (:meth:`CapacityStats.measure`). The result goes to
``<target dir>/logitspec_acceptance.json`` (``--out`` elsewhere), which ``resolve_capacity`` of both paths reads.

    # the embedded default model, CPU, reference path (the committed shared/assets/default/target/logitspec_acceptance.json)
    python scripts/measure_logitspec_acceptance.py --target default --bench stdlib_code --begin 10 --end 34 --max-new-tokens 96

Prompts: as ``scripts/measure_acceptance.py`` (``--begin/--end`` slice the set; keep them apart from the
prompts you benchmark "auto" on). Prompts are cut to their last ``--max-prompt-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tabulate import tabulate
from tqdm import tqdm

from specdec.bench import conversation_prompt, load_questions
from specdec.ref import load_model, run_speculative
from specdec.shared.assets import resolve_model_path
from specdec.shared.capacity import CAPACITY_CHOICES, CapacityStats, capacity_file_for
from specdec.shared.retrieval import LogitSpecDrafter
from specdec.shared.tokenizer import encode_prompt, load_tokenizer

from measure_acceptance import _commit  # scripts/ (this script's own folder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="default", help="target model dir or embedded name (default: default)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the target's)")
    ap.add_argument("--bench", default="stdlib_code", help="prompt set: question.jsonl, a folder, or a shipped set name")
    ap.add_argument("--begin", type=int, default=10)
    ap.add_argument("--end", type=int, default=34)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-prompt-tokens", type=int, default=1024)
    ap.add_argument("--capacity", type=int, default=max(CAPACITY_CHOICES), help="the capacity the rounds run at (>= every counted one)")
    ap.add_argument("--max-ngram-size", type=int, default=3)
    ap.add_argument("--num-pred-tokens", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="output file (default: logitspec_acceptance.json next to the target's weights)")
    ap.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    args = ap.parse_args(argv)
    if args.capacity < 1:
        ap.error(f"--capacity must be >= 1, got {args.capacity}")
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_model_path(args.target)
    target = load_model(path, dtype=args.dtype, device=args.device)
    tok = load_tokenizer(args.tokenizer or path)
    questions = load_questions(args.bench, args.begin, args.end)
    rounds: list[list[int]] = []
    t0 = time.perf_counter()
    for q in tqdm(questions, desc="prompts", file=sys.stderr):
        ids = encode_prompt(tok, conversation_prompt(tok, q["turns"], []))[-args.max_prompt_tokens:]
        input_ids = torch.tensor([ids], dtype=torch.long, device=args.device)
        drafter = LogitSpecDrafter(args.max_ngram_size, args.num_pred_tokens, args.capacity)
        # the accepted drafts of each round, as the drafter's insertion indices (root excluded)
        hook = lambda rec: rounds.append([drafter.insertion_ids[j] for j in rec.path[1:]])  # noqa: E731
        run_speculative(target, drafter, input_ids, len(ids), args.max_new_tokens, eos_id=[], method="LogitSpec",
                        on_round=hook, tree_size=args.capacity + 1)
    caps = [c for c in CAPACITY_CHOICES if c <= args.capacity] + ([args.capacity] if args.capacity not in CAPACITY_CHOICES else [])
    meta = {"target": args.target, "bench": args.bench, "questions": [args.begin, args.end], "max_new_tokens": args.max_new_tokens,
            "max_prompt_tokens": args.max_prompt_tokens, "run_capacity": args.capacity, "max_ngram_size": args.max_ngram_size,
            "num_pred_tokens": args.num_pred_tokens, "device": args.device, "dtype": args.dtype, "commit": _commit(),
            "seconds": round(time.perf_counter() - t0, 1),
            "command": "python scripts/measure_logitspec_acceptance.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    stats = CapacityStats.measure(rounds, caps, meta)
    print(tabulate([[c, f"{stats.expected_tokens(c):.3f}"] for c in stats.capacities], headers=["capacity", "E(tokens per round)"]))
    print(f"{stats.rounds} rounds of {len(questions)} prompts in {meta['seconds']} s")
    if not args.dry_run:
        out = args.out or capacity_file_for(path)
        stats.save(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
