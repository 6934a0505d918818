#!/usr/bin/env python3
"""A/B of the reference's written-out attention: this checkout's ``ref/attention.py`` against a git revision's.

    python3 scripts/probes/ref_attention_ab.py --rev a12d267 --contexts 1024 7400 --rows 1 21 \
        --out runs/ref_attention_ab.jsonl
    # the fused kernel's wrapper against an older revision's, on a drafter's shapes and a prefill
    python3 scripts/probes/ref_attention_ab.py --rev 486d2c3 --function fused_masked_attention --contexts 768 --rows 3
    # written-out against fused in this checkout (the baseline is another function of the same revision)
    python3 scripts/probes/ref_attention_ab.py --rev HEAD --baseline-function masked_attention \
        --function fused_masked_attention --contexts 515 1024 --rows 3 8

``--function`` (default ``attention_with_lse``) of this checkout against ``--baseline-function`` (default: the same
name) of the revision, both versions (the old one loaded from ``git show REV:ref/attention.py``) on the
shapes one decode-phase pass of the embedded model's layer sees: Hq 4, Hkv 2, head dim 64, fp32, M query
rows (1: a step; 21: the ``auto`` tree (3, 2, 2)) at the end of a causal cache of S keys. The two are
interleaved, best of ``--repeats`` x 20 calls, CPU with ``--threads`` torch threads; also the largest
difference of their outputs. Prints a table, writes JSONL.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
import time

import torch

from specdec.benchutil import report
from specdec.ref import attention as new_attention

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_old(rev: str):
    """``ref/attention.py`` as of ``rev``, imported as a standalone module."""
    src = subprocess.run(["git", "show", f"{rev}:ref/attention.py"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "old_attention.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("old_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        best = min(best, (time.perf_counter() - t0) / 20 * 1e3)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="the git revision whose ref/attention.py is the baseline")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 7400])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 21])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--function", default="attention_with_lse", help="the function of this checkout's ref/attention.py to time")
    ap.add_argument("--baseline-function", default=None, help="the revision's function to time against (default: --function)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base_name = args.baseline_function or args.function
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731  (attention_with_lse returns (out, lse))
    new_fn = lambda *a: first(getattr(new_attention, args.function)(*a))  # noqa: E731
    torch.set_num_threads(args.threads)
    old = load_old(args.rev)
    old_fn = lambda *a: first(getattr(old, base_name)(*a))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    rows, records = [], []
    for s in args.contexts:
        for m in args.rows:
            q = torch.randn(1, 4, m, 64, generator=g)
            k, v = torch.randn(1, 2, s, 64, generator=g), torch.randn(1, 2, s, 64, generator=g)
            mask = torch.arange(s)[None, :] <= torch.arange(s - m, s)[:, None]          # [M, S] causal at the end
            o_old, o_new = old_fn(q, k, v, mask), new_fn(q, k, v, mask)
            t_old = t_new = float("inf")
            for _ in range(2):   # interleaved
                t_old = min(t_old, best_ms(lambda: old_fn(q, k, v, mask), args.repeats))
                t_new = min(t_new, best_ms(lambda: new_fn(q, k, v, mask), args.repeats))
            diff = (o_old - o_new).abs().max().item()
            records.append(dict(rev=args.rev, baseline=base_name, function=args.function, keys=s, rows=m, old_ms=t_old, new_ms=t_new, max_abs_diff=diff, threads=args.threads))
            rows.append([s, m, f"{t_old:.3f}", f"{t_new:.3f}", f"{t_old / t_new:.2f}x", f"{diff:.1e}"])
    report(rows, ["keys", "query rows", f"{args.rev} {base_name} ms", f"this checkout {args.function} ms", "speedup", "max |out diff|"], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
