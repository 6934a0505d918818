#!/usr/bin/env python3
"""A/B of the GLIDE drafter's attention on the CPU, through README command 1.

    python3 scripts/probes/drafter_attention_ab.py            # stdlib_code 0-9, 2 repetitions, order reversed in the 2nd

Three variants of :func:`specdec.ref.attention.fused_masked_attention`, swapped in for :mod:`specdec.ref.glide` only:

* ``masked`` -- the function before session 23: an all-True mask still goes to SDPA as a boolean mask;
* ``library`` -- the function as it is now: an all-True mask becomes no mask (landed in session 23);
* ``lean`` -- additionally, the K/V rows no query sees are not zeroed (drops the function's guard against
  non-finite unseen K/V; measured, not landed).

Each prompt runs the CLI (``specdec generate --method tree_spec --compare``) once per variant, in-process; the
medians of the CLI's own speedups are printed. BENCHMARKS "Session 23: README command 1 on another 2-core CPU".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys

import torch.nn.functional as F

import specdec.ref.glide as ref_glide
from specdec.bench import load_questions
from specdec.cli import main as cli_main

BASE = ref_glide.fused_masked_attention


def masked(q, k, v, mask, sm_scale=None):
    """The pre-session-23 path for a non-causal mask, also when it hides nothing."""
    gqa = q.shape[1] != k.shape[1]
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    empty = ~mask.any(dim=-1)
    safe = mask.clone()
    safe[..., 0] |= empty
    unseen = ~mask.any(dim=-2)[:, None, :, None]
    if unseen.any():
        k, v = k.masked_fill(unseen, 0), v.masked_fill(unseen, 0)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=safe[:, None], scale=sm_scale,
                                         enable_gqa=gqa)
    return out.masked_fill(empty[:, None, :, None], 0).to(q.dtype)


def lean(q, k, v, mask, sm_scale=None):
    """The candidate: SDPA without a mask when every key is visible; otherwise the boolean mask as is."""
    gqa = q.shape[1] != k.shape[1]
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if bool(mask.all()):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=sm_scale, enable_gqa=gqa).to(q.dtype)
    if bool((~mask.any(dim=-1)).any()):      # a row that sees nothing: the library's handling
        return BASE(q, k, v, mask, sm_scale)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None], scale=sm_scale,
                                          enable_gqa=gqa).to(q.dtype)


def cli_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        if cli_main(argv) != 0:
            raise SystemExit(f"specdec {' '.join(argv[:4])} failed")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--begin", type=int, default=0)
    ap.add_argument("--end", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    variants = {"masked": masked, "library": BASE, "lean": lean}
    results: dict[str, list[tuple[float, float, bool]]] = {name: [] for name in variants}
    for rep in range(args.reps):
        for q in load_questions("stdlib_code", args.begin, args.end):
            for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                ref_glide.fused_masked_attention = variants[name]
                obj = cli_json(["generate", "--method", "tree_spec", "--compare", "--json", "--max-new-tokens", "128",
                                q["turns"][0]])
                results[name].append((obj["speedup"], obj["tau"], obj["same_output_as_vanilla"]))
    ref_glide.fused_masked_attention = BASE
    for name, rs in results.items():
        print(f"{name}: median speedup {statistics.median(r[0] for r in rs):.3f}x, median tau "
              f"{statistics.median(r[1] for r in rs):.2f}, == vanilla {sum(r[2] for r in rs)} / {len(rs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
