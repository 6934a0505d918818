#!/usr/bin/env python3
"""Fast-path step costs on big model shapes with random bf16 weights (speed does not depend on values).

For each shape (Llama-3-8B: 128k vocabulary, GQA 32/8; Vicuna-7B: 32k vocabulary, MHA 32/32) and
context (1k, 32k; 128k for Llama-3-8B) it measures, in one process:

* chunked prefill time and peak GPU memory;
* one vanilla decode step (M = 1, CUDA-graph replay): ms, tokens/s, bytes moved per step
  (every weight except the embedding table, of which one row; plus the KV cache read -- see
  :func:`step_weight_bytes`), and that bandwidth as a fraction of the device copy bandwidth
  measured in the same run;
* one verification step of the default 69-node tree (``tree_shape=(4, 16, 16, 16, 16)``), and its
  cost relative to the vanilla step;
* one ``tree_spec_generate`` round broken down (``--glide``, a random GLIDE draft): the draft's
  catch-up + root + beam levels, the 69-node verification, acceptance + KV compaction, and the
  efficiency ``t_vanilla_step / t_round`` (the speedup is tau times this); and the whole greedy round as
  the engine runs it (``fused_round``: draft + verification + acceptance in one CUDA graph, one read-back);
  with ``--draft-vocab 0 32768`` once per draft vocabulary size (a truncated GLIDE vocabulary, issue 20);
* optionally (``--hf``) ``transformers`` eager ``generate`` tokens/s on the same weights at 1k.

Prints a table and writes JSONL (``--out``).

    python3 scripts/bench_fast.py --out runs/bench_fast.jsonl [--shapes llama3-8b vicuna-7b] [--contexts 1024 32768] [--hf]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tabulate import tabulate

from specdec.fast.engine import TreeTensors
from specdec.fast.model import as_fast_model, prefill, run_step
from specdec.benchutil import MODEL_SHAPES, copy_bandwidth, cuda_time_ms, random_model
from specdec.shared.tree import Tree


def default_tree() -> Tree:
    """The topology of a [4, 16, 16, 16, 16] beam tree (which nodes are parents does not change the cost)."""
    parents = [-1] + [0] * 4
    prev = list(range(1, 5))
    for width in (16, 16, 16, 16):
        start = len(parents)
        parents += [prev[i % len(prev)] for i in range(width)]
        prev = list(range(start, start + width))
    return Tree.from_parents(parents)


def step_weight_bytes(fm) -> int:
    """Weight bytes one decode step really reads: every weight once, except the embedding table, of
    which a step reads one row (its lm_head, even when tied to the embedding, is read in full).
    Shared storages are counted once."""
    seen, total = set(), 0
    for name, t in fm.w.items():
        if name == "embed":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    emb = fm.w["embed"]
    if (emb.untyped_storage().data_ptr(), emb.storage_offset(), emb.numel()) not in seen:
        total += emb.shape[1] * emb.element_size()  # the one embedding row of the new token
    return total


def hf_generate_tps(model, ctx: int, new_tokens: int = 32) -> float:
    """transformers eager generate tokens/s (decode only) on the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                      head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                      max_position_embeddings=c.max_position_embeddings)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf = hf.to_empty(device="cuda").to(torch.bfloat16).eval()
    sd = {("model." + k if k != "lm_head.weight" else k): v for k, v in model.weights.items()}
    hf.load_state_dict(sd, strict=False, assign=True)
    ids = torch.randint(0, c.vocab_size, (1, ctx), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        torch.cuda.synchronize()
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    del hf
    return (new_tokens - 1) / max(total - t_prefill, 1e-9)


def random_draft_vocab(vocab_size: int, n: int, seed: int = 2) -> torch.Tensor:
    """A draft vocabulary of ``n`` distinct target ids (sorted), as ``specdec draft-vocab`` would write one; for
    timing only (which ids does not change the cost)."""
    if not 1 <= n <= vocab_size:
        raise ValueError(f"--draft-vocab sizes must be in [1, {vocab_size}] (0 = the full vocabulary), got {n}")
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def glide_drafter(fm, cache, draft_vocab: int = 0):
    """A random GLIDE draft for ``fm`` caught up on ``cache``'s context: ``(drafter, state, draft_round)``,
    where ``draft_round()`` runs one typical round's draft (catch up on the root, then the beam levels).
    ``draft_vocab`` > 0: the draft proposes only that many target ids (a truncated draft vocabulary, its
    output layer those rows of the target's lm_head)."""
    from specdec.fast.glide import FastGlideDrafter, as_fast_glide
    from specdec.ref.engine import RoundState
    from specdec.shared.glide import init_glide_weights, with_draft_vocab
    from specdec.shared.sampling import SamplingParams

    glide = init_glide_weights(fm.config, seed=1, dtype=fm.dtype, device=fm.device)
    if draft_vocab:
        glide = with_draft_vocab(glide, random_draft_vocab(fm.config.vocab_size, draft_vocab))
    glide = as_fast_glide(glide, tp=fm.tp)
    drafter = FastGlideDrafter(fm, glide, (4, 16, 16, 16, 16))
    tokens = torch.randint(0, fm.config.vocab_size, (cache.length + 1,), generator=torch.Generator().manual_seed(1)).tolist()
    state = RoundState(tokens, fm, cache, None, SamplingParams(), None, budget=1000)
    drafter.propose(state)  # catches up on the whole prompt once

    def draft_round():
        drafter.processed -= 1
        drafter.cache.n -= 1
        drafter.propose(state)

    return drafter, state, draft_round


def glide_round_ms(fm, cache, tree: Tree, ms_verify: float, draft_vocab: int = 0) -> dict:
    """Time the phases of one GLIDE tree round at the current cache length (random GLIDE weights; ``draft_vocab``
    as in :func:`glide_drafter`)."""
    from specdec.fast.engine import accept_and_compact
    from specdec.fast.graphs import CapturedFn

    dev = fm.device
    L = cache.length
    drafter, state, draft_round = glide_drafter(fm, cache, draft_vocab)
    ms_draft = cuda_time_ms(draft_round, reps=20)
    tt = TreeTensors.get(tree, tree.size, dev)
    logits = torch.randn(tree.size, fm.config.vocab_size, device=dev)
    toks = torch.randint(0, fm.config.vocab_size, (tree.size,), device=dev)
    # make a depth-4 path right so the compaction really moves rows
    for node in tree.path(60)[1:]:
        logits[tree.parents[node], toks[node]] = 1e4
    inputs = dict(logits=logits, node_tokens=toks, parents=tt.parents, depth=tt.depth, ancestor=tt.ancestor, valid=tt.valid)
    fn = CapturedFn(lambda **kw: accept_and_compact(cache, **kw), inputs)

    def accept_compact():  # what the engine does: one graph replay, one read-back
        fn(**inputs).tolist()
        cache.set_length(L)

    ms_accept = cuda_time_ms(accept_compact, reps=20)

    def fused_round():  # the engine's greedy round: draft + verify + accept in one graph, one read-back
        drafter.processed -= 1
        drafter.cache.n -= 1
        drafter.fused_round(state, tree.size)[0].tolist()
        cache.set_length(L)

    ms_fused = cuda_time_ms(fused_round, reps=20)
    return dict(glide_draft_ms=ms_draft, glide_accept_compact_ms=ms_accept,
                glide_round_ms=ms_draft + ms_verify + ms_accept, glide_fused_round_ms=ms_fused)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b", "vicuna-7b"], choices=sorted(MODEL_SHAPES))
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 32768])
    ap.add_argument("--long", type=int, default=131072, help="extra context for llama3-8b (0 = skip)")
    ap.add_argument("--hf", action="store_true", help="also time transformers eager generate at 1k")
    ap.add_argument("--glide", action="store_true", help="also break a GLIDE tree round down")
    ap.add_argument("--draft-vocab", nargs="+", type=int, default=[0], metavar="N",
                    help="with --glide: the GLIDE draft's vocabulary sizes to time, one round breakdown each (0 = the "
                         "full vocabulary; e.g. 0 32768 for issue 20's truncated-vocabulary A/B in one run)")
    ap.add_argument("--out", default="runs/bench_fast.jsonl")
    args = ap.parse_args()
    for shape in args.shapes:
        vocab = MODEL_SHAPES[shape]["vocab_size"]
        if any(not 0 <= n <= vocab for n in args.draft_vocab):
            ap.error(f"--draft-vocab sizes must be in [0, {vocab}] for {shape} (0 = the full vocabulary), got {args.draft_vocab}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"device {torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    tree = default_tree()
    rows = []
    with open(args.out, "w") as out, torch.inference_mode():
        for shape in args.shapes:
            model = random_model(shape, device="cuda")
            fm = as_fast_model(model)
            c = fm.config
            weight_bytes = step_weight_bytes(fm)
            contexts = list(args.contexts) + ([args.long] if shape == "llama3-8b" and args.long else [])
            for ctx in contexts:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                cache = fm.ensure_cache(1, ctx + 256)
                ids = torch.randint(0, c.vocab_size, (1, ctx), device=dev)
                torch.cuda.synchronize()
                t = time.perf_counter()
                prefill(fm, cache, ids, chunk_size=4096)
                torch.cuda.synchronize()
                t_prefill = time.perf_counter() - t
                L = cache.length
                one = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
                tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
                pos = torch.full((1, 1), L, dtype=torch.long, device=dev)
                ms_step = cuda_time_ms(lambda: run_step(fm, cache, tok, pos, one), reps=30)
                tt = TreeTensors.get(tree, tree.size, dev)
                toks = torch.zeros(1, tree.size, dtype=torch.long, device=dev)
                tpos = (tt.depth + L)[None]
                ms_tree = cuda_time_ms(lambda: run_step(fm, cache, toks, tpos, tt.mask), reps=30)
                kv_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * L * 2
                moved = weight_bytes + kv_bytes
                row = dict(shape=shape, context=ctx, prefill_s=t_prefill, step_ms=ms_step, tok_s=1e3 / ms_step,
                           bytes_per_step_gb=moved / 1e9, bw_frac=moved / (ms_step / 1e3) / bw,
                           verify69_ms=ms_tree, verify69_over_step=ms_tree / ms_step,
                           peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, copy_bw_tbs=bw / 1e12,
                           device=torch.cuda.get_device_name())
                if args.hf and ctx == min(args.contexts):
                    fm.drop_caches()
                    row["hf_generate_tok_s"] = hf_generate_tps(model, ctx)
                for n_vocab in (args.draft_vocab if args.glide else [None]):
                    r = dict(row)
                    if n_vocab is not None:   # one GLIDE round breakdown per draft vocabulary size
                        r["draft_vocab"] = n_vocab or c.vocab_size
                        r.update(glide_round_ms(fm, cache, tree, ms_tree, n_vocab))
                        r["efficiency"] = ms_step / r["glide_round_ms"]
                        r["efficiency_fused"] = ms_step / r["glide_fused_round_ms"]
                    rows.append(r)
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                    print(json.dumps(r), flush=True)
            fm.drop_caches()
            del fm, model
            torch.cuda.empty_cache()
    headers = ["shape", "context", "prefill s", "step ms", "tok/s", "GB/step", "% copy BW", "verify-69 ms", "69/1",
               "draft vocab", "draft ms", "accept+compact ms", "t_step/t_round", "fused round ms", "t_step/t_fused", "peak GiB", "HF tok/s"]
    table = [[r["shape"], r["context"], f"{r['prefill_s']:.2f}", f"{r['step_ms']:.2f}", f"{r['tok_s']:.1f}",
              f"{r['bytes_per_step_gb']:.2f}", f"{100 * r['bw_frac']:.0f}%", f"{r['verify69_ms']:.2f}",
              f"{r['verify69_over_step']:.2f}x", r.get("draft_vocab", "-"), f"{r.get('glide_draft_ms', float('nan')):.2f}",
              f"{r.get('glide_accept_compact_ms', float('nan')):.2f}", f"{r.get('efficiency', float('nan')):.2f}",
              f"{r.get('glide_fused_round_ms', float('nan')):.2f}", f"{r.get('efficiency_fused', float('nan')):.2f}",
              f"{r['peak_mem_gib']:.1f}",
              f"{r['hf_generate_tok_s']:.1f}" if "hf_generate_tok_s" in r else "-"] for r in rows]
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s on {torch.cuda.get_device_name()}")
    print(tabulate(table, headers=headers))


if __name__ == "__main__":
    main()
