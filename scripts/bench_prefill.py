#!/usr/bin/env python3
"""Time to first token of the fast prefill: the old attention path, the new one, and what the kernels allow.

Issue 20 item 1. One process, random weights of a model shape (Llama-3-8B by default; bf16 on CUDA,
fp32 on CPU), batch 1, for each context (ascending; a fresh cache of ``context + 256`` rows each):

* ``blocks`` -- the opt-in blocked attention (``SPECDEC_PREFILL_ATTENTION=cudnn-blocks``: the chunk's square
  block + power-of-two prefix blocks on cuDNN, merged by log-sum-exp; ``--paths old new blocks``);
* ``blocks-eager`` -- ``blocks`` with the merge it had until session 18 (:func:`eager_blocks` below: six eager
  torch ops per merge on an fp32 copy of the first block, cast back at the end) instead of the Triton
  :func:`specdec.fast.kernels.merge_attention` -- the A/B of that kernel;
* ``prompt`` -- the layer-major prefill (``SPECDEC_PREFILL_ATTENTION=cudnn-prompt``: per layer, the projections in
  chunks, then ONE whole-prompt causal cuDNN attention, then the rest of the layer in chunks);
* ``prompt-lse`` -- ``prompt`` with its cuDNN call asking for the log-sum-exp too (as the session-27 first
  version did; cuDNN then picks another kernel) -- the A/B of that flag;
* ``old`` -- :func:`specdec.fast.model.prefill` with the attention it had before issue 20 patched in
  (:func:`old_prefill_attention` below, reachable only from this script: the KV heads repeated for their
  query heads, a dense boolean [n, T] mask built once per chunk, SDPA on EFFICIENT / FLASH / MATH);
* ``new`` -- the library's prefill as it is (causal attention aligned to the bottom right; on CUDA in
  fp16/bf16 the flash kernel with grouped KV heads, no mask, no KV copy);
* anchors, one layer's operation timed alone and multiplied, nothing around it:
  ``attn_cudnn`` -- one whole-prompt ``F.scaled_dot_product_attention(q, k, v, is_causal=True,
  enable_gqa=True)`` under the cuDNN backend x num_layers (the best attention kernel at hand);
  ``attn_flash`` -- the same under the flash backend (the kernel the new path runs) x num_layers;
  ``gemm`` -- one chunk's four projections of layer 0 (wqkv, wo, w13, w2; cuBLAS) x num_layers x chunks;
  ``cudnn+gemm`` -- their sum, roughly the attainable TTFT;
  ``skeleton`` -- the same calls (every layer's own weights) run back to back as one prefill runs them, nothing
  else (:func:`anchor_skeleton`): what the anchors' kernels cost under a sustained load; ``skeleton_attn`` -- only
  its attention calls, back to back.

TTFT = prefill + the first token's argmax, synchronised, after a warm-up prefill of two chunks per path
(kernels compiled, backends initialised); ``--reps`` timed runs, the fastest reported. Peak GiB =
``torch.cuda.max_memory_allocated`` over the timed run, weights and cache included -- the source model's
unfused weights stay alive as in ``scripts/bench_fast.py``, so it compares with that script's "peak GiB"
(44.8 at 128k before issue 20); "transient" is the peak minus what was allocated before the run.
``max |dlogits|`` compares the new path's last logits with the old one's.

Writes JSONL to ``--out`` (default ``$OUT/bench_prefill.jsonl``, ``$OUT`` defaulting to /tmp) and prints a
table last. ``--profile [old] [new]`` first prints the top kernels by device time (``torch.profiler``) of
one prefill at ``--profile-context`` (default 32768, else the smallest context), to find where the time
that the anchors do not explain goes.

    python3 scripts/bench_prefill.py --contexts 32768 131072 --profile            # one H200: about 3 minutes
    python3 scripts/bench_prefill.py --shape tiny --contexts 256 --chunk-size 64 --profile   # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch.nn.attention import SDPBackend, sdpa_kernel

import specdec.fast.model as fast_model
from specdec.benchutil import MODEL_SHAPES, random_model

# A shape for smoke tests on a CPU: every code path of the script, in seconds.
TINY = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=8192)
SHAPES = {**MODEL_SHAPES, "tiny": TINY}

PATHS = ["old", "new", "blocks", "blocks-eager", "prompt", "prompt-lse", "auto"]
GOALS = "goals (issue 20 item 1, Llama-3-8B on one H200): TTFT <= 1.2 s at 32k, <= 10 s at 128k; peak at 128k <= 44.8 GiB"


# ---------------------------------------------------------------------------------------------
# The old path (before issue 20), kept here only
# ---------------------------------------------------------------------------------------------

_OLD_MASK: dict = {}


def _old_mask(n: int, t: int, device: torch.device) -> torch.Tensor:
    """The boolean [n, T] mask the old prefill built once per chunk (query i sees keys <= T - n + i)
    and handed to every layer; kept for the chunk's layers here too."""
    key = (n, t, str(device))
    if _OLD_MASK.get("key") != key:
        cols = torch.arange(t, device=device)
        _OLD_MASK["key"] = key
        _OLD_MASK["mask"] = cols[None, :] <= (torch.arange(n, device=device) + (t - n))[:, None]
    return _OLD_MASK["mask"]


