"""Probe (session 6): the decode GEMV (``specdec.fast.kernels.gemv``) against cuBLAS ``F.linear`` for one
row, timed as inside a decode step: one CUDA graph of back-to-back calls over distinct weight copies
(4-16 calls, 2-8 copies, so no call finds its weight in L2), per-call time = graph time / calls
(median of 20 replays). Shapes: every projection and the lm_head of Llama-3-8B and Vicuna-7B, bf16;
w13 rows are timed with the SwiGLU epilogue (cuBLAS: the GEMM, then ``silu(gate) * up`` eagerly).
Sweeps the GEMV tile configs (BLOCK_N, BLOCK_K, warps, stages); prints a table, writes
``$OUT/probe_gemv.jsonl``.

    python3 scripts/probes/gemv_sweep.py           # the tile sweep (session 6)
    python3 scripts/probes/gemv_sweep.py fold      # session 7: the library GEMV plain vs with the folded
                                                   # RMSNorm (norm_weight) / residual add, same timing
    python3 scripts/probes/gemv_sweep.py step      # session 7: a whole decode step, folded vs norm kernels
    python3 scripts/probes/gemv_sweep.py rope      # session 7: gemv_qkv_rope vs GEMV + rope_qkv_write
"""
from __future__ import annotations
import json, os, statistics
import torch, triton
import torch.nn.functional as F
from tabulate import tabulate
from specdec.fast.kernels.gemv import _gemv_kernel

OUT = os.environ.get("OUT", "/tmp")
# (rows, K, SwiGLU epilogue) of every decode-step weight of the two 8B shapes
SHAPES = {"llama wqkv": (6144, 4096, False), "llama wo": (4096, 4096, False), "llama w13": (28672, 4096, True),
          "llama w2": (4096, 14336, False), "llama lm_head": (128256, 4096, False),
          "vicuna wqkv": (12288, 4096, False), "vicuna w13": (22016, 4096, True), "vicuna w2": (4096, 11008, False)}


def weight_copies(name: str, n: int, k: int) -> list[torch.Tensor]:
    """Enough distinct copies of an [n, k] bf16 weight that back-to-back calls never find theirs in L2."""
    copies = 2 if name.endswith("lm_head") else (8 if n * k < 200e6 else 4)
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]


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
    cfgs = [(4, 1024, 4, 4), (8, 1024, 4, 3), (8, 512, 4, 4), (16, 256, 4, 4), (16, 512, 4, 3), (32, 512, 8, 3), (2, 2048, 4, 3), (4, 512, 4, 4), (8, 256, 4, 4)]
    res = []
    for name, (n, k, silu) in SHAPES.items():
        ws = weight_copies(name, n, k)
        copies = len(ws)
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
                    _gemv_kernel[(triton.cdiv(nout, bn), 1)](x, ws[i % copies], ws[0], y, ws[0], y, nout, k, k, ws[0].stride(0), nout, 0, 0.0,
                                                           HAS_BIAS=False, SILU=silu, NORM=False, RESID=False, CODE=2,
                                                           BLOCK_N=bn, BLOCK_K=bk, STAGES=st, num_warps=wp)
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


