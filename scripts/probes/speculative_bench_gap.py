#!/usr/bin/env python3
"""Why `specdec bench` times the draft-model chain slower than `fused_chain_rounds.py` does (open question).

    python3 scripts/probes/speculative_bench_gap.py --questions 10 --max-new-tokens 128

On an H100 (session 17) the bench measured `speculative` at 1005-1303 decode tok/s while the probe, on the same
prompts, measured 2512 (fused rounds) / 2050 (stepwise), with vanilla at ~2000-2100 in both. This times the same
call four ways, prompt by prompt after a warm-up over every prompt: direct with ``eos_id=[]`` (as the probe),
direct with the tokenizer's EOS (as the bench), through the bench's :class:`specdec.bench.SpecdecRunner`
on the bench's conversation prompt, and fast vanilla through the runner; prints median decode tok/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate

import specdec.fast as fast
from specdec import bench
from specdec.shared.tokenizer import encode_prompt, load_tokenizer



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    tok = load_tokenizer("default")
    target = fast.load_model("default", dtype=dtype, device=a.device)
    draft = fast.load_model("default-draft", dtype=dtype, device=a.device)
    qs = bench.load_questions("stdlib_code", end=a.questions)
    eos = list(target.config.eos_token_ids)
    runners = {m: bench.SpecdecRunner(m, fast, target, draft if m == "speculative" else None, {"gamma": 5} if m == "speculative" else {},
                                      {"temperature": 0.0, "top_k": 0, "top_p": 1.0}, eos, a.device) for m in ("speculative", "vanilla")}

    def direct(ids: list[int], eos_id: list[int]) -> float:
        t = torch.tensor([ids], device=a.device)
        r = fast.speculative_generate(target, draft, t, len(ids), gamma=5, max_gen_len=a.max_new_tokens, eos_id=eos_id)
        return (r.output_ids.shape[1] - 1) / r.elapsed_time

    def via(m: str, ids: list[int]) -> float:
        r = runners[m].generate(ids, a.max_new_tokens, 0)
        return (len(r.output_ids) - 1) / (r.wall_time - r.prefill_time)

    modes = {"direct, eos_id=[]": lambda ids: direct(ids, []), "direct, eos_id=EOS": lambda ids: direct(ids, eos),
             "bench runner": lambda ids: via("speculative", ids), "vanilla, bench runner": lambda ids: via("vanilla", ids)}
    prompts = [encode_prompt(tok, bench.conversation_prompt(tok, q["turns"], [], None)) for q in qs]
    for f in modes.values():
        for ids in prompts:
            f(ids)
    res = {m: [] for m in modes}
    t0 = time.perf_counter()
    for ids in prompts:
        for m, f in modes.items():
            res[m].append(f(ids))
    print(f"{a.device} {dtype}, {len(prompts)} prompts x {a.max_new_tokens} tokens ({time.perf_counter() - t0:.1f}s)")
    print(tabulate([[m, statistics.median(v)] + [round(x) for x in v] for m, v in res.items()],
                   headers=["mode", "median decode tok/s"] + [f"q{i}" for i in range(len(prompts))], floatfmt=".0f"))


if __name__ == "__main__":
    main()
