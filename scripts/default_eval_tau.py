#!/usr/bin/env python3
"""Mean accepted length (tau) and speed of every decoder on the embedded default model, greedy, on the
held-out standard-library files (``scripts/default_corpus.py``: the same rule the training split used).

For each held-out file: prompt = its first ``--prompt-tokens`` (1024) tokens (``<s>`` included; at most half
the file), then ``--max-new-tokens`` greedy tokens with each method. Writes one JSONL record per
(file, method) and prints a table: tau = total tokens / total target passes, decode tokens/s (median
over files), speedup = median over files of (method tok/s / vanilla tok/s on the same file), and
whether every output equals vanilla's (greedy decoding is lossless).

    # CPU, reference path (one thread: steadier timings on a shared machine)
    python scripts/default_eval_tau.py --backend ref --device cpu --out runs/default_tau_ref_cpu.jsonl
    # GPU, fast path; prompts dumped on the CPU machine so both runs use the same token ids
    python scripts/default_eval_tau.py --dump-prompts runs/default_data/tau_prompts.json
    python scripts/default_eval_tau.py --backend fast --device cuda --prompts runs/default_data/tau_prompts.json --warmup 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default_corpus  # noqa: E402

from specdec.methods import METHODS, canonical_method  # noqa: E402

ALL_METHODS = list(METHODS)


def make_prompts(prompt_tokens: int, max_files: int | None) -> list[dict]:
    from specdec.shared.tokenizer import load_tokenizer

    tok = load_tokenizer("default")
    root = default_corpus.stdlib_root()
    _, held = default_corpus.split_corpus(root)
    out = []
    for rel in held[: max_files or None]:
        ids = tok(default_corpus.read_text(os.path.join(root, rel)))["input_ids"]
        n = min(prompt_tokens, len(ids) // 2)
        if n >= 8:
            out.append({"file": rel, "ids": ids[:n]})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="ref", choices=["ref", "fast"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--prompts", default=None, help="JSON from --dump-prompts (default: tokenize the held-out files here)")
    p.add_argument("--dump-prompts", default=None, help="write the prompts as JSON and exit")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs of each method on the first prompt")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None)
    p.add_argument("--summarize", nargs="+", default=None, metavar="JSONL", help="print the table of existing JSONL results and exit")
    a = p.parse_args(argv)
    if a.summarize:
        for path in a.summarize:
            with open(path) as f:
                print(path + ": " + summarize([json.loads(line) for line in f if line.strip()]))
        return
    torch.set_num_threads(a.threads)

    if a.dump_prompts:
        prompts = make_prompts(a.prompt_tokens, a.max_files)
        os.makedirs(os.path.dirname(a.dump_prompts) or ".", exist_ok=True)
        with open(a.dump_prompts, "w") as f:
            json.dump({"python": sys.version.split()[0], "prompts": prompts}, f)
        print(f"{len(prompts)} prompts -> {a.dump_prompts}")
        return
    if a.prompts:
        with open(a.prompts) as f:
            prompts = json.load(f)["prompts"][: a.max_files or None]
    else:
        prompts = make_prompts(a.prompt_tokens, a.max_files)

    from specdec.shared.assets import resolve_model_path

    mod = importlib.import_module(f"specdec.{a.backend}")
    dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    target = mod.load_model("default", dtype=dtype, device=a.device)
    extra = {}
    methods = [canonical_method(m) for m in a.methods.split(",") if m.strip()]
    for m in methods:
        fn_name, needs = METHODS[m].function, METHODS[m].needs
        if not hasattr(mod, fn_name):
            print(f"skipping {m}: specdec.{a.backend} has no {fn_name}")
            continue
        if needs == "draft" and "draft" not in extra:
            extra["draft"] = mod.load_model("default-draft", dtype=dtype, device=a.device)
        if needs == "glide" and "glide" not in extra:
            extra["glide"] = mod.load_glide(resolve_model_path("default-glide"), target)
    methods = [m for m in methods if hasattr(mod, METHODS[m].function)]
    if "vanilla" not in methods:
        methods.insert(0, "vanilla")

    def run(m, ids):
        fn_name, needs = METHODS[m].function, METHODS[m].needs
        args = [target] + ([extra[needs]] if needs else [])
        x = torch.tensor([ids], dtype=torch.long, device=a.device)
        return getattr(mod, fn_name)(*args, x, x.shape[1], max_gen_len=a.max_new_tokens, eos_id=[])  # never stop early

    for m in methods:
        for _ in range(a.warmup):
            run(m, prompts[0]["ids"])
    out = open(a.out, "w") if a.out else None
    recs = []
    t_all = time.time()
    for i, pr in enumerate(prompts):
        base = None
        for m in methods:
            res = run(m, pr["ids"])
            ids = res.output_ids[0].tolist()
            if m == "vanilla":
                base = ids
            rec = {"file": pr["file"], "method": m, "backend": a.backend, "device": a.device, "dtype": dtype,
                   "prompt_tokens": len(pr["ids"]), "tokens": len(ids), "passes": int(res.num), "accepted": int(res.count),
                   "tau": res.tau, "decode_s": res.elapsed_time, "prefill_s": res.prefill_time,
                   "tokens_per_s": res.tokens_per_second, "same_as_vanilla": ids == base,
                   "agree_prefix": _common_prefix(ids, base)}
            recs.append(rec)
            if out:
                out.write(json.dumps(rec) + "\n")
                out.flush()
        print(f"[{i + 1}/{len(prompts)}] {pr['file']}: " + " ".join(f"{r['method']}={r['tau']:.2f}" for r in recs[-len(methods):]), flush=True)
    if out:
        out.close()

    print(f"\n{len(prompts)} held-out files, prompt <= {a.prompt_tokens} tokens, {a.max_new_tokens} new tokens, greedy, "
          f"specdec.{a.backend} on {a.device} ({dtype}), {time.time() - t_all:.0f}s")
    print(summarize(recs))


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens of ``a`` and ``b`` agree (the generated part of both: up to the first divergence)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarize(recs: list[dict]) -> str:
    """The table: tau = total tokens / total passes; tok/s median over files; speedup = median over files
    of (method tok/s / vanilla tok/s on the same file). Only files where every method ran are counted."""
    from tabulate import tabulate

    methods = list(dict.fromkeys(r["method"] for r in recs))
    per_file: dict[str, dict] = {}
    for r in recs:
        per_file.setdefault(r["file"], {})[r["method"]] = r
    files = [f for f, d in per_file.items() if all(m in d for m in methods)]
    rows = []
    for m in methods:
        rs = [per_file[f][m] for f in files]
        van = [per_file[f]["vanilla"] for f in files]
        tau = sum(r["tokens"] for r in rs) / sum(r["passes"] for r in rs)
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        sp = statistics.median(r["tokens_per_s"] / v["tokens_per_s"] for r, v in zip(rs, van) if v["tokens_per_s"] > 0)
        same = sum(bool(r["same_as_vanilla"]) for r in rs)
        agree = sum(r.get("agree_prefix", 0) for r in rs) / max(1, sum(r["tokens"] for r in rs))
        rows.append([m, f"{tau:.2f}", f"{statistics.median(r['tau'] for r in rs):.2f}", f"{min(r['tau'] for r in rs):.2f}-{max(r['tau'] for r in rs):.2f}",
                     f"{tps:.1f}", f"{sp:.2f}x", f"{same}/{len(rs)}", f"{100 * agree:.0f}%"])
    head = f"{len(files)} files ({rs[0]['backend']}, {rs[0]['device']}, {rs[0]['dtype']})\n" if files else "no complete files\n"
    return head + tabulate(rows, headers=["method", "tau", "tau (median file)", "tau range", "tok/s (median)", "speedup (median)",
                                       "== vanilla (files)", "tokens before 1st divergence"])

if __name__ == "__main__":
    main()
