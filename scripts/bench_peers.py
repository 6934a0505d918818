#!/usr/bin/env python3
"""Every decoder vs vanilla and vs the ``transformers`` peers on the embedded default model, short
and long prompts, in one go (what BENCHMARKS.md's embedded-model tables come from)::

    PYTHONUNBUFFERED=1 python scripts/bench_peers.py --out bench_runs
    # -> bench_runs/{short,long}/<method>.jsonl, bench_runs/{short,long}.md (specdec report --markdown)

Short = the shipped held-out stdlib code set (``--short-questions`` of them); long = the shipped
long-context set (4k/16k/32k-token prompts, ``--max-context`` raised past the model's 2048 trained
positions, LongSpec's too-short filter at ``--min-long-tokens``). Each ``specdec bench`` runs under
its own time limit; the answer files are written question by question, so a run cut short still
gives a report of what finished.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from specdec.methods import METHODS as _METHODS

METHODS = ",".join(_METHODS)  # every decoder, by its one name (specdec.methods)


def run(cmd: list[str], timeout: float | None = None) -> int:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    try:
        rc = subprocess.run(cmd, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
        print(f"[bench_peers] timed out after {timeout:.0f}s (partial answer files kept)", flush=True)
    print(f"[bench_peers] rc={rc} in {time.time() - t0:.1f}s", flush=True)
    return rc


def report(out_dir: str, md_path: str) -> None:
    files = [os.path.join(out_dir, f) for f in sorted(os.listdir(out_dir)) if f.endswith(".jsonl") and f != "vanilla.jsonl"]
    order = [m for m in METHODS.split(",") + ["hf_generate", "hf_assisted", "hf_pld"]]
    files.sort(key=lambda p: order.index(os.path.basename(p)[:-6]) if os.path.basename(p)[:-6] in order else 99)
    base = os.path.join(out_dir, "vanilla.jsonl")
    if not os.path.isfile(base) or not files:
        print(f"[bench_peers] nothing to report in {out_dir}", flush=True)
        return
    good = []
    for p in files:  # skip empty files (a method cut before its first question)
        if os.path.getsize(p) > 0:
            good.append(p)
    cmd = [sys.executable, "-m", "specdec.report", "--base", base, *good, "--markdown"]
    with open(md_path, "w") as f:
        subprocess.run(cmd, stdout=f)
    subprocess.run(cmd[:-1] + ["--no-per-category"])
    subprocess.run(cmd[:-1] + ["--json"], stdout=open(md_path[:-3] + ".json", "w"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_runs")
    ap.add_argument("--short-questions", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-context", type=int, default=33024)
    ap.add_argument("--min-long-tokens", type=int, default=3000)
    ap.add_argument("--short-timeout", type=float, default=210)
    ap.add_argument("--long-timeout", type=float, default=210)
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--peers", default="all", help="transformers peers on the short set")
    ap.add_argument("--long-peers", default="all", help="transformers peers on the long set")
    ap.add_argument("--hf-assistant-tokens", type=int, default=None,
                    help="hf_assisted: fixed draft length (default: transformers' own schedule)")
    ap.add_argument("--tar", action="store_true", help="pack the answer files into <out>/answers.tar.gz")
    a = ap.parse_args()
    bench = [sys.executable, "-m", "specdec.bench", "--methods", METHODS, "--backend", a.backend,
             "--max-new-tokens", str(a.max_new_tokens), "--no-progress"]
    if a.hf_assistant_tokens:
        bench += ["--hf-assistant-tokens", str(a.hf_assistant_tokens)]
    short = os.path.join(a.out, "short")
    run(bench + ["--peers", a.peers, "--bench", "stdlib_code", "--question-end", str(a.short_questions), "--out-dir", short],
        a.short_timeout)
    report(short, os.path.join(a.out, "short.md"))
    if not a.skip_long:
        long = os.path.join(a.out, "long")
        run(bench + ["--peers", a.long_peers, "--bench", "stdlib_long", "--max-context", str(a.max_context),
                     "--min-prompt-tokens", str(a.min_long_tokens), "--out-dir", long], a.long_timeout)
        report(long, os.path.join(a.out, "long.md"))
    if a.tar:
        import tarfile

        with tarfile.open(os.path.join(a.out, "answers.tar.gz"), "w:gz") as t:
            for d in ("short", "long"):
                if os.path.isdir(os.path.join(a.out, d)):
                    t.add(os.path.join(a.out, d), arcname=d)
                    import shutil

                    shutil.rmtree(os.path.join(a.out, d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
