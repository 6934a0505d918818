#!/usr/bin/env python3
"""Measure a GLIDE draft's acceptance by beam level and rank, and write it next to the draft's weights.

``tree_shape="auto"`` (docs/design.md §12, :mod:`specdec.shared.tree_search`) needs, per level k and beam
rank r, P(the accepted path continues into the level-(k+1) node of rank r | it reached level k). This
script decodes held-out prompts greedily with a WIDE beam tree (wider and deeper than any shape "auto" will
pick), records every round through the decoders' ``on_round`` callback (the draft tree and the accepted
path), and counts (:meth:`AcceptanceStats.from_rounds`). The result goes to ``<draft dir>/acceptance.json``
(``--out`` elsewhere), which :func:`specdec.shared.glide.load_glide_weights` reads into ``Glide.acceptance``.

    # the embedded default draft, CPU, reference path (the committed shared/assets/default/glide/acceptance.json)
    python scripts/measure_acceptance.py --target default --glide default-glide --bench stdlib_code \\
        --begin 10 --end 34 --max-new-tokens 96 --tree 32,32,32,32,32,32,32,32

Prompts: a Spec-Bench ``question.jsonl`` or a set shipped in ``specdec/shared/assets/prompts`` (the
first turn of each question, formatted as ``specdec bench`` formats it). ``--begin/--end`` slice the set;
keep them apart from the prompts you benchmark "auto" on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import torch

from specdec.bench import conversation_prompt, load_questions
from specdec.shared.assets import resolve_model_path
from specdec.shared.tokenizer import encode_prompt, load_tokenizer
from specdec.shared.tree_search import AcceptanceStats, acceptance_file_for


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _recount(args) -> int:
    """Counts from rounds saved with --save-rounds (no model needed)."""
    from types import SimpleNamespace

    from specdec.shared.tree import Tree

    with open(args.from_rounds) as f:
        meta = json.loads(f.readline())["meta"]
        records = [SimpleNamespace(draft=SimpleNamespace(tree=Tree(tuple(p))), path=path)
                   for p, path in (json.loads(line) for line in f if line.strip())]
    meta["counted_by"] = "python scripts/measure_acceptance.py " + " ".join(sys.argv[1:])
    stats = AcceptanceStats.from_rounds(records, meta)
    print(stats.table())
    if not args.dry_run:
        out = args.out or acceptance_file_for(resolve_model_path(args.glide))
        print(f"wrote {stats.save(out)}")
    return 0


def _validate(args) -> int:
    """Predicted (statistics x cost model) vs measured tokens per round and tokens per second."""
    from specdec.shared import tree_search

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lib = importlib.import_module(f"specdec.{args.backend}")
    glide_mod = importlib.import_module("specdec.ref.glide" if args.backend == "ref" else "specdec.fast.glide.decoders")
    target = lib.load_model(args.target, dtype=args.dtype, device=device)
    glide = lib.load_glide(args.glide, target=target)
    tok = load_tokenizer(args.tokenizer or args.target)
    stats = tree_search.acceptance_of(glide) or tree_search.DEFAULT_PRIOR
    t0 = time.perf_counter()
    cost = glide_mod.device_cost_model(target, glide)
    print(f"cost model ({time.perf_counter() - t0:.1f} s incl. measuring if not cached): "
          f"{json.dumps({k: v for k, v in cost.to_dict().items() if k != 'meta'})}")
    shape_auto = glide_mod.resolve_tree_shape(target, glide, "auto")
    gamma_auto = glide_mod.resolve_gamma(target, glide, "auto")
    begin, end = (int(x) for x in args.validate.split(":"))
    prompts = [torch.tensor([encode_prompt(tok, conversation_prompt(tok, q["turns"], []))]) for q in load_questions(args.bench, begin, end)]
    runs = [("vanilla", None), ("tree (4,16,16,16,16)", (4, 16, 16, 16, 16)), (f"tree auto {shape_auto}", shape_auto),
            ("chain gamma 4", (1,) * 4), (f"chain auto gamma {gamma_auto}", (1,) * gamma_auto)]
    print(f"| decoder | predicted tokens/round | measured tau | predicted ms/round | measured ms/round | "
          f"predicted tok/s | measured tok/s | == vanilla |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for name, shape in runs:
        toks = passes = 0
        secs = 0.0
        outs = []
        for ids in prompts:
            if shape is None:
                r = lib.vanilla_generate(target, ids, ids.shape[1], max_gen_len=args.max_new_tokens, eos_id=[])
            else:
                r = lib.tree_spec_generate(target, glide, ids, ids.shape[1], tree_shape=shape, max_gen_len=args.max_new_tokens, eos_id=[])
            toks, passes, secs = toks + r.num_tokens - 1, passes + r.num - 1, secs + r.elapsed_time
            outs.append(r.output_ids)
        base = outs if base is None else base
        same = all(torch.equal(a, b) for a, b in zip(outs, base))
        tau, ms, tps = toks / passes, 1e3 * secs / passes, toks / secs
        if shape is None:
            print(f"| {name} | 1 | 1.00 | | {ms:.1f} | | {tps:.1f} | {same} |")
        else:
            e, t = stats.expected_tokens(shape), cost.round_time(shape)
            print(f"| {name} | {e:.2f} | {tau:.2f} | {1e3 * t:.1f} | {ms:.1f} | {e / t:.1f} | {tps:.1f} | {same} |")
    print(f"{len(prompts)} prompts (questions {begin}-{end - 1} of {args.bench}), {args.max_new_tokens} new tokens, EOS off, "
          f"{args.backend} {device} {args.dtype}, {torch.get_num_threads()} threads, commit {_commit()}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="default", help="target model dir or embedded name (default: default)")
    ap.add_argument("--glide", default="default-glide", help="GLIDE draft dir/file or embedded name (default: default-glide)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the target's)")
    ap.add_argument("--bench", default="stdlib_code", help="prompt set: question.jsonl, a folder, or a shipped set name")
    ap.add_argument("--begin", type=int, default=10)
    ap.add_argument("--end", type=int, default=34)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--tree", default="32,32,32,32,32,32,32,32", help="the wide reference tree (nodes per level)")
    ap.add_argument("--backend", choices=("ref", "fast"), default="ref")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="output file (default: acceptance.json next to the draft's weights)")
    ap.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    ap.add_argument("--save-rounds", default=None, help="also write every round's (parents, path) as JSON lines here")
    ap.add_argument("--from-rounds", default=None, help="count rounds saved by --save-rounds instead of decoding")
    ap.add_argument("--validate", default=None, metavar="BEGIN:END",
                    help="instead of measuring: decode these questions with the default tree, the auto tree, gamma 4 and "
                         "auto gamma (the draft's stored statistics, this device's cost model) and print predicted vs measured")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_rounds:
        return _recount(args)
    if args.validate:
        return _validate(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lib = importlib.import_module(f"specdec.{args.backend}")
    target = lib.load_model(args.target, dtype=args.dtype, device=device)
    glide = lib.load_glide(args.glide, target=target)
    tok = load_tokenizer(args.tokenizer or args.target)
    shape = tuple(int(x) for x in args.tree.split(","))
    questions = load_questions(args.bench, args.begin, args.end)

    records = []
    tokens = passes = 0
    t0 = time.perf_counter()
    for i, q in enumerate(questions):
        ids = torch.tensor([encode_prompt(tok, conversation_prompt(tok, q["turns"], []))])
        res = lib.tree_spec_generate(target, glide, ids, ids.shape[1], tree_shape=shape, max_gen_len=args.max_new_tokens,
                                     eos_id=[], on_round=records.append)
        tokens += res.num_tokens
        passes += res.num
        print(f"[{i + 1}/{len(questions)}] question {q['question_id']}: {ids.shape[1]} prompt tokens, tau {res.tau:.2f}, "
              f"{len(records)} rounds so far, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    meta = {
        "draft": args.glide, "target": args.target, "bench": args.bench, "questions": [args.begin, args.end],
        "prompts": len(questions), "max_new_tokens": args.max_new_tokens, "tree_shape": list(shape), "greedy": True,
        "backend": args.backend, "device": device, "dtype": args.dtype, "commit": _commit(),
        "tau_wide_tree": round(tokens / passes, 4), "seconds": round(time.perf_counter() - t0, 1),
        "command": "python scripts/measure_acceptance.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if args.save_rounds:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_rounds)), exist_ok=True)
        with open(args.save_rounds, "w") as f:
            f.write(json.dumps({"meta": meta}) + "\n")
            for r in records:
                f.write(json.dumps([list(r.draft.tree.parents), list(r.path)]) + "\n")
    stats = AcceptanceStats.from_rounds(records, meta)
    print(stats.table())
    print(f"rounds {stats.rounds}, tau of the wide tree {meta['tau_wide_tree']}, "
          f"expected tokens of (4,16,16,16,16): {stats.expected_tokens((4, 16, 16, 16, 16)):.3f}")
    if not args.dry_run:
        out = args.out or acceptance_file_for(resolve_model_path(args.glide))
        stats.save(out)
        print(f"wrote {out}")
    print(json.dumps({k: meta[k] for k in ("prompts", "tau_wide_tree", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
