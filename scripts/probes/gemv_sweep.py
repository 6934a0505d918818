"""Probe (session 6): the decode GEMV (``specdec.fast.kernels.gemv``) against cuBLAS ``F.linear`` for one
row, timed as inside a decode step: one CUDA graph of back-to-back calls over distinct weight copies
(4-16 calls, 2-8 copies, so no call finds its weight in L2), per-call time = graph time / calls
(median of 20 replays). Shapes: every projection and the lm_head of Llama-3-8B and Vicuna-7B, bf16;
w13 rows are timed with the SwiGLU epilogue (cuBLAS: the GEMM, then ``silu(gate) * up`` eagerly).
Sweeps the GEMV tile configs (BLOCK_N, BLOCK_K, warps, stages); prints a table, writes
``$OUT/probe_gemv.jsonl``.

    python3 scripts/probes/gemv_sweep.py
"""
from __future__ import annotations
import json, os, statistics
import torch, triton
import torch.nn.functional as F
from tabulate import tabulate
from specdec.fast.kernels.gemv import _gemv_kernel

OUT = os.environ.get("OUT", "/tmp")


def graph_ms(fn, reps=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize(); ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    shapes = {"llama wqkv": (6144, 4096, False), "llama wo": (4096, 4096, False), "llama w13": (28672, 4096, True),
              "llama w2": (4096, 14336, False), "llama lm_head": (128256, 4096, False),
              "vicuna wqkv": (12288, 4096, False), "vicuna w13": (22016, 4096, True), "vicuna w2": (4096, 11008, False)}
    cfgs = [(4, 1024, 4, 4), (8, 1024, 4, 3), (8, 512, 4, 4), (16, 256, 4, 4), (16, 512, 4, 3), (32, 512, 8, 3), (2, 2048, 4, 3), (4, 512, 4, 4), (8, 256, 4, 4)]
    res = []
    for name, (n, k, silu) in shapes.items():
        copies = 8 if n * k < 200e6 else 4
        if name.endswith("lm_head"):
            copies = 2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        calls = 2 * copies
        nout = n // 2 if silu else n
        y = torch.empty(1, 1, nout, device="cuda", dtype=torch.bfloat16)

        def cublas():
            for i in range(calls):
                o = F.linear(x, ws[i % copies])
                if silu:
                    g, u = o.chunk(2, -1); F.silu(g) * u
        t_cb = graph_ms(cublas) / calls
        row = dict(name=name, cublas_us=t_cb * 1e3, gbps_cublas=n * k * 2 / (t_cb * 1e-3) / 1e9)
        best = None
        for bn, bk, wp, st in cfgs:
            if bk > k:
                continue
            def tri(bn=bn, bk=bk, wp=wp, st=st):
                for i in range(calls):
                    _gemv_kernel[(triton.cdiv(nout, bn), 1)](x, ws[i % copies], ws[0], y, nout, k, k, ws[0].stride(0), nout,
                                                           HAS_BIAS=False, SILU=silu, CODE=2, BLOCK_N=bn, BLOCK_K=bk, STAGES=st, num_warps=wp)
            try:
                t = graph_ms(tri) / calls
            except Exception as e:  # noqa
                print(name, bn, bk, wp, st, type(e).__name__, str(e)[:80]); continue
            row[f"bn{bn} bk{bk} w{wp} s{st}"] = round(t * 1e3, 1)
            if best is None or t < best[0]:
                best = (t, f"bn{bn} bk{bk} w{wp} s{st}")
        row.update(best_us=best[0] * 1e3, best_cfg=best[1], gbps_best=n * k * 2 / (best[0] * 1e-3) / 1e9)
        res.append(row); print(json.dumps(row), flush=True)
        del ws; torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_gemv.jsonl"), "w") as f:
        for r in res: f.write(json.dumps(r) + "\n")
    print(tabulate([[r["name"], f"{r['cublas_us']:.1f}", f"{r['gbps_cublas']:.0f}", f"{r['best_us']:.1f}", f"{r['gbps_best']:.0f}", r["best_cfg"]] for r in res],
                   headers=["weight", "cuBLAS us/call", "GB/s", "GEMV best us", "GB/s", "cfg"], tablefmt="github"))


if __name__ == "__main__":
    main()
