#!/usr/bin/env python3
"""How much a target's greedy completions repeat themselves (issue 21's distinct 4-gram goal).

    python3 scripts/probes/greedy_repetition.py --models shipped=default new=runs/retrain/ship/target \
        --begin 0 --end 79 --max-new-tokens 96 --out runs/greedy_repetition.jsonl

For each model (``NAME=DIR``; ``default`` is the embedded target) and each ``stdlib_code`` prompt in
``[begin, end)`` (prompts cut from the held-out stdlib files), the reference vanilla decoder's greedy
completion of ``--max-new-tokens`` tokens (fp32, CPU unless ``--device``), and the share of distinct
4-grams among its token 4-grams (:func:`specdec.benchutil.distinct_ngram_share`). Vanilla alone: every
speculative decoder returns these same tokens. Prints the median, the mean and how many completions reach
the issue's 0.6 per model; writes one JSONL record per (model, prompt).

``--reference`` adds a row for the held-out file itself: the same number of tokens that follow the prompt
in its source file (fewer where the file ends first; this interpreter's stdlib, which must be the prompts'
Python version) -- what real code scores on the same measure.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sysconfig

import torch
from tqdm import tqdm

from specdec import ref
from specdec.bench import load_questions
from specdec.benchutil import distinct_ngram_share, report
from specdec.shared.tokenizer import encode_prompt, load_tokenizer

GOAL = 0.6   # issue 21: median distinct 4-gram share of short held-out prompts' greedy completions


def summary_row(name: str, where: str, shares: list[float]) -> list:
    """One table row: the median and mean distinct-4-gram share and how many reach the goal."""
    return [name, where, len(shares), f"{statistics.median(shares):.3f}", f"{statistics.mean(shares):.3f}",
            f"{sum(s >= GOAL for s in shares)} / {len(shares)}"]


def reference_continuation(tok, question: dict, n: int) -> list[int]:
    """The ``n`` tokens that follow a ``stdlib_code`` prompt in its source file (this interpreter's stdlib),
    or all of them where the file ends sooner."""
    if question.get("python") != platform.python_version():
        raise SystemExit(f"--reference: the prompts were cut from Python {question.get('python')}'s stdlib, "
                         f"this is {platform.python_version()}")
    path = os.path.join(sysconfig.get_paths()["stdlib"], question["source"]["file"])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find(question["turns"][0])
    if start < 0:
        raise SystemExit(f"--reference: q{question['question_id']}'s prompt is not in {path}")
    rest = text[start + len(question["turns"][0]):][: 64 * n]     # far more characters than n tokens take
    return tok(rest, add_special_tokens=False)["input_ids"][:n]    # fewer where the file ends first


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["shipped=default"], metavar="NAME=DIR")
    ap.add_argument("--begin", type=int, default=0)
    ap.add_argument("--end", type=int, default=79)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reference", action="store_true", help="also score the held-out files' own continuations")
    args = ap.parse_args()
    models = []
    for m in args.models:
        name, sep, path = m.partition("=")
        if not sep or not name or not path:
            ap.error(f"--models entries are NAME=DIR, got {m!r}")
        models.append((name, path))
    tok = load_tokenizer("default")
    questions = load_questions("stdlib_code", args.begin, args.end)
    records, rows = [], []
    for name, path in models:
        target = ref.load_model(path, device=args.device)
        shares = []
        for q in tqdm(questions, desc=name, unit="prompt"):
            ids = torch.tensor([encode_prompt(tok, q["turns"][0])], device=args.device)
            out = ref.vanilla_generate(target, ids, ids.shape[1], max_gen_len=args.max_new_tokens, eos_id=[])
            gen = out.output_ids[0].tolist()     # the new tokens only (no EOS stops it: eos_id=[])
            if len(gen) != args.max_new_tokens:
                raise SystemExit(f"{name}: q{q['question_id']} returned {len(gen)} tokens, expected {args.max_new_tokens}")
            share = distinct_ngram_share(gen, 4)
            shares.append(share)
            records.append(dict(model=name, path=path, question_id=q["question_id"], category=q["category"],
                                prompt_tokens=ids.shape[1], new_tokens=len(gen), distinct_4grams=share))
        rows.append(summary_row(name, path, shares))
    if args.reference:
        conts = [reference_continuation(tok, q, args.max_new_tokens) for q in questions]
        shares = [distinct_ngram_share(c, 4) for c in conts]
        records += [dict(model="reference", path=q["source"]["file"], question_id=q["question_id"], category=q["category"],
                         new_tokens=len(c), distinct_4grams=sh) for q, c, sh in zip(questions, conts, shares)]
        rows.append(summary_row("reference", "the held-out files' own text", shares))
    report(rows, ["model", "dir", "prompts", "median distinct 4-grams", "mean", f">= {GOAL}"], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
