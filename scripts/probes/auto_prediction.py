#!/usr/bin/env python3
"""How well ``tree_shape="auto"``'s acceptance model predicts the tokens per round it optimises (issue 21).

    python3 scripts/probes/auto_prediction.py --begin 10 --end 30 --max-new-tokens 96 --out runs/auto_prediction.jsonl

For each shape, the expected tokens per round under the draft's shipped acceptance statistics
(:meth:`specdec.shared.tree_search.AcceptanceStats.expected_tokens`) against the tokens per round measured with
the reference ``tree_spec_generate`` (greedy, CPU) on ``stdlib_code`` prompts ``[begin, end)``. Rounds whose tree
was cut by the token budget (the last rounds of a call: fewer levels than the shape) are left out, so the two
numbers count the same thing. Prints a table, writes JSONL.
"""

from __future__ import annotations

import argparse

import torch

from specdec import ref
from specdec.bench import load_questions
from specdec.benchutil import report
from specdec.shared.round import max_drafts
from specdec.shared.tokenizer import encode_prompt, load_tokenizer
from specdec.shared.tree_search import acceptance_of

SHAPES = [(3, 3, 2, 1, 1, 1), (4, 4, 4, 3), (2, 2, 2, 1, 1), (3, 2, 2), (1, 1, 1, 1), (4, 16, 16, 16, 16)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--begin", type=int, default=10)
    ap.add_argument("--end", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    target = ref.load_model("default")
    glide = ref.load_glide("default-glide", target=target)
    tok = load_tokenizer("default")
    stats = acceptance_of(glide)
    full_rounds = {s: [] for s in SHAPES}
    for q in load_questions("stdlib_code", args.begin, args.end):
        ids = torch.tensor([encode_prompt(tok, q["turns"][0])])
        for shape in SHAPES:
            emitted = [1]   # the prefill's token

            def on_round(r, shape=shape, emitted=emitted):
                if max_drafts(args.max_new_tokens - emitted[0]) >= len(shape):   # a round with every level
                    full_rounds[shape].append(len(r.path))                       # accepted drafts + 1
                emitted[0] += len(r.path)

            ref.tree_spec_generate(target, glide, ids, ids.shape[1], tree_shape=shape, max_gen_len=args.max_new_tokens,
                                   on_round=on_round)
    rows, records = [], []
    for shape in SHAPES:
        got = full_rounds[shape]
        measured = sum(got) / len(got)
        pred = stats.expected_tokens(shape)
        records.append(dict(shape=list(shape), predicted=pred, measured=measured, rounds=len(got),
                            prompts=[args.begin, args.end], max_new_tokens=args.max_new_tokens))
        rows.append([",".join(map(str, shape)), f"{pred:.2f}", f"{measured:.2f}", f"{pred / measured - 1:+.1%}", len(got)])
    report(rows, ["shape", "predicted tokens/round", "measured (full rounds)", "over-prediction", "rounds"], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