def old_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The prefill attention before issue 20 (``_prefill_attention`` + ``_prefill_sdpa`` at commit 049d011),
    q [B, Hq, n, D] over k/v [B, Hkv, T, D]: on CUDA the KV heads repeated for their query heads (a
    transient [B, Hq, T, D] copy per layer and chunk) and SDPA with the dense mask on EFFICIENT / FLASH /
    MATH (never cuDNN); elsewhere SDPA with the mask and grouped heads."""
    mask = _old_mask(q.shape[2], k.shape[2], q.device)
    hq, hkv = q.shape[1], k.shape[1]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        if hq != hkv:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def eager_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend) -> torch.Tensor:
    """``_prefill_attention_blocks`` as it was until session 18 (commit 805a684): the same blocks, each folded
    into an fp32 copy of the first by eager torch ops (logaddexp, two exps, mul_, addcmul_, copy_), the
    result cast back to q's dtype at the end."""
    n, t = q.shape[2], k.shape[2]
    p0 = t - n
    out, lse = attend(q, k[:, :, p0:], v[:, :, p0:], True)
    if p0 == 0:
        return out
    acc, acc_lse = out.float(), lse.float()
    del out
    for lo, hi in fast_model.power_of_two_blocks(p0):
        block_out, block_lse = attend(q, k[:, :, lo:hi], v[:, :, lo:hi], False)
        joint = torch.logaddexp(acc_lse, block_lse)
        acc.mul_(torch.exp(acc_lse - joint).unsqueeze(-1))
        acc.addcmul_(block_out, torch.exp(block_lse - joint).unsqueeze(-1))
        acc_lse.copy_(joint)
        del block_out
    return acc.to(q.dtype)


@contextlib.contextmanager
def attention_path(name: str):
    """Run the library's prefill with the ``old`` attention patched in, as it is (``new``: flash), with
    ``SPECDEC_PREFILL_ATTENTION=cudnn-blocks`` (``blocks``: power-of-two prefix blocks on cuDNN, LSE-merged), or
    with ``cudnn-prompt`` (``prompt``: layer-major, one whole-prompt cuDNN attention per layer), or with ``auto``
    (``auto``: the library's default choice)."""
    if name in ("new", "blocks", "blocks-eager", "prompt", "prompt-lse", "auto"):
        saved_env = os.environ.get("SPECDEC_PREFILL_ATTENTION")
        os.environ["SPECDEC_PREFILL_ATTENTION"] = {"new": "flash", "prompt": "cudnn-prompt", "auto": "auto",
                                                   "prompt-lse": "cudnn-prompt"}.get(name, "cudnn-blocks")
        saved_blocks, saved_prompt = fast_model._prefill_attention_blocks, fast_model._cudnn_prompt_attend
        if name == "blocks-eager":
            fast_model._prefill_attention_blocks = eager_blocks
        if name == "prompt-lse":
            fast_model._cudnn_prompt_attend = lambda q, k, v: fast_model._cudnn_attend(q, k, v, True)[0]
        try:
            yield
        finally:
            fast_model._prefill_attention_blocks, fast_model._cudnn_prompt_attend = saved_blocks, saved_prompt
            if saved_env is None:
                os.environ.pop("SPECDEC_PREFILL_ATTENTION")
            else:
                os.environ["SPECDEC_PREFILL_ATTENTION"] = saved_env
        return
    saved = fast_model._prefill_attention
    fast_model._prefill_attention = old_prefill_attention
    try:
        yield
    finally:
        fast_model._prefill_attention = saved
        _OLD_MASK.clear()


