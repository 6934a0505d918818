#!/usr/bin/env python3
"""Issue 19's benchmarks: batched decoding on the fast path (one process, one device).

Five parts (``--parts``, default the first four):

* ``vanilla`` -- a batched vanilla decode step of a random-weight model (default the Llama-3-8B shape, bf16)
  for B in ``--batches`` x context in ``--contexts``: ms per step (CUDA-graph replay), tokens/s = B / step,
  bytes moved (every weight once + every row's KV cache) and that as % of the device copy bandwidth
  measured in the same run. The cache holds random values (speed does not depend on them).
* ``magicdec`` -- MagicDec's regime, B in ``--magic-batches`` x context in ``--magic-contexts``: the vanilla step,
  the batched draft step over the [B] StreamingLLM scratch cache (``sink_tokens + window`` rows per row, as
  :meth:`specdec.fast.magicdec.FastMagicDecDrafter.propose_rows` runs it), the gather that fills that cache,
  the (gamma + 1)-row verification, the KV compaction, the round ``gather + gamma x draft + verify + compact``
  and the efficiency ``t_step / t_round`` (the speedup is tau times this). The floor of a draft step is
  one read of the weights: reported as ``weights / copy bandwidth``.
* ``finished`` -- what a finished row costs (issue 19: "masked at near-zero cost or compacted -- measure which"):
  the fast engine keeps a finished row in the batch as a masked dummy (prefix length 0: it reads none of its KV
  cache, but its T tokens still run through every GEMM). For B in ``--finished-batches`` x ``--contexts`` x
  M in ``--finished-m`` (tokens per row and pass: 1 = vanilla, gamma + 1 = a chain, a tree's size): the M-row
  pass over B running rows, over B rows of which half are masked, and over the B/2 running rows alone (what
  compacting the batch would run), and the copy that compaction costs once (the running rows' KV moved into a
  B/2-row cache; a new batch size also captures its step graphs once, not counted) -- so the steps after which
  compacting would pay = copy / (masked - half).
* ``methods`` -- every decoder on the embedded default model (``--model``, bf16) at B in ``--method-batches``:
  the first B prompts of ``--bench``, ``--max-new-tokens`` each, one batched call per method; tokens/s
  (emitted tokens / decode time) and speedup over batched vanilla at the same B; and whether every row
  equals batched vanilla's row (bitwise, the decode phase is row-invariant). ``tree_spec rows together`` is the
  GLIDE tree with its rows drafting in one batched round instead of one after another -- greedy rounds of the
  full tree fused into one graph with the verification and acceptance; ``draft graph``: the draft alone
  captured; ``eager``: nothing captured (the A/B) -- and the same for the smaller tree (4, 8, 8, 4).
* ``compaction`` -- what compaction of finished rows buys end to end: the speculative decoders on the embedded model
  at B in ``--method-batches``, with the model's own EOS (rows stop when they answer, as requests do), each run with
  the engine's compaction (default: the batch halves once half its slots have finished) and without it (the width
  kept, finished rows masked: ``fast.engine.compacted_width`` replaced for the run). Tokens/s of both, their ratio,
  how many rows stopped before ``--max-new-tokens``, and whether the two runs' rows are identical (bitwise).

A configuration that does not fit the device's memory is reported as skipped (the library's own memory
check names the largest batch that fits). Prints tables and writes JSONL (``--out``).

    python3 scripts/bench_batch.py --out $OUT/bench_batch.jsonl                      # everything, H200
    python3 scripts/bench_batch.py --parts magicdec --magic-batches 16 --magic-contexts 32768
    python3 scripts/bench_batch.py --smoke                                          # tiny shapes, any device
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fast import step_weight_bytes  # noqa: E402  (the sibling script: weight bytes a step reads)

from specdec.benchutil import copy_bandwidth, cuda_time_ms, random_model  # noqa: E402
from specdec.fast.model import as_fast_model, run_step  # noqa: E402

SMOKE_SHAPE = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)


def timed_ms(fn, dev) -> float:
    if dev.type == "cuda":
        return cuda_time_ms(fn, reps=20)
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3 * 1e3


def kv_bytes_per_token(fm) -> int:
    c = fm.config
    return 2 * c.num_layers * fm.local_kv_heads * c.head_dim * torch.finfo(fm.dtype).bits // 8


def filled_cache(fm, batch: int, context: int, extra: int, name: str):
    """A [batch] cache of ``context`` random rows per row (room for ``extra`` more), or None if it does not fit."""
    try:
        cache = fm.ensure_cache(batch, context + extra, name=name)
    except ValueError as e:   # the library's memory check (names the largest batch that fits)
        print(f"  skipped B={batch} context={context}: {e}", flush=True)
        return None
    for t in (cache.k, cache.v):
        for layer in t:           # layer by layer: no full-size temporary
            layer.normal_(0, 0.5)
    cache.set_length(context)
    return cache


def step_ms(fm, cache, m: int) -> float:
    """One M-row pass (a chain of M nodes per row) against ``cache``, per-row positions from its length."""
    b, dev = cache.k.shape[1], fm.device
    tokens = torch.randint(0, fm.config.vocab_size, (b, m), device=dev)
    positions = cache.length + torch.arange(m, device=dev)[None].expand(b, m)
    mask = torch.ones(m, m, dtype=torch.bool, device=dev).tril()[None].expand(b, m, m).contiguous()
    return timed_ms(lambda: run_step(fm, cache, tokens, positions, mask), dev)


def part_vanilla(fm, args, bw, rows_out):
    wbytes, kvb = step_weight_bytes(fm), kv_bytes_per_token(fm)
    table = []
    for ctx in args.contexts:
        for b in args.batches:
            cache = filled_cache(fm, b, ctx, 8, "main")
            if cache is None:
                table.append([b, ctx, "does not fit", "", "", ""])
                continue
            ms = step_ms(fm, cache, 1)
            moved = wbytes + b * ctx * kvb
            r = dict(part="vanilla", batch=b, context=ctx, step_ms=ms, tokens_per_s=b / ms * 1e3, bytes=moved,
                     pct_copy_bw=100 * moved / (ms / 1e3) / bw)
            rows_out.append(r)
            print(json.dumps(r), flush=True)
            table.append([b, ctx, f"{ms:.3f}", f"{r['tokens_per_s']:.0f}", f"{moved / 1e9:.2f}", f"{r['pct_copy_bw']:.0f}%"])
            del cache                    # no reference left (FastModel.drop_caches): the next size's check sees it free
            fm.drop_caches()
    return tabulate(table, headers=["B", "context", "step ms", "tokens/s", "GB moved", "% copy BW"], tablefmt="github")


def part_magicdec(fm, args, bw, rows_out):
    from specdec.fast import kernels as K
    from specdec.shared.streaming import streaming_rows

    gamma, sinks, window = args.gamma, args.sink_tokens, args.window
    floor_ms = step_weight_bytes(fm) / bw * 1e3
    table = []
    for ctx in args.magic_contexts:
        for b in args.magic_batches:
            main = filled_cache(fm, b, ctx, gamma + 8, "main")
            if main is None:
                table.append([b, ctx] + ["does not fit"] + [""] * 7)
                continue
            scratch = fm.ensure_cache(b, sinks + window + gamma + 1, name="magicdec_batch")
            dev = fm.device
            view = streaming_rows(ctx, sinks, window, dev)
            width = view.numel()
            n_layers, _, hkv, _, d = main.k.shape
            idx = view[None, None, None, :, None].expand(n_layers, b, hkv, width, d)

            def gather():
                scratch.k[:, :, :, :width] = torch.gather(main.k, 3, idx)
                scratch.v[:, :, :, :width] = torch.gather(main.v, 3, idx)

            gather()
            scratch.set_length(width)
            t_gather = timed_ms(gather, dev)
            t_step = step_ms(fm, main, 1)
            t_draft = step_ms(fm, scratch, 1)
            t_verify = step_ms(fm, main, gamma + 1)
            src = (ctx + torch.arange(gamma + 1, device=dev, dtype=torch.int32))[None].expand(b, gamma + 1).contiguous()
            dst = torch.full((b,), ctx, dtype=torch.int32, device=dev)
            n_acc = torch.full((b,), gamma + 1, dtype=torch.int32, device=dev)
            t_compact = timed_ms(lambda: K.compact_kv(main.k, main.v, src, dst, n_accept=n_acc), dev)
            t_round = t_gather + gamma * t_draft + t_verify + t_compact
            r = dict(part="magicdec", batch=b, context=ctx, gamma=gamma, sink_tokens=sinks, window=window,
                     step_ms=t_step, draft_step_ms=t_draft, gather_ms=t_gather, verify_ms=t_verify, compact_ms=t_compact,
                     round_ms=t_round, efficiency=t_step / t_round, round_in_steps=t_round / t_step,
                     draft_floor_ms=floor_ms)
            rows_out.append(r)
            print(json.dumps(r), flush=True)
            table.append([b, ctx, f"{t_step:.2f}", f"{t_draft:.2f} ({t_draft / floor_ms:.2f}x floor)", f"{t_gather:.3f}",
                          f"{t_verify:.2f}", f"{t_compact:.3f}", f"{t_round:.2f}", f"{t_round / t_step:.2f}",
                          f"{t_step / t_round:.2f}"])
            del main, scratch, idx
            fm.drop_caches()
    return tabulate(table, headers=["B", "context", "vanilla step ms", "draft step ms", "gather ms", f"verify {gamma + 1} ms",
                                    "compact ms", "round ms", "round / step", "t_step / t_round"], tablefmt="github")


def _rows_together(call, capture: bool = True, fuse: bool = True):
    """``call()`` with the GLIDE rows drafting together (fast/glide/batch.py's batched rounds: where every row
    drafts the full tree one CUDA graph of the whole greedy round, or with ``fuse=False`` of the draft alone, or
    with ``capture=False`` all eager; the default drafts the rows one after another): the A/B of the four."""
    import specdec.fast.glide.batch as gbatch
    from specdec.fast.glide.drafter import FastGlideDrafter

    saved = FastGlideDrafter.batch_rounds, gbatch.CAPTURE, gbatch.FUSE
    FastGlideDrafter.batch_rounds, gbatch.CAPTURE, gbatch.FUSE = True, capture, fuse
    try:
        return call()
    finally:
        FastGlideDrafter.batch_rounds, gbatch.CAPTURE, gbatch.FUSE = saved


def part_finished(fm, args, bw, rows_out):
    table = []
    for ctx in args.contexts:
        for b in args.finished_batches:
            half_b = b // 2
            for m in args.finished_m:
                full = filled_cache(fm, b, ctx, m + 8, "main")
                half = filled_cache(fm, half_b, ctx, m + 8, "half") if full is not None else None
                if full is None or half is None:
                    table.append([b, ctx, m, "does not fit", "", "", "", ""])
                    full = half = None
                    fm.drop_caches()
                    continue
                t_all = step_ms(fm, full, m)
                full.length_t[half_b:] = 0               # the finished half: masked dummies reading no prefix
                t_masked = step_ms(fm, full, m)
                t_half = step_ms(fm, half, m)

                def compact():   # the running rows' verified prefix into the smaller cache (every layer)
                    half.k[:, :, :, :ctx].copy_(full.k[:, :half_b, :, :ctx])
                    half.v[:, :, :, :ctx].copy_(full.v[:, :half_b, :, :ctx])

                t_copy = timed_ms(compact, fm.device)
                saving = t_masked - t_half
                r = dict(part="finished", batch=b, context=ctx, m=m, all_running_ms=t_all, half_masked_ms=t_masked,
                         half_alone_ms=t_half, compact_copy_ms=t_copy,
                         pays_after_steps=(t_copy / saving) if saving > 0 else None)
                rows_out.append(r)
                print(json.dumps(r), flush=True)
                table.append([b, ctx, m, f"{t_all:.3f}", f"{t_masked:.3f}", f"{t_half:.3f}", f"{t_copy:.3f}",
                              f"{r['pays_after_steps']:.1f}" if saving > 0 else "never"])
                del full, half
                fm.drop_caches()
    return tabulate(table, headers=["B", "context", "M", "all running ms", "half masked ms", "B/2 alone ms",
                                    "compaction copy ms", "compaction pays after (steps)"], tablefmt="github")


def _embedded_methods(args):
    """``(prompts, calls)`` of the methods and compaction parts: the first prompts of ``--bench`` (each cut to its
    last ``--max-prompt-tokens``) and every plain decoder on the embedded model (bf16 on CUDA, fp32 on the CPU) as
    ``call(prompts, **kw) -> GenerationResult``."""
    import specdec.fast as fast
    from specdec.bench import load_questions
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    target = fast.load_model(args.model, dtype=dtype, device=str(dev))
    glide = fast.load_glide(args.glide, target)
    draft = fast.load_model(args.draft, dtype=dtype, device=str(dev))
    tok = load_tokenizer(args.model)
    questions = load_questions(args.bench, 0, max(args.method_batches))
    prompts = [encode_prompt(tok, q["turns"][0])[-args.max_prompt_tokens:] for q in questions]
    calls = {
        "vanilla": lambda p, **kw: fast.vanilla_generate(target, p, None, **kw),
        "speculative": lambda p, **kw: fast.speculative_generate(target, draft, p, None, **kw),
        "spec": lambda p, **kw: fast.spec_generate(target, glide, p, None, **kw),
        "tree_spec": lambda p, **kw: fast.tree_spec_generate(target, glide, p, None, **kw),
        "tree_spec (4, 8, 8, 4)": lambda p, **kw: fast.tree_spec_generate(target, glide, p, None, tree_shape=(4, 8, 8, 4), **kw),
        "logitspec": lambda p, **kw: fast.logitspec_generate(target, p, None, **kw),
        "magicdec": lambda p, **kw: fast.magicdec_generate(target, p, None, **kw),
        "pld": lambda p, **kw: fast.pld_generate(target, p, None, **kw),
    }
    return prompts, calls


def _chosen(calls: dict, names: list[str] | None, always: str | None = None) -> dict:
    """The entries of ``calls`` that ``--methods`` names (all when it names none), plus ``always`` (the baseline);
    an unknown name stops the run with the choices."""
    if not names:
        return calls
    unknown = sorted(set(names) - set(calls))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(calls)}")
    return {name: call for name, call in calls.items() if name == always or name in names}


def part_methods(args, rows_out):
    prompts, plain = _embedded_methods(args)
    calls = {
        **{name: plain[name] for name in ("vanilla", "speculative", "spec", "tree_spec")},
        "tree_spec rows together": lambda p, **kw: _rows_together(lambda: plain["tree_spec"](p, **kw)),
        "tree_spec rows together, draft graph": lambda p, **kw: _rows_together(lambda: plain["tree_spec"](p, **kw),
                                                                               fuse=False),
        "tree_spec rows together eager": lambda p, **kw: _rows_together(lambda: plain["tree_spec"](p, **kw),
                                                                        capture=False),
        "tree_spec (4, 8, 8, 4) rows together": lambda p, **kw: _rows_together(
            lambda: plain["tree_spec (4, 8, 8, 4)"](p, **kw)),
        "tree_spec (4, 8, 8, 4)": plain["tree_spec (4, 8, 8, 4)"],
        "spec rows together": lambda p, **kw: _rows_together(lambda: plain["spec"](p, **kw)),
        **{name: plain[name] for name in ("logitspec", "magicdec", "pld")},
    }
    calls = _chosen(calls, args.methods, always="vanilla")
    table = []
    kw = dict(max_gen_len=args.max_new_tokens, eos_id=[])
    for b in args.method_batches:
        batch = prompts[:b]
        base = None
        for name, call in calls.items():
            call(batch, **kw)                                   # warm-up: compilation, graph capture
            res = call(batch, **kw)
            tps = sum(res.row_lengths) / res.elapsed_time
            if name == "vanilla":
                base = (res, tps)
            same = torch.equal(res.output_ids, base[0].output_ids)
            r = dict(part="methods", batch=b, method=name, tokens_per_s=tps, speedup=tps / base[1], tau=res.tau,
                     same_as_vanilla=same, elapsed_s=res.elapsed_time)
            rows_out.append(r)
            print(json.dumps(r), flush=True)
            table.append([b, name, f"{tps:.0f}", f"{tps / base[1]:.2f}x", f"{res.tau:.2f}", same])
    return tabulate(table, headers=["B", "method", "tokens/s", "vs batched vanilla", "tau", "rows == vanilla"], tablefmt="github")


def _no_compaction(call):
    """``call()`` with the fast engine's batch compaction off: every round keeps the batch's width, finished rows
    masked (the A/B of :func:`part_compaction`)."""
    import specdec.fast.engine as engine

    saved = engine.compacted_width
    engine.compacted_width = lambda running, width: width
    try:
        return call()
    finally:
        engine.compacted_width = saved


def part_compaction(args, rows_out):
    prompts, plain = _embedded_methods(args)
    calls = {name: plain[name] for name in ("speculative", "spec", "tree_spec", "logitspec", "magicdec", "pld")}
    calls = _chosen(calls, args.methods)
    table = []
    kw = dict(max_gen_len=args.max_new_tokens)      # eos_id None: the model's own EOS ends a row
    for b in args.method_batches:
        if b < 2:
            continue
        batch = prompts[:b]
        for name, call in calls.items():
            legs = {}
            for leg, run in (("compacted", lambda: call(batch, **kw)), ("masked", lambda: _no_compaction(lambda: call(batch, **kw)))):
                run()                                   # warm-up: compilation, graph capture (every width)
                res = run()
                legs[leg] = (res, sum(res.row_lengths) / res.elapsed_time)
            (rc, tc), (rm, tm) = legs["compacted"], legs["masked"]
            early = sum(1 for n in rc.row_lengths if n < args.max_new_tokens)
            same = torch.equal(rc.output_ids, rm.output_ids)
            r = dict(part="compaction", batch=b, method=name, compacted_tokens_per_s=tc, masked_tokens_per_s=tm,
                     ratio=tc / tm, rows_stopped_early=early, rows=b, tau=rc.tau, same_rows=same,
                     compacted_elapsed_s=rc.elapsed_time, masked_elapsed_s=rm.elapsed_time)
            rows_out.append(r)
            print(json.dumps(r), flush=True)
            table.append([b, name, f"{early}/{b}", f"{tm:.0f}", f"{tc:.0f}", f"{tc / tm:.2f}x", f"{rc.tau:.2f}", same])
    return tabulate(table, headers=["B", "method", "rows stopped early", "masked tokens/s", "compacted tokens/s",
                                    "compacted / masked", "tau", "rows identical"], tablefmt="github")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="vanilla,magicdec,finished,methods",
                    help="comma-separated parts to run (module docstring): vanilla, magicdec, finished, methods, "
                         "compaction")
    ap.add_argument("--shape", default="llama3-8b", help="random-weight shape of the vanilla and magicdec parts")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64], help="vanilla part: batch sizes")
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192],
                    help="vanilla and finished parts: cached tokens per row")
    ap.add_argument("--magic-batches", nargs="+", type=int, default=[1, 8, 16, 32], help="magicdec part: batch sizes")
    ap.add_argument("--magic-contexts", nargs="+", type=int, default=[8192, 32768],
                    help="magicdec part: cached tokens per row")
    ap.add_argument("--gamma", type=int, default=3, help="magicdec part: draft steps per round")
    ap.add_argument("--sink-tokens", type=int, default=4, help="magicdec part: StreamingLLM sink tokens of the draft cache")
    ap.add_argument("--window", type=int, default=256, help="magicdec part: StreamingLLM window of the draft cache")
    ap.add_argument("--finished-batches", nargs="+", type=int, default=[8, 32],
                    help="finished part: batch sizes (half the rows finished)")
    ap.add_argument("--finished-m", nargs="+", type=int, default=[1, 4, 32],
                    help="finished part: tokens per row and pass (1 = a step, gamma + 1 = a chain, a tree's size)")
    ap.add_argument("--method-batches", nargs="+", type=int, default=[1, 8, 32], help="methods part: batch sizes")
    ap.add_argument("--methods", nargs="+", default=None, help="methods part: only these rows (vanilla always runs: the base)")
    ap.add_argument("--model", default="default", help="methods part: the target (embedded name or HF dir)")
    ap.add_argument("--glide", default="default-glide", help="methods part: the GLIDE draft")
    ap.add_argument("--draft", default="default-draft", help="methods part: the draft LM of speculative decoding")
    ap.add_argument("--bench", default="stdlib_code", help="methods part: the prompt set (as specdec bench --bench)")
    ap.add_argument("--max-prompt-tokens", type=int, default=1024, help="methods part: keep each prompt's last N tokens")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="methods part: new tokens per row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda when available")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and sizes (checks the script runs, any device)")
    ap.add_argument("--out", default="runs/bench_batch.jsonl", help="JSONL of every measured row")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = set(parts) - {"vanilla", "magicdec", "finished", "methods", "compaction"}
    if bad:
        ap.error(f"--parts takes vanilla, magicdec, finished, methods, compaction; got {sorted(bad)}")
    if args.smoke:
        args.shape, args.batches, args.contexts = SMOKE_SHAPE, [1, 3], [64]
        args.magic_batches, args.magic_contexts, args.window, args.gamma = [1, 3], [96], 16, 2
        args.method_batches, args.max_new_tokens, args.max_prompt_tokens = [1, 2], 8, 64
        args.finished_batches, args.finished_m = [4], [1, 3]
    dev = torch.device(args.device)
    rows_out, tables = [], []
    if dev.type == "cuda":
        bw = copy_bandwidth(dev)
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    else:
        bw = 20e9   # nominal (a CPU run only checks that the script works)
    if {"vanilla", "magicdec", "finished"} & set(parts):
        fm = as_fast_model(random_model(args.shape, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                                        device=str(dev)))
        if "vanilla" in parts:
            tables.append(("batched vanilla step", part_vanilla(fm, args, bw, rows_out)))
        if "magicdec" in parts:
            tables.append((f"MagicDec round (gamma {args.gamma}, {args.sink_tokens} sinks + {args.window} window)",
                           part_magicdec(fm, args, bw, rows_out)))
        if "finished" in parts:
            tables.append(("a finished row: masked vs the batch compacted", part_finished(fm, args, bw, rows_out)))
        del fm
    if "methods" in parts:
        tables.append(("every method on the embedded model", part_methods(args, rows_out)))
    if "compaction" in parts:
        tables.append(("finished rows end to end: the batch compacted vs masked (embedded model, its own EOS)",
                       part_compaction(args, rows_out)))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for r in rows_out:
            f.write(json.dumps(r) + "\n")
    for title, t in tables:
        print(f"\n{title} ({args.device}, copy bandwidth {bw / 1e12:.2f} TB/s)\n{t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
