#!/usr/bin/env python3
"""A/B (session 24, GPU): the fast GLIDE drafter's prompt catch-up -- the previous form (every prompt position
through the whole draft layer in window-sized chunks, cross-attention over the target's cache included) against
the library's (draft K/V of the last ``window`` positions only, ``glide_kv_write``) -- at long contexts on a big
model shape with random bf16 weights, beside the target's own chunked prefill (the rest of the time to first token).

Per context: one target prefill (timed), then each catch-up form on a fresh drafter (median of ``--reps``), and
the two caches' last ``window`` rows compared (the previous form computes them through GEMMs of other row
counts, so equal up to bf16 rounding). Prints a table, writes JSONL.

    python3 scripts/probes/glide_prompt_catch_up.py --shape llama3-8b --contexts 32768 131072 --out $OUT/catch_up.jsonl
    python3 scripts/probes/glide_prompt_catch_up.py --shape tiny --device cpu --contexts 40 --reps 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from tabulate import tabulate

from specdec.benchutil import random_model
from specdec.fast.glide import FastGlideDrafter, as_fast_glide
from specdec.fast.glide.layer import glide_layer
from specdec.fast.glide.packing import catch_up_glide_bounds, catch_up_segments, pack_ints, unpack_ints
from specdec.fast.model import alloc_cache, as_fast_model, prefill
from specdec.shared.glide import init_glide_weights


def previous_catch_up_prefix(self, tokens, stop_at, target_k, target_v):
    """The prompt catch-up before session 24: positions [processed, stop_at) through the whole layer, chunked."""
    dev, window, cache = self.glide.device, self.glide.window, self.cache
    for start in range(self.processed, stop_at, window):
        stop = min(start + window, stop_at)
        cache.make_room(stop - start)
        flat, layout = pack_ints(catch_up_segments(tokens[start:stop], start, cache.base, window))
        u = unpack_ints(torch.tensor(flat, dtype=torch.int32).to(dev), layout)
        glide_layer(self.target, self.glide, cache, u["tokens"][None], u["pos"], u["rows"][None], target_k, target_v,
                    catch_up_glide_bounds(u, cross_span=stop))
        cache.n = stop - cache.base
    self.processed = max(self.processed, stop_at)


# a smoke-test shape (CPU, Triton interpreter): window 8 is set below for it
TINY = dict(model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2,
            num_kv_heads=1, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "runs"), "glide_prompt_catch_up.jsonl"))
    args = ap.parse_args()
    tiny = args.shape == "tiny"
    dtype = torch.float32 if tiny else torch.bfloat16
    fm = as_fast_model(random_model(TINY if tiny else args.shape, dtype=dtype, device=args.device))
    glide = as_fast_glide(init_glide_weights(fm.config, seed=1, dtype=fm.dtype, device=fm.device, **({"window": 8} if tiny else {})))
    rows = []
    with open(args.out, "w") as f:
        for n in args.contexts:
            tokens = torch.randint(0, fm.config.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(n)).tolist()
            cache = alloc_cache(fm, 1, n + 256)
            t_prefill = timed(lambda: prefill(fm, cache, torch.tensor([tokens[:n]], device=fm.device)), args.device)
            tk, tv = cache.k[-1], cache.v[-1]
            k = 6   # the first round of a (4, 16, 16, 16, 16) tree catches up on the last levels + 1 positions itself
            result = {}
            runs = (("previous", lambda d: previous_catch_up_prefix(d, tokens, n + 1 - k, tk, tv)),
                    ("library", lambda d: d._catch_up_prefix(tokens, n + 1 - k)))
            for name, run in runs:
                times = []
                for _ in range(args.reps):
                    d = FastGlideDrafter(fm, glide, (4, 16, 16, 16, 16))
                    times.append(timed(lambda: run(d), args.device))
                w = d.glide.window
                lo = n + 1 - k - w - d.cache.base
                # (drafters of one GLIDE share its runtime's sliding cache: copy the rows out)
                result[name] = (statistics.median(times), d.cache.k[:, :, lo:lo + w].float().clone(), d.cache.v[:, :, lo:lo + w].float().clone())
            diff = max((result["previous"][1] - result["library"][1]).abs().max().item(),
                       (result["previous"][2] - result["library"][2]).abs().max().item())
            rec = dict(shape=args.shape, context=n, prefill_s=t_prefill, previous_s=result["previous"][0],
                       library_s=result["library"][0], window_kv_max_abs_diff=diff,
                       device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu")
            f.write(json.dumps(rec) + "\n")
            rows.append([n, f"{t_prefill:.3f}", f"{rec['previous_s'] * 1e3:.1f}", f"{rec['library_s'] * 1e3:.2f}", f"{diff:.2e}"])
            del cache
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    print(tabulate(rows, headers=["context", "target prefill s", "previous catch-up ms", "library catch-up ms",
                                  "window K/V max |diff|"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
