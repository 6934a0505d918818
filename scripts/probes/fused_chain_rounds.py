#!/usr/bin/env python3
"""The chain drafters with and without their fused greedy rounds (issue 20 item 4).

    python3 scripts/probes/fused_chain_rounds.py --questions 10 --max-new-tokens 128 --out $OUT/fused_chain.jsonl

The embedded target and its draft LM on the fast path (bf16 on CUDA, fp32 on CPU), greedy, the first
``--questions`` prompts of the shipped ``stdlib_code`` set. Per prompt, interleaved after one warm-up of each:
fast vanilla; ``speculative_generate`` (draft LM, ``--gamma``) and ``magicdec_generate`` (the library's
defaults) each with the unfused rounds (``propose`` + the engine's verification) and with the drafter's
``fuse_rounds`` on (one graph per round); by default every mode first runs every prompt once untimed, so the timed
pass replays graphs instead of capturing them (``--no-warm-all``: the first prompt only, as before). Checks that every output equals vanilla's and that the fused
rounds drafted exactly what the unfused ones did (same accept lengths), then prints decode tokens/s
(median over prompts) and the speedup over vanilla; one JSONL record per (prompt, mode).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from tabulate import tabulate

import specdec.fast as fast
from specdec.fast.magicdec import FastMagicDecDrafter
from specdec.fast.speculative import FastDraftModelDrafter
from specdec.bench import load_questions
from specdec.shared.tokenizer import encode_prompt, load_tokenizer



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--warm-all", action=argparse.BooleanOptionalAction, default=True,
                    help="warm up on every prompt (default; the steady state of a server) or on the first only")
    a = ap.parse_args(argv)
    if a.questions < 1 or a.max_new_tokens < 1 or a.gamma < 1:
        raise SystemExit("--questions, --max-new-tokens and --gamma must be >= 1")
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    tok = load_tokenizer("default")
    target = fast.load_model("default", dtype=dtype, device=a.device)
    draft = fast.load_model("default-draft", dtype=dtype, device=a.device)
    texts = [q["turns"][0] for q in load_questions("stdlib_code", end=a.questions)]
    prompts = [torch.tensor([encode_prompt(tok, t)], device=a.device) for t in texts]

    def run(mode: str, ids: torch.Tensor):
        kw = dict(input_ids=ids, prompt_length=ids.shape[1], max_gen_len=a.max_new_tokens, eos_id=[])
        if mode == "vanilla":
            return fast.vanilla_generate(target, **kw)
        method, how = mode.split("-")
        cls = FastDraftModelDrafter if method == "speculative" else FastMagicDecDrafter
        default = cls.fuse_rounds
        cls.fuse_rounds = how == "fused"
        try:
            if method == "speculative":
                return fast.speculative_generate(target, draft, gamma=a.gamma, **kw)
            return fast.magicdec_generate(target, **kw)
        finally:
            cls.fuse_rounds = default

    modes = ["vanilla", "speculative-unfused", "speculative-fused", "magicdec-unfused", "magicdec-fused"]
    # warm-up, untimed: kernels, caches at their largest size, and every graph the timed pass will replay (the
    # fused rounds capture one per catch-up length / view size, so one prompt does not capture them all)
    for mode in modes:
        for ids in (prompts if a.warm_all else prompts[:1]):
            run(mode, ids)
    records = []
    for q, ids in enumerate(prompts):
        res = {mode: run(mode, ids) for mode in modes}
        van = res["vanilla"].output_ids
        for mode in modes[1:]:
            if not torch.equal(res[mode].output_ids, van):
                raise SystemExit(f"question {q}: {mode} output differs from vanilla")
        for method in ("speculative", "magicdec"):
            if res[f"{method}-fused"].accept_lengths != res[f"{method}-unfused"].accept_lengths:
                raise SystemExit(f"question {q}: {method}'s fused rounds drafted differently from the unfused ones")
        for mode in modes:
            r = res[mode]
            n = r.output_ids.shape[1]
            records.append({"question": q, "mode": mode, "new_tokens": n, "tokens_per_s": n / r.elapsed_time,
                            "tau": n / r.num, "device": a.device, "dtype": str(dtype)})
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    rows = []
    for mode in modes:
        mine = [r for r in records if r["mode"] == mode]
        speed = [r["tokens_per_s"] / v["tokens_per_s"] for r, v in
                 zip(mine, [r for r in records if r["mode"] == "vanilla"])]
        rows.append([mode, statistics.median(r["tokens_per_s"] for r in mine), statistics.median(speed),
                     statistics.median(r["tau"] for r in mine)])
    print(f"{a.device} {dtype}, {len(prompts)} prompts x {a.max_new_tokens} tokens, gamma {a.gamma}; outputs == vanilla, "
          "fused drafts == unfused drafts")
    print(tabulate(rows, headers=["mode", "tok/s (median)", "speedup (median)", "tau (median)"], floatfmt=".2f"))


if __name__ == "__main__":
    main()
