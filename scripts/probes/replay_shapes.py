#!/usr/bin/env python3
"""Replay narrower beam shapes inside recorded wide-tree rounds (issue 21: is ``auto``'s acceptance model wrong?).

    python3 scripts/probes/replay_shapes.py --rounds runs/acceptance/default_glide_rounds.jsonl --prompts 20 40

The rounds file is what ``scripts/measure_acceptance.py --save-rounds`` writes: a meta line, then per round the
wide beam tree's parents (each level's nodes best first) and the accepted path. For a shape, each round's beam of
that shape is simulated inside the wide tree (level j keeps the first ``shape[j]`` nodes of the wide level whose
parent it kept; exact under greedy acceptance while the wide level holds them) and the path followed through it:
the tokens per round the shape would emit at these round starts, with no level-by-level approximation. Rounds with
fewer levels than the shape (cut by the token budget) are left out, as ``scripts/probes/auto_prediction.py`` does.
The rounds are split into prompts at each full-depth round that follows a cut one (every prompt's calls end in
cut rounds), so the first N prompts can be compared with a measurement on those prompts. Prints a table.
"""

from __future__ import annotations

import argparse
import json

from specdec.benchutil import report
from specdec.shared.tree import Tree
from specdec.shared.tree_search import AcceptanceStats

SHAPES = [(3, 3, 2, 1, 1, 1), (4, 4, 4, 3), (2, 2, 2, 1, 1), (3, 2, 2), (1, 1, 1, 1), (4, 16, 16, 16, 16)]


def replay(rounds: list[tuple[Tree, list[int]]], shape: tuple[int, ...]) -> tuple[float, int]:
    """Mean tokens per round (the target's token included) of ``shape`` over the full-depth rounds, and their count."""
    total = n = 0
    for tree, path in rounds:
        if max(tree.depth) < len(shape):
            continue
        levels = [[i for i, d in enumerate(tree.depth) if d == j] for j in range(max(tree.depth) + 1)]
        kept, tokens = {0}, 1
        for j, width in enumerate(shape):
            kept = set([x for x in levels[j + 1] if tree.parents[x] in kept][:width])
            if len(path) <= j + 1 or path[j + 1] not in kept:
                break
            tokens += 1
        total, n = total + tokens, n + 1
    return total / n, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", default="runs/acceptance/default_glide_rounds.jsonl")
    ap.add_argument("--prompts", nargs="+", type=int, default=[20, 40], help="replay over the first N prompts, per N")
    ap.add_argument("--out", default=None, help="also write the rows as JSONL here")
    args = ap.parse_args()
    with open(args.rounds) as f:
        meta = json.loads(f.readline())["meta"]
        rounds = [(Tree(tuple(p)), path) for p, path in (json.loads(line) for line in f if line.strip())]
    full = len(meta["tree_shape"])
    prompt_of, prompt, prev_cut = [], 0, False
    for tree, _ in rounds:
        cut = max(tree.depth) < full
        prompt += prev_cut and not cut
        prompt_of.append(prompt)
        prev_cut = cut
    print(f"{len(rounds)} rounds, {prompt + 1} prompts found ({meta['prompts']} recorded), questions {meta['questions']}")
    stats = AcceptanceStats.from_rounds(
        [type("R", (), {"draft": type("D", (), {"tree": t})(), "path": p})() for t, p in rounds])
    rows, records = [], []
    headers = ["shape", "model (all rounds)"] + [f"replay, first {n} prompts" for n in args.prompts]
    for shape in SHAPES:
        cells = [str(shape), f"{stats.expected_tokens(shape):.3f}"]
        rec = {"shape": list(shape), "model": stats.expected_tokens(shape)}
        for n in args.prompts:
            mean, count = replay([r for r, q in zip(rounds, prompt_of) if q < n], shape)
            cells.append(f"{mean:.3f} ({count} rounds)")
            rec[f"replay_first_{n}"], rec[f"rounds_first_{n}"] = mean, count
        rows.append(cells)
        records.append(rec)
    report(rows, headers, records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
