#!/usr/bin/env python3
"""A/B (CPU): the reference draft-model chain with ``speculative_generate(draft_window=W)`` -- the draft model reads
only the last W prompt tokens -- against the whole prompt (W = None) and vanilla, on long held-out prompts, in one
process. The library version of ``draft_window_pilot.py`` (which monkeypatched the drafter): no patching here.

Per prompt and W: tau, prefill, decode and total time, and the speedup of the total over vanilla's; every output
must equal vanilla's (asserted: verification does not change with the window). Then the medians per W.

    python3 scripts/probes/draft_window_ab.py --bench stdlib_long --begin 7 --end 10 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import specdec.ref as ref
from specdec.bench import load_questions
from specdec.benchutil import report
from specdec.shared.tokenizer import encode_prompt, load_tokenizer

WINDOWS = (None, 2048, 512)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="stdlib_long")
    ap.add_argument("--begin", type=int, default=7)
    ap.add_argument("--end", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join("runs", "draft_window_ab.jsonl"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tok = load_tokenizer("default")
    target, draft = ref.load_model("default"), ref.load_model("default-draft")
    gen = dict(max_gen_len=args.max_new_tokens, eos_id=[])
    rows, recs = [], []
    for q in load_questions(args.bench)[args.begin : args.end]:
        ids = torch.tensor([encode_prompt(tok, q["turns"][0])])
        n = ids.shape[1]
        van = ref.vanilla_generate(target, ids, n, **gen)
        van_total = van.prefill_time + van.elapsed_time
        rows.append([q["question_id"], n, "vanilla", "1.00", f"{van.prefill_time:.2f}", f"{van.elapsed_time:.2f}",
                     f"{van_total:.2f}", "1.00"])
        for w in WINDOWS:
            r = ref.speculative_generate(target, draft, ids, n, draft_window=w, **gen)
            assert torch.equal(r.output_ids, van.output_ids), (q["question_id"], w)
            total = r.prefill_time + r.elapsed_time
            rec = {"question_id": q["question_id"], "prompt_tokens": n, "draft_window": w, "tau": float(r.tau),
                   "prefill_s": r.prefill_time, "decode_s": r.elapsed_time, "total_s": total,
                   "vanilla_total_s": van_total, "speedup": van_total / total}
            recs.append(rec)
            rows.append([q["question_id"], n, f"W={w}", f"{r.tau:.2f}", f"{r.prefill_time:.2f}", f"{r.elapsed_time:.2f}",
                         f"{total:.2f}", f"{van_total / total:.2f}"])
    for w in WINDOWS:
        rs = [r for r in recs if r["draft_window"] == w]
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        rows.append(["median", "", f"W={w}", f"{med('tau'):.2f}", f"{med('prefill_s'):.2f}", f"{med('decode_s'):.2f}",
                     f"{med('total_s'):.2f}", f"{med('speedup'):.2f}"])
    report(rows, ["question", "prompt tokens", "decoder", "tau", "prefill s", "decode s", "total s", "speedup vs vanilla"],
           recs, args.out)


if __name__ == "__main__":
    main()