# ---------------------------------------------------------------------------------------------
# Timing helpers (CUDA or CPU)
# ---------------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_s(fn: Callable[[], object], dev: torch.device, reps: int = 3, warmup: int = 1) -> float:
    """Fastest wall time of ``fn()`` in seconds over ``reps`` synchronised calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(reps):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def _gib(nbytes: float) -> float:
    return nbytes / 2**30


def ttft(fm, cache, ids: torch.Tensor, chunk_size: int, path: str, reps: int) -> dict:
    """Time to first token of ``path`` (old / new): prefill of ``ids`` on an emptied cache + argmax."""
    dev = ids.device
    times, logits = [], None
    peak = transient = None
    for _ in range(reps):
        cache.set_length(0)
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        with attention_path(path):
            t = time.perf_counter()
            logits = fast_model.prefill(fm, cache, ids, chunk_size=chunk_size)
            first = logits.argmax(-1)
            _sync(dev)
            times.append(time.perf_counter() - t)
        if dev.type == "cuda":
            p = torch.cuda.max_memory_allocated(dev)
            peak = p if peak is None else max(peak, p)
            transient = p - base if transient is None else max(transient, p - base)
    return dict(ttft_s=min(times), ttft_all_s=times, first_token=int(first[0]), logits=logits,
                peak_gib=None if peak is None else _gib(peak), transient_gib=None if transient is None else _gib(transient))


def anchor_attention(c, ctx: int, dev: torch.device, dtype: torch.dtype, backend: SDPBackend | None) -> float | None:
    """Seconds of ``num_layers`` whole-prompt causal SDPA calls with the model's heads (one timed, times
    num_layers), under ``backend`` (None: PyTorch's choice); None when the backend refuses."""
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, c.num_heads, ctx, c.head_dim, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, c.num_kv_heads, ctx, c.head_dim, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, c.num_kv_heads, ctx, c.head_dim, device=dev, dtype=dtype, generator=g)
    ctx_mgr = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    try:
        with ctx_mgr:
            s = time_s(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.num_heads != c.num_kv_heads),
                       dev, reps=3, warmup=1)
    except RuntimeError as e:   # backend not available for these inputs on this build / device
        print(f"  anchor {backend}: not available ({str(e).splitlines()[0][:120]})", flush=True)
        return None
    return s * c.num_layers