def fold():
    """Per call: the library's ``gemv`` plain, with ``norm_weight`` and with ``residual`` (and the
    separate ``rms_norm`` / ``add_rms_norm`` kernels they replace), back to back as in a step."""
    import importlib

    from specdec.fast import kernels as K
    G = importlib.import_module("specdec.fast.kernels.gemv")

    cfgs = [None, (2, 2048, 4, 3), (4, 1024, 4, 3), (4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 3), (16, 256, 4, 4), (2, 1024, 4, 4)]
    res = []
    lib_config = G._config
    for name, (n, k, silu) in SHAPES.items():
        ws = weight_copies(name, n, k)
        copies = len(ws)
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        g = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        nout = n // 2 if silu else n
        r = torch.randn(1, 1, nout, device="cuda", dtype=torch.bfloat16)
        calls = 2 * copies
        op = K.gemv_silu if silu else K.gemv
        row = dict(name=name)
        t_norm = graph_ms(lambda: [K.rms_norm(x, g, 1e-5) for _ in range(calls)]) / calls
        t_add = graph_ms(lambda: [K.add_rms_norm(x, x, g, 1e-5) for _ in range(calls)]) / calls
        row.update(rms_norm_us=t_norm * 1e3, add_rms_norm_us=t_add * 1e3)
        for cfg in cfgs:
            if cfg is not None and cfg[1] > k:
                continue
            G._config = lib_config if cfg is None else (lambda *a, _cfg=cfg, **kw: _cfg)
            tag = "lib" if cfg is None else "bn%d bk%d w%d s%d" % cfg
            try:
                row[f"{tag} plain"] = graph_ms(lambda: [op(x, ws[i % copies]) for i in range(calls)]) / calls * 1e3
                row[f"{tag} norm"] = graph_ms(lambda: [op(x, ws[i % copies], norm_weight=g, eps=1e-5) for i in range(calls)]) / calls * 1e3
                if not silu:
                    row[f"{tag} resid"] = graph_ms(lambda: [op(x, ws[i % copies], residual=r) for i in range(calls)]) / calls * 1e3
            except Exception as e:  # noqa
                print(name, tag, type(e).__name__, str(e)[:80])
            finally:
                G._config = lib_config
        # registers / spills of the library config's plain and norm variants
        for norm in (False, True):
            bn, bk, wp, st = lib_config(n, nout, k, norm=norm)
            ck = _gemv_kernel[(triton.cdiv(nout, bn), 1)](x, ws[0], ws[0], torch.empty(1, 1, nout, device="cuda", dtype=torch.bfloat16),
                                                      g, x, nout, k, k, ws[0].stride(0), nout, 0, 1e-5,
                                                      HAS_BIAS=False, SILU=silu, NORM=norm, RESID=False, CODE=2,
                                                      BLOCK_N=bn, BLOCK_K=bk, STAGES=st, num_warps=wp)
            row[f"regs {'norm' if norm else 'plain'}"] = [getattr(ck, "n_regs", None), getattr(ck, "n_spills", None)]
        res.append(row); print(json.dumps(row), flush=True)
        del ws; torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_gemv_fold.jsonl"), "w") as f:
        for r_ in res: f.write(json.dumps(r_) + "\n")
    keys = ["lib plain", "lib norm", "lib resid"]
    table = []
    for r_ in res:
        best = min(((v, kk) for kk, v in r_.items() if kk.endswith(" norm") and isinstance(v, float)), default=(float("nan"), ""))
        table.append([r_["name"], f"{r_['rms_norm_us']:.1f}", f"{r_['add_rms_norm_us']:.1f}"] + [f"{r_.get(kk, float('nan')):.1f}" for kk in keys] + [f"{best[0]:.1f}", best[1]])
    print(tabulate(table, headers=["weight", "rms_norm us", "add_rms_norm us", "gemv us", "+norm us", "+resid us", "best +norm us", "cfg"], tablefmt="github"))


def step_ab(shapes=("vicuna-7b", "llama3-8b"), ctx=1024):
    """A decode step with the norms folded into the GEMVs (the library's ``step_forward``) against the
    same step with separate ``rms_norm`` / ``add_rms_norm`` kernels (session 6's step), same process."""
    from einops import rearrange
    from specdec.fast import kernels as K
    from specdec.fast.model import _cos_sin, _rope_write, as_fast_model, prefill, step_forward
    from specdec.benchutil import random_model

    def unfolded(fm, cache, tokens, positions, mask, prefix_len):
        c, w, eps = fm.config, fm.w, fm.config.rms_norm_eps
        cos, sin = _cos_sin(fm, positions)
        rows = prefix_len.to(torch.int32)[:, None]
        x = F.embedding(tokens, w["embed"])
        h = K.rms_norm(x, w["layers.0.attn_norm"], eps)
        for i in range(c.num_layers):
            p = f"layers.{i}."
            q = _rope_write(fm, i, K.gemv(h, w[p + "wqkv"], w.get(p + "bqkv")), cos, sin, cache, rows, True)
            attn = K.tree_attention(q, cache.k[i], cache.v[i], prefix_len, mask)
            h, x = K.add_rms_norm(K.gemv(rearrange(attn, "b h t d -> b t (h d)"), w[p + "wo"], w.get(p + "bo")), x, w[p + "mlp_norm"], eps)
            nxt = w[f"layers.{i + 1}.attn_norm"] if i + 1 < c.num_layers else w["norm"]
            h, x = K.add_rms_norm(K.gemv(K.gemv_silu(h, w[p + "w13"]), w[p + "w2"]), x, nxt, eps)
        return K.gemv(h, w["lm_head"]).float()

    rows_out = []
    for shape in shapes:
        fm = as_fast_model(random_model(shape, device="cuda"))
        cache = fm.ensure_cache(1, ctx + 64)
        prefill(fm, cache, torch.randint(0, fm.config.vocab_size, (1, ctx), device="cuda"), chunk_size=4096)
        L = cache.length
        tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        pos = torch.full((1, 1), L, dtype=torch.long, device="cuda")
        one = torch.ones(1, 1, 1, dtype=torch.bool, device="cuda")
        pl = cache.length_t
        a = step_forward(fm, cache, tok, pos, one, pl)
        b = unfolded(fm, cache, tok, pos, one, pl)
        agree = float((a.float() - b.float()).abs().max() / b.float().abs().max())
        t = {}
        for rep in range(3):   # interleaved, to see drift
            t.setdefault("folded", []).append(graph_ms(lambda: step_forward(fm, cache, tok, pos, one, pl), reps=30))
            t.setdefault("unfolded", []).append(graph_ms(lambda: unfolded(fm, cache, tok, pos, one, pl), reps=30))
        row = dict(shape=shape, ctx=L, folded_ms=min(t["folded"]), unfolded_ms=min(t["unfolded"]), all=t, rel_diff=agree)
        rows_out.append(row); print(json.dumps(row), flush=True)
        fm.caches.clear(); fm.graphs.clear(); del fm; torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_step_fold.jsonl"), "w") as f:
        for r_ in rows_out: f.write(json.dumps(r_) + "\n")
    print(tabulate([[r["shape"], r["ctx"], f"{r['unfolded_ms']:.3f}", f"{r['folded_ms']:.3f}", f"{r['rel_diff']:.2e}"] for r in rows_out],
                   headers=["shape", "ctx", "norm kernels ms", "folded ms", "max rel logit diff"], tablefmt="github"))


