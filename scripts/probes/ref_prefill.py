#!/usr/bin/env python3
"""The reference prefill's attention: written out (``masked_attention``) against fused (``fused_masked_attention``).

    python3 scripts/probes/ref_prefill.py --target runs/retrain/ship/target --lengths 1024 2048 4096 7366 \
        --out runs/ref_prefill.jsonl

For each prompt length (the first tokens of ``stdlib_long`` question 7, a held-out ~7.4k-token prompt),
one prefill of an empty cache through :func:`specdec.ref.model.forward_step` with each attention, the two
interleaved, best of ``--repeats`` (CPU, ``--threads`` torch threads). Also the largest difference of the
two prefills' last-row logits and whether their greedy tokens agree. Prints a table, writes JSONL.
"""

from __future__ import annotations

import argparse
import time

import torch

from specdec import ref
from specdec.bench import load_questions
from specdec.benchutil import report
from specdec.ref.model import forward_step, new_cache
from specdec.shared.tokenizer import encode_prompt, load_tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = ref.load_model(args.target)
    tok = load_tokenizer("default")
    ids = encode_prompt(tok, load_questions("stdlib_long", 7, 8)[0]["turns"][0])
    rows, records = [], []
    for n in args.lengths:
        if n > len(ids) or n > model.config.max_position_embeddings:
            raise SystemExit(f"--lengths: {n} is over the prompt ({len(ids)} tokens) or the model's positions")
        x = torch.tensor([ids[:n]])
        best = {False: float("inf"), True: float("inf")}
        logits = {}
        for _ in range(args.repeats):
            for fused in (False, True):
                t0 = time.perf_counter()
                with torch.no_grad():
                    logits[fused] = forward_step(model, x, new_cache(model, 1), fused_attention=fused)[0, -1]
                best[fused] = min(best[fused], time.perf_counter() - t0)
        diff = (logits[True] - logits[False]).abs().max().item()
        same = int(logits[True].argmax()) == int(logits[False].argmax())
        records.append(dict(target=args.target, tokens=n, written_out_s=best[False], fused_s=best[True],
                            max_logit_diff=diff, same_greedy_token=same, threads=args.threads))
        rows.append([n, f"{best[False]:.2f}", f"{best[True]:.2f}", f"{best[False] / best[True]:.1f}x", f"{diff:.1e}", same])
    report(rows, ["prompt tokens", "written-out s", "fused s", "speedup", "max |logit diff|", "same greedy token"],
           records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