def _gemm_inputs(fm, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs of one n-row chunk's projections: the normed hidden state (wqkv, w13), the attention output
    (wo) and the SwiGLU output (w2)."""
    c, w, dev = fm.config, fm.w, fm.device
    x = torch.randn(1, n, c.hidden_size, device=dev, dtype=fm.dtype, generator=g)
    a = torch.randn(1, n, w["layers.0.wo"].shape[1], device=dev, dtype=fm.dtype, generator=g)
    m = torch.randn(1, n, w["layers.0.w2"].shape[1], device=dev, dtype=fm.dtype, generator=g)
    return x, a, m


def anchor_gemm(fm, ctx: int, chunk_size: int, dev: torch.device) -> float:
    """Seconds of the prefill's projections: one chunk's wqkv, wo, w13, w2 of layer 0 timed, x layers x chunks."""
    c, w = fm.config, fm.w
    n = min(chunk_size, ctx)
    x, a, m = _gemm_inputs(fm, n, torch.Generator(device=dev).manual_seed(1))

    def projections():
        F.linear(x, w["layers.0.wqkv"])
        F.linear(a, w["layers.0.wo"])
        F.linear(x, w["layers.0.w13"])
        F.linear(m, w["layers.0.w2"])

    return time_s(projections, dev, reps=5, warmup=2) * c.num_layers * math.ceil(ctx / n)


def anchor_skeleton(fm, ctx: int, chunk_size: int, dev: torch.device, reps: int, gemms: bool = True) -> float | None:
    """Seconds of the anchors' operations run BACK TO BACK as one prefill would run them, nothing else: per layer
    (its own weights), every chunk's four projections (cuBLAS) and ONE whole-prompt causal cuDNN attention with
    grouped KV heads; then the last row's lm_head. The ``attn_cudnn`` and ``gemm`` anchors time one call each,
    alone, on an idle card, and multiply; this one runs the whole sequence of calls, so it also pays what a
    sustained prefill pays (clocks under a long full load, caches evicted by the next layer's weights). With
    ``gemms=False`` only the attention calls run, back to back. None when cuDNN refuses (no CUDA, or a build
    without it)."""
    if dev.type != "cuda":
        return None
    c, w = fm.config, fm.w
    n = min(chunk_size, ctx)
    g = torch.Generator(device=dev).manual_seed(2)
    x, a, m = _gemm_inputs(fm, n, g)
    q = torch.randn(1, c.num_heads, ctx, c.head_dim, device=dev, dtype=fm.dtype, generator=g)
    k = torch.randn(1, c.num_kv_heads, ctx, c.head_dim, device=dev, dtype=fm.dtype, generator=g)
    v = torch.randn(1, c.num_kv_heads, ctx, c.head_dim, device=dev, dtype=fm.dtype, generator=g)
    chunks = math.ceil(ctx / n)

    def skeleton():
        for i in range(c.num_layers):
            p = f"layers.{i}."
            for _ in range(chunks if gemms else 0):
                F.linear(x, w[p + "wqkv"])
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=c.num_heads != c.num_kv_heads)
            for _ in range(chunks if gemms else 0):
                F.linear(a, w[p + "wo"])
                F.linear(x, w[p + "w13"])
                F.linear(m, w[p + "w2"])
        F.linear(x[:, -1:], w["lm_head"])

    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return time_s(skeleton, dev, reps=reps, warmup=1)
    except RuntimeError as e:   # cuDNN attention not available for these inputs on this build / device
        print(f"  anchor skeleton: not available ({str(e).splitlines()[0][:120]})", flush=True)
        return None


def profile_prefill(fm, cache, ids: torch.Tensor, chunk_size: int, path: str, top: int) -> None:
    """Print the ``top`` kernels (CUDA) or ops (CPU) by device time of one prefill on ``path``."""
    from torch.profiler import ProfilerActivity, profile

    dev = ids.device

    def run():
        cache.set_length(0)
        with attention_path(path):
            fast_model.prefill(fm, cache, ids, chunk_size=chunk_size).argmax(-1)
        _sync(dev)

    run()   # warm
    activities = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
    wall = time.perf_counter() - t
    print(f"\nprofile: one {path} prefill of {ids.shape[1]} tokens (chunk {chunk_size or 'per path'}), wall {wall:.3f} s under the profiler")
    if dev.type == "cuda":
        agg: dict[str, list] = {}
        for ev in prof.events():
            if ev.device_type.name != "CUDA":
                continue
            a = agg.setdefault(ev.name[:90], [0, 0.0])
            a[0] += 1
            a[1] += (ev.device_time if hasattr(ev, "device_time") else ev.cuda_time) / 1e3
        total = sum(v[1] for v in agg.values())
        rows = sorted(([k, v[0], v[1], 100 * v[1] / max(total, 1e-9)] for k, v in agg.items()), key=lambda r: -r[2])
        print(f"GPU kernel time {total / 1e3:.3f} s of {wall:.3f} s wall ({len(agg)} distinct kernels); the gap is host time / idle GPU")
        print(tabulate([[r[0], r[1], f"{r[2]:.1f}", f"{r[3]:.1f}"] for r in rows[:top]],
                       headers=["kernel", "launches", "ms", "% GPU"]))
    else:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--contexts", nargs="+", type=int, default=[32768, 131072])
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="prefill chunk_size (default: the library's per path, PREFILL_CHUNK chunk-major and "
                         "PROMPT_PREFILL_CHUNK layer-major; the GEMM anchors use the latter)")
    ap.add_argument("--paths", nargs="+", default=["old", "new"], choices=PATHS,
                    help="blocks: the cuDNN blocked attention (CUDA fp16/bf16; SPECDEC_PREFILL_ATTENTION=cudnn-blocks); "
                         "blocks-eager: the same with its merge before the Triton kernel; prompt: layer-major, one "
                         "whole-prompt cuDNN attention per layer (SPECDEC_PREFILL_ATTENTION=cudnn-prompt)")
    ap.add_argument("--reps", type=int, default=1, help="timed prefills per path and context (the fastest is reported)")
    ap.add_argument("--no-anchors", action="store_true", help="skip the attention / GEMM anchors")
    ap.add_argument("--profile", nargs="*", choices=PATHS, default=None,
                    help="profile one prefill per named path (default: new) at --profile-context")
    ap.add_argument("--profile-context", type=int, default=None, help="default: 32768 if among --contexts, else the smallest")
    ap.add_argument("--top", type=int, default=20, help="kernels listed by --profile")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--out", default=None, help="JSONL path (default: $OUT/bench_prefill.jsonl, $OUT defaulting to /tmp)")
    args = ap.parse_args()
    if (args.chunk_size is not None and args.chunk_size < 1) or args.reps < 1 or min(args.contexts) < 1:
        ap.error("--chunk-size, --reps and every context must be >= 1")

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    out_path = args.out or os.path.join(os.environ.get("OUT") or "/tmp", "bench_prefill.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    contexts = sorted(set(args.contexts))
    devname = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    info = dict(device=devname, torch=torch.__version__, shape=args.shape, dtype=str(dtype).replace("torch.", ""),
                chunk_size=args.chunk_size,
                cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None)
    print(json.dumps(info), flush=True)
    print(GOALS, flush=True)

    t0 = time.perf_counter()
    model = random_model(SHAPES[args.shape], dtype=dtype, device=str(dev))
    fm = fast_model.as_fast_model(model)   # ``model`` stays alive, as in bench_fast.py (comparable peaks)
    c = fm.config
    print(f"random {args.shape} weights on {dev} in {time.perf_counter() - t0:.1f} s", flush=True)

    rows: list[dict] = []
    with open(out_path, "w") as out, torch.inference_mode():
        def record(row: dict) -> None:
            row = {**info, **row}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(json.dumps(row), flush=True)

        # Which attention the library takes here, on a chunk-shaped call after a prefix.
        probe_n = min(args.chunk_size or fast_model.PREFILL_CHUNK, contexts[0])
        q = torch.zeros(1, c.num_heads, probe_n, c.head_dim, device=dev, dtype=dtype)
        kv = torch.zeros(1, c.num_kv_heads, 2 * probe_n, c.head_dim, device=dev, dtype=dtype)
        flash, _ = fast_model._prefill_sdpa(q, kv, kv)
        print(f"new path on this device: {'flash kernel, grouped KV heads, no mask' if flash else 'fallback (see _prefill_attention)'}",
              flush=True)
        del q, kv

        # Warm-up: two chunks per path (Triton kernels compiled, SDPA backends and cuBLAS initialised).
        warm_len = min(2 * (args.chunk_size or fast_model.PREFILL_CHUNK), contexts[-1])
        cache = fm.ensure_cache(1, warm_len + 256)
        warm_ids = torch.randint(0, c.vocab_size, (1, warm_len), device=dev)
        for path in args.paths:
            ttft(fm, cache, warm_ids, args.chunk_size, path, reps=1)

        profile_ctx = args.profile_context or (32768 if 32768 in contexts else contexts[0])
        if args.profile is not None:
            cache = fm.ensure_cache(1, profile_ctx + 256)
            ids = torch.randint(0, c.vocab_size, (1, profile_ctx), device=dev)
            for path in args.profile or ["new"]:
                profile_prefill(fm, cache, ids, args.chunk_size, path, args.top)
            del ids

        for ctx in contexts:
            fm.caches.clear()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            cache = fm.ensure_cache(1, ctx + 256)
            ids = torch.randint(0, c.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx)).to(dev)
            results = {}
            for path in args.paths:
                r = ttft(fm, cache, ids, args.chunk_size, path, args.reps)
                results[path] = r
                extra = {}
                if path in ("new", "blocks", "blocks-eager") and "old" in results:
                    extra = dict(max_abs_dlogits=float((r["logits"] - results["old"]["logits"]).abs().max()),
                                 same_first_token=r["first_token"] == results["old"]["first_token"],
                                 speedup_vs_old=results["old"]["ttft_s"] / r["ttft_s"])
                first = args.paths[0]
                if path != first and first != "old":   # every path against the first one named, within rounding
                    extra.update(max_abs_dlogits_vs_first=float((r["logits"] - results[first]["logits"]).abs().max()),
                                 same_first_token_as_first=r["first_token"] == results[first]["first_token"],
                                 speedup_vs_first=results[first]["ttft_s"] / r["ttft_s"])
                other = "blocks-eager" if path == "blocks" else "blocks" if path == "blocks-eager" else None
                if other in results:   # the merge kernel's A/B: same attention, the logits within rounding
                    extra.update(max_abs_dlogits_vs_other_merge=float((r["logits"] - results[other]["logits"]).abs().max()),
                                 same_first_token_as_other_merge=r["first_token"] == results[other]["first_token"])
                record(dict(context=ctx, path=path, **{k: v for k, v in r.items() if k != "logits"}, **extra))
            fm.caches.clear()
            del cache
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if not args.no_anchors:
                anchors = [("attn_cudnn", SDPBackend.CUDNN_ATTENTION), ("attn_flash", SDPBackend.FLASH_ATTENTION)] \
                    if dev.type == "cuda" else [("attn_default", None)]
                got = {}
                for name, backend in anchors:
                    got[name] = anchor_attention(c, ctx, dev, dtype, backend)
                    record(dict(context=ctx, path=name, ttft_s=got[name]))
                anchor_chunk = args.chunk_size or fast_model.PROMPT_PREFILL_CHUNK
                got["gemm"] = anchor_gemm(fm, ctx, anchor_chunk, dev)
                record(dict(context=ctx, path="gemm", ttft_s=got["gemm"]))
                best_attn = got.get("attn_cudnn") or got.get("attn_default")
                if best_attn is not None:
                    record(dict(context=ctx, path="cudnn+gemm" if dev.type == "cuda" else "attn+gemm",
                                ttft_s=best_attn + got["gemm"]))
                for name, gemms in (("skeleton", True), ("skeleton_attn", False)):
                    skeleton = anchor_skeleton(fm, ctx, anchor_chunk, dev, args.reps, gemms)
                    if skeleton is not None:
                        record(dict(context=ctx, path=name, ttft_s=skeleton))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()

    print(f"\nwrote {out_path}; {GOALS}")
    print(f"{info['device']}, torch {info['torch']}, {args.shape} {info['dtype']}, chunk {args.chunk_size or 'per path (library default)'}\n")
    table = []
    for r in rows:
        old = next((o for o in rows if o["context"] == r["context"] and o["path"] == args.paths[0]), None)
        table.append([r["context"], r["path"],
                      "-" if r.get("ttft_s") is None else f"{r['ttft_s']:.3f}",
                      "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}",
                      "-" if r.get("transient_gib") is None else f"{r['transient_gib']:.2f}",
                      "-" if old is None or r.get("ttft_s") is None else f"{r['ttft_s'] / old['ttft_s']:.2f}",
                      "-" if "max_abs_dlogits" not in r and "max_abs_dlogits_vs_first" not in r
                      else f"{r.get('max_abs_dlogits', r.get('max_abs_dlogits_vs_first')):.2e}",
                      "-" if r.get("ttft_all_s") is None else " ".join(f"{x:.3f}" for x in r["ttft_all_s"])])
    print(tabulate(table, headers=["context", "path", "TTFT s (anchors: s)", "peak GiB", "transient GiB",
                                   f"/ {args.paths[0]}", f"max |dlogits| vs {args.paths[0]}", "every rep s"]))


if __name__ == "__main__":
    main()
