#!/usr/bin/env python3
"""Probe (session 36): which decode-phase kernels make a verification of M nodes cost more than a one-token step?

Issue 20's GLIDE-tree goal on the embedded model: the round is kernel-bound, and the target's verification grows
from 0.495 ms (2 nodes) to 0.841 ms (64 nodes) per round on an H100 (BENCHMARKS "Session 36: the GLIDE tree's
frontier"). This probe isolates that growth. It loads a target (the embedded default model unless ``--target``),
prefills a random ``--prefix``-token prompt, and for each M runs ``fast.model.run_step`` (the decode/verify step
every decoder uses, as its CUDA graph) on a chain of M new tokens. Per M it reports:

* the step's GPU time (CUDA events around graph replays, median);
* under ``torch.profiler``, the kernel time per step grouped by kernel name (the decode-phase attention, its
  merge, the row GEMMs, the norms, RoPE, the rest), and the kernels launched per step.

The steps of different M do not advance the cache (``run_step`` never does), so every M sees the same prefix.

    python3 scripts/probes/verify_growth.py --out $OUT/verify_growth.jsonl
    python3 scripts/probes/verify_growth.py --ms 1 2 5 --reps 2 --prefix 64     # CPU smoke run (interpreter)

On a CPU the kernels run in the Triton interpreter: the times mean nothing, the script only checks its own path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from tabulate import tabulate

import specdec.fast as F_
from specdec.benchutil import cuda_time_ms
from specdec.fast.model import prefill, run_step
from specdec.shared.tree import Tree

GROUPS = (("attention", "_decode_attention"), ("merge", "_merge"), ("row GEMM", "_row_linear"),
          ("norm", "_row_rstd"), ("rope", "_rope"), ("argmax/accept", "argmax"))
"""Kernel-name groups (first match wins; everything else is "other")."""


def group_of(name: str) -> str:
    return next((g for g, key in GROUPS if key in name), "other")


def chain(m: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, positions and the ancestor-or-self mask of an M-node chain after ``length`` cached rows."""
    g = torch.Generator().manual_seed(m)
    tokens = torch.randint(3, 4000, (1, m), generator=g).to(device)
    positions = (length + torch.arange(m))[None].to(device)
    mask = Tree.chain(m - 1).ancestor_mask(device)[None]
    return tokens, positions, mask


def step_ms(fn, reps: int, cuda: bool) -> float:
    """Median time of ``fn()`` in ms (CUDA events on a GPU, wall time on a CPU)."""
    if cuda:
        return cuda_time_ms(fn, reps=reps, warmup=0)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--prefix", type=int, default=600, help="cached prompt tokens (the frontier's prompts: 162-768)")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 5, 9, 17, 29, 32, 33, 64, 65, 69])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.prefix < 1 or min(args.ms) < 1:
        raise SystemExit("--prefix and every --ms must be >= 1")

    fm = F_.load_model(args.target)
    cuda = fm.device.type == "cuda"
    cache = fm.ensure_cache(1, args.prefix + max(args.ms) + 1)
    prompt = torch.randint(3, 4000, (1, args.prefix), generator=torch.Generator().manual_seed(0)).to(fm.device)
    prefill(fm, cache, prompt)
    lines, rows = [], []
    for m in args.ms:
        tokens, positions, mask = chain(m, cache.length, fm.device)

        def fn(tokens=tokens, positions=positions, mask=mask):
            return run_step(fm, cache, tokens, positions, mask)

        fn(), fn()   # capture / compile
        ms = step_ms(fn, args.reps, cuda)
        per_group: dict[str, float] = defaultdict(float)
        kernels = 0
        if cuda:
            from torch.profiler import ProfilerActivity, profile
            n = 10
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    fn()
                torch.cuda.synchronize()
            evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            kernels = len(evs) / n
            for e in evs:
                per_group[group_of(e.name)] += e.device_time / n   # us per step
        line = dict(kind="verify_growth", device=torch.cuda.get_device_name() if cuda else "cpu", m=m,
                    prefix=args.prefix, step_ms=ms, kernels_per_step=kernels, us_per_step=dict(per_group))
        lines.append(line)
        print(line, flush=True)
        rows.append([m, f"{ms:.3f}", f"{kernels:.0f}"] + [f"{per_group.get(g, 0.0):.1f}" for g, _ in GROUPS]
                    + [f"{per_group.get('other', 0.0):.1f}"])
    print(f"\n{fm.config.num_layers} layers, prefix {args.prefix}, {'CUDA graph replays' if cuda else 'CPU (interpreter)'}")
    print(tabulate(rows, headers=["M", "step ms", "kernels"] + [f"{g} us" for g, _ in GROUPS] + ["other us"],
                   tablefmt="github"))
    if args.out:
        with open(args.out, "w") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
