#!/usr/bin/env python3
"""A/B (session 25, CPU): the reference draft-model chain with its draft's prompt pass in the prefill (the
``prefill`` hook of :class:`specdec.ref.speculative.DraftModelDrafter`) against the same pass inside the first
round (the hook switched off on the class), interleaved per prompt beside vanilla, in one process.

Reports per prompt the prefill time, the decode time and the total of each, and whether every output equals
vanilla's. The hook moves work between the two phases; the total should not change.

    python3 scripts/probes/draft_prefill_ab.py --bench stdlib_long --begin 7 --end 10 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import specdec.ref as ref
from specdec.bench import load_questions
from specdec.benchutil import report
from specdec.ref.speculative import DraftModelDrafter
from specdec.shared.tokenizer import encode_prompt, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="stdlib_long")
    ap.add_argument("--begin", type=int, default=7)
    ap.add_argument("--end", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join("runs", "draft_prefill_ab.jsonl"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tok = load_tokenizer("default")
    target, draft = ref.load_model("default"), ref.load_model("default-draft")
    hook = DraftModelDrafter.prefill
    rows, recs = [], []
    for q in load_questions(args.bench)[args.begin : args.end]:
        ids = torch.tensor([encode_prompt(tok, q["turns"][0])])
        van = ref.vanilla_generate(target, ids, ids.shape[1], max_gen_len=args.max_new_tokens, eos_id=[])
        for name, on in (("hook", True), ("in round", False)):
            DraftModelDrafter.prefill = hook if on else None
            try:
                r = ref.speculative_generate(target, draft, ids, ids.shape[1], max_gen_len=args.max_new_tokens, eos_id=[])
            finally:
                DraftModelDrafter.prefill = hook
            rec = {"question_id": q["question_id"], "prompt_tokens": ids.shape[1], "form": name,
                   "prefill_s": r.prefill_time, "decode_s": r.elapsed_time, "tau": float(r.tau),
                   "vanilla_prefill_s": van.prefill_time, "vanilla_decode_s": van.elapsed_time,
                   "same_as_vanilla": bool(torch.equal(r.output_ids, van.output_ids))}
            recs.append(rec)
    for form in ("hook", "in round"):
        rs = [r for r in recs if r["form"] == form]
        med = lambda k: statistics.median(r[k] for r in rs)
        rows.append([form, len(rs), *(f"{x:.3f}" for x in (
            med("prefill_s"), med("decode_s"), statistics.median(r["prefill_s"] + r["decode_s"] for r in rs),
            med("vanilla_prefill_s"), med("vanilla_decode_s"), statistics.median(r["vanilla_decode_s"] / r["decode_s"] for r in rs),
            med("tau"))), sum(r["same_as_vanilla"] for r in rs)])
    report(rows, ["draft's prompt pass", "prompts", "prefill s", "decode s", "total s", "vanilla prefill s",
                  "vanilla decode s", "decode speedup", "tau", "== vanilla"], recs, args.out)


if __name__ == "__main__":
    main()
