#!/usr/bin/env python3
"""Benchmark the tree-attention kernel at the Llama-3-8B attention shape (one layer, B = 1).

Shape: Hq 32, Hkv 8, D 128, bf16; prefix 1k, 4k, 16k, 32k, 128k; tree sizes M in {1, 5, 69}.
For every point it reports

* the Triton kernel (``specdec.fast.kernels.tree_attention``, split + merge), timed as a CUDA-graph
  replay between CUDA events, L2 flushed before every repetition, median of ``--reps``;
* its effective bandwidth: K/V bytes read (2 * Hkv * (prefix + M) * D * 2 B) / time, and that as a
  fraction of the device copy bandwidth measured in the same run (``dst.copy_(src)`` of 1 GiB,
  read + write bytes / time);
* the PyTorch reference (``specdec.ref.attention.tree_attention``) and
  ``torch.nn.functional.scaled_dot_product_attention`` with the boolean mask (``enable_gqa``), timed
  the same way without graphs; ``oom`` where they run out of memory.

Writes one JSON line per point to ``--out`` (default runs/bench_kernels.jsonl) and prints a table.
``--tune`` first sweeps tile configs and split counts at a few points and prints the best.

    python3 scripts/bench_kernels.py --out runs/bench_kernels.jsonl [--tune]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

try:  # fast/__init__.py may pull in the whole fast path; the kernels only need their own package
    from specdec.fast import kernels as K
except Exception:  # noqa: BLE001
    import importlib.machinery
    import importlib.util
    import types

    import specdec

    _path = [os.path.join(os.path.dirname(os.path.dirname(specdec.__file__)), "fast")]
    _spec = importlib.machinery.ModuleSpec("specdec.fast", None, is_package=True)
    _spec.submodule_search_locations = _path
    _fast = types.ModuleType("specdec.fast")
    _fast.__spec__, _fast.__path__ = _spec, _path
    sys.modules["specdec.fast"] = _fast
    from specdec.fast import kernels as K

from specdec.ref.attention import tree_attention as ref_tree_attention
from specdec.shared.tree import Tree

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16


def flush_buffer() -> torch.Tensor:
    return torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")


def time_ms(fn, flush: torch.Tensor, reps: int, warmup: int = 2) -> float:
    """Median GPU time of ``fn()`` in ms; L2 flushed before each rep (its memset is not timed)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    """Capture ``fn`` (already warmed up / compiled) in a CUDA graph; return its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth(flush: torch.Tensor) -> float:
    """Device copy bandwidth in GB/s (read + write bytes), 1 GiB bf16 copy, median of 10."""
    src = torch.randn(512 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), flush, reps=10)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / (ms * 1e-3) / 1e9


def make_inputs(prefix: int, m: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = prefix + m
    q = torch.randn(1, HQ, m, D, device="cuda", dtype=DTYPE, generator=gen)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn(1, HKV, n, D, device="cuda", dtype=DTYPE, generator=gen)
    g = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, m)]
    mask = Tree.from_parents(parents).ancestor_mask("cuda")[None]
    return q, k, v, mask


def sdpa_fn(q, k, v, prefix, mask):
    m = q.shape[2]
    full = torch.ones(1, 1, m, prefix + m, dtype=torch.bool, device="cuda")
    full[0, 0, :, prefix:] = mask[0]
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True)


def kv_bytes(prefix: int, m: int) -> int:
    return 2 * HKV * (prefix + m) * D * torch.tensor([], dtype=DTYPE).element_size()


def tune(flush, reps, tune_ms=(1, 69)):
    """Sweep tile configs and split counts; print the best per point."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cands = {
        1: [dict(block_m=16, block_n=bn, num_warps=w, num_stages=s) for bn, w, s in
            [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (256, 8, 2)]],
        69: [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s) for bm, bn, w, s in
             [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
              (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 4, 4)]],
    }
    cands = {m: c for m, c in cands.items() if m in tune_ms}
    results = []
    for prefix in (16384, 32768):
        for m, configs in cands.items():
            q, k, v, mask = make_inputs(prefix, m)
            rows = m * HQ // HKV
            for cfg in configs:
                per_split = HKV * math.ceil(rows / cfg["block_m"])
                for waves in ((1, 2, 4, 8) if m == 1 else (1, 2, 4)):
                    splits = max(1, math.ceil(waves * sms / per_split))
                    try:
                        fn = lambda: K.tree_attention(q, k, v, prefix, mask, num_splits=splits, config=cfg)  # noqa: E731
                        ms = time_ms(graphed(fn), flush, reps)
                    except Exception as e:  # noqa: BLE001  (a config that does not fit: out of resources)
                        print(f"tune prefix={prefix} M={m} {cfg} splits={splits}: {type(e).__name__}: {str(e)[:80]}")
                        continue
                    gbps = kv_bytes(prefix, m) / (ms * 1e-3) / 1e9
                    results.append(dict(prefix=prefix, M=m, splits=splits, ms=ms, gbps=gbps, **cfg))
                    print(f"tune prefix={prefix} M={m} {cfg} splits={splits}: {ms * 1e3:.1f} us {gbps:.0f} GB/s", flush=True)
            best = min((r for r in results if r["prefix"] == prefix and r["M"] == m), key=lambda r: r["ms"], default=None)
            print(f"BEST prefix={prefix} M={m}: {best}", flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_kernels.jsonl")
    ap.add_argument("--prefixes", default="1024,4096,16384,32768,131072")
    ap.add_argument("--ms", default="1,5,69")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tune", action="store_true", help="sweep tile configs / split counts first")
    ap.add_argument("--tune-ms", default="1,69", help="which M the --tune sweep covers")
    ap.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference and SDPA")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    dev_name = torch.cuda.get_device_name(0)
    flush = flush_buffer()
    copy_gbps = copy_bandwidth(flush)
    print(f"device: {dev_name}  torch {torch.__version__}  copy bandwidth (read+write): {copy_gbps:.0f} GB/s", flush=True)
    tune_results = tune(flush, max(5, args.reps // 2), [int(x) for x in args.tune_ms.split(",")]) if args.tune else []

    rows = []
    with open(args.out, "w") as fh:
        for r in tune_results:
            fh.write(json.dumps(dict(kind="tune", device=dev_name, **r)) + "\n")
        for prefix in [int(x) for x in args.prefixes.split(",")]:
            base_ms = None
            for m in [int(x) for x in args.ms.split(",")]:
                q, k, v, mask = make_inputs(prefix, m)
                fn = lambda: K.tree_attention(q, k, v, prefix, mask)  # noqa: E731
                out = fn()
                torch.cuda.synchronize()
                kern_ms = time_ms(graphed(fn), flush, args.reps)
                nbytes = kv_bytes(prefix, m)
                gbps = nbytes / (kern_ms * 1e-3) / 1e9
                if m == 1:
                    base_ms = kern_ms
                res = dict(kind="bench", device=dev_name, prefix=prefix, M=m, kernel_ms=kern_ms, kv_bytes=nbytes,
                           kernel_GBps=gbps, copy_GBps=copy_gbps, frac_of_copy=gbps / copy_gbps,
                           vs_M1=(kern_ms / base_ms) if base_ms else None)
                for name, make in (("ref", lambda: (lambda: ref_tree_attention(q, k, v, prefix, mask))),
                                   ("sdpa", lambda: sdpa_fn(q, k, v, prefix, mask))):
                    if args.no_ref:
                        res[f"{name}_ms"] = None
                        continue
                    try:
                        f = make()
                        o = f()
                        if name == "ref":
                            res["max_abs_err_vs_ref"] = (o.float() - out.float()).abs().max().item()
                        del o
                        res[f"{name}_ms"] = time_ms(f, flush, max(3, args.reps // 4), warmup=1)
                    except torch.cuda.OutOfMemoryError:
                        res[f"{name}_ms"] = "oom"
                    torch.cuda.empty_cache()
                rows.append(res)
                fh.write(json.dumps(res) + "\n")
                fh.flush()
                print(json.dumps(res), flush=True)
                del q, k, v, mask, out
                torch.cuda.empty_cache()

    def fmt(x, spec):
        return x if isinstance(x, str) or x is None else format(x, spec)

    table = [[r["prefix"], r["M"], fmt(r["kernel_ms"] * 1e3, ".1f"), fmt(r["kernel_GBps"], ".0f"),
              fmt(100 * r["frac_of_copy"], ".0f"), fmt(r["vs_M1"], ".2f"),
              fmt(r["ref_ms"] * 1e3 if isinstance(r["ref_ms"], float) else r["ref_ms"], ".1f"),
              fmt(r["sdpa_ms"] * 1e3 if isinstance(r["sdpa_ms"], float) else r["sdpa_ms"], ".1f"),
              fmt(r.get("max_abs_err_vs_ref"), ".1e")] for r in rows]
    headers = ["prefix", "M", "kernel us", "KV GB/s", "% of copy BW", "x M=1", "ref us", "SDPA us", "max|err| vs ref"]
    print(f"\ndevice: {dev_name}; copy bandwidth (read+write) {copy_gbps:.0f} GB/s; "
          f"Hq={HQ} Hkv={HKV} D={D} bf16 B=1; median of {args.reps}, L2 flushed")
    try:
        from tabulate import tabulate

        print(tabulate(table, headers=headers, tablefmt="github"))
    except ImportError:
        print("\t".join(headers))
        for row in table:
            print("\t".join(str(c) for c in row))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.0f} s")