def rope():
    """Per call: norm+wqkv GEMV followed by rope_qkv_write, against gemv_qkv_rope over tile configs."""
    import importlib

    from specdec.fast import kernels as K
    G = importlib.import_module("specdec.fast.kernels.gemv")
    lib_config = G._config
    shapes = {"llama wqkv": (32, 8), "vicuna wqkv": (32, 32)}
    cfgs = [None, (4, 512, 4, 3), (4, 1024, 4, 3), (8, 256, 4, 4), (4, 256, 4, 4), (2, 1024, 4, 3), (2, 2048, 4, 3), (8, 512, 4, 3)]
    res = []
    for name, (hq, hkv) in shapes.items():
        d, k = 128, 4096
        n = (hq + 2 * hkv) * d
        copies = 8
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        g = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        cos = torch.rand(1, 1, d, device="cuda", dtype=torch.bfloat16)
        sin = torch.rand(1, 1, d, device="cuda", dtype=torch.bfloat16)
        kc = torch.zeros(1, hkv, 64, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        rows = torch.full((1, 1), 5, dtype=torch.int32, device="cuda")
        calls = 2 * copies
        row = dict(name=name)
        row["gemv+rope_qkv_write"] = graph_ms(lambda: [K.rope_qkv_write(K.gemv(x, ws[i % copies], norm_weight=g, eps=1e-5), cos, sin, kc, vc, rows, check_rows=False) for i in range(calls)]) / calls * 1e3
        for cfg in cfgs:
            G._config = lib_config if cfg is None else (lambda *a, _cfg=cfg, **kw: _cfg)
            tag = "lib" if cfg is None else "bn%d bk%d w%d s%d" % cfg
            try:
                row[f"fused {tag}"] = graph_ms(lambda: [K.gemv_qkv_rope(x, ws[i % copies], None, cos, sin, kc, vc, rows, norm_weight=g, eps=1e-5) for i in range(calls)]) / calls * 1e3
            except Exception as e:  # noqa
                print(name, tag, type(e).__name__, str(e)[:80])
            finally:
                G._config = lib_config
        res.append(row); print(json.dumps(row), flush=True)
        del ws; torch.cuda.empty_cache()
    with open(os.path.join(OUT, "probe_gemv_rope.jsonl"), "w") as f:
        for r_ in res: f.write(json.dumps(r_) + "\n")
    keys = [k_ for k_ in res[0] if k_ != "name"]
    print(tabulate([[k_] + [f"{r_.get(k_, float('nan')):.1f}" for r_ in res] for k_ in keys], headers=["us per call"] + [r_["name"] for r_ in res], tablefmt="github"))


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["rope"]:
        rope()
        sys.exit()
    if sys.argv[1:] == ["step"]:
        step_ab()
        sys.exit()
    fold() if sys.argv[1:] == ["fold"] else main()
