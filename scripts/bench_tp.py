#!/usr/bin/env python3
"""Issue 23's benchmark: tensor parallelism over ``torch.distributed`` on random-weight big shapes.

Launched once on N GPUs of one host (NVLink multicast off, as on the lent machines)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 scripts/bench_tp.py --out $OUT/bench_tp.jsonl
    torchrun --nproc-per-node 2 scripts/bench_tp.py --smoke        # CPU, gloo, tiny shapes (a minute)

For each shape in ``--shapes`` (default the Llama-3-8B shape, then a Llama-3-70B-shaped model: 80 layers,
hidden 8192, 64/8 heads, MLP 28672, 128k vocabulary -- 140 GB in bf16, so only at TP >= 2) and each TP
degree in ``--degrees`` that the shape fits (TP = 1 runs on rank 0 alone while the others wait), at
``--context`` cached tokens and batch 1, in CUDA-graph replays as the decoders run them:

* ``step``: one vanilla decode step (M = 1): ms, tokens/s, and the bytes one rank reads (its weight slices
  + its KV heads' cache) over that rank's measured copy bandwidth -- "% of aggregate copy bandwidth";
* ``verify69``: one verification of the default 69-node tree (4, 16, 16, 16, 16) and its cost over the step;
* ``glide``: the greedy GLIDE tree round as the engine runs it (``fused_round``: draft + verification +
  acceptance in one graph, one read-back; a random GLIDE layer sharded like the target) and the round
  efficiency ``t_step / t_round`` (the speedup is tau times it);
* ``agree``: greedy vanilla tokens (``--agree-tokens`` per prompt: four code prompts for the embedded model, a
  fixed random prompt for random weights) at this degree against
  TP = 1's (positions equal, first divergence); bitwise equality across degrees is not promised (the
  row-parallel sums are added in another order).

Every rank builds its slices of the random weights layer by layer on its own GPU (a full layer, cut by
:func:`specdec.fast.tp.shard_weights`, freed): the full model is never held anywhere. A part that raises is
recorded as an error row and the run goes on (the ranks agree on the failure first, so none waits
forever). Rank 0 prints the table and writes JSONL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fast import default_tree, glide_round_ms, step_weight_bytes  # noqa: E402

from specdec.benchutil import MODEL_SHAPES, copy_bandwidth, cuda_time_ms  # noqa: E402
from specdec.fast.engine import TreeTensors  # noqa: E402
from specdec.fast.model import FastModel, run_step  # noqa: E402
from specdec.fast.tp import TensorParallel, init_tensor_parallel, shard_weights  # noqa: E402
from specdec.shared.config import ModelConfig  # noqa: E402

SHAPES = {
    "llama3-8b": MODEL_SHAPES["llama3-8b"],
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192),
    "default": None,   # the embedded default model (real weights, loaded per rank with load_model(tp=))
    "smoke": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024),
}


def build_model(shape: str, tp: TensorParallel | None, dtype: torch.dtype, device, graphs: bool) -> FastModel:
    """The embedded default model (``shape == "default"``) or a random one of ``shape``, this rank's slice."""
    if shape == "default":
        from specdec.fast import load_model

        fm = load_model("default", dtype=dtype, device=str(device), tp=tp)
    else:
        fm = random_fast_model(ModelConfig(**SHAPES[shape]), tp, dtype, device)
    fm.use_graphs = fm.use_graphs and graphs
    return fm


def random_fast_model(cfg: ModelConfig, tp: TensorParallel | None, dtype: torch.dtype, device, seed: int = 0) -> FastModel:
    """A FastModel with random fused weights, built one layer at a time and cut to ``tp``'s slice on ``device``
    (every rank draws the same full layer from the same seed, so the slices form one model)."""
    g = torch.Generator(device=device).manual_seed(seed)
    d, h, f = cfg.head_dim, cfg.hidden_size, cfg.intermediate_size

    def rnd(*shape):
        return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def cut(w):
        return w if tp is None else shard_weights(w, cfg, tp)

    out = cut({"embed": rnd(cfg.vocab_size, h), "lm_head": rnd(cfg.vocab_size, h),
               "norm": torch.ones(h, dtype=dtype, device=device)})
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        out.update(cut({p + "wqkv": rnd((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h), p + "wo": rnd(h, cfg.num_heads * d),
                        p + "w13": rnd(2 * f, h), p + "w2": rnd(h, f), p + "attn_norm": torch.ones(h, dtype=dtype, device=device),
                        p + "mlp_norm": torch.ones(h, dtype=dtype, device=device)}))
    fm = FastModel(cfg, out, source=f"random:{cfg.num_layers}L", tp=tp)
    fm.use_graphs = fm.device.type == "cuda"
    return fm


def time_ms(fn, dev) -> float:
    if dev.type == "cuda":
        return cuda_time_ms(fn, reps=20)
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fm: FastModel, context: int, parts: list[str], bw: float, glide: bool) -> dict:
    """step / verify69 / GLIDE round of ``fm`` at ``context`` cached rows (the cache's values do not matter)."""
    dev, c = fm.device, fm.config
    tree = default_tree()
    cache = fm.ensure_cache(1, context + 256)
    cache.set_length(context)
    one = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    pos = torch.full((1, 1), context, dtype=torch.long, device=dev)
    row: dict = {}
    ms_step = time_ms(lambda: run_step(fm, cache, tok, pos, one), dev)
    kv_bytes = 2 * c.num_layers * fm.local_kv_heads * c.head_dim * context * fm.w["embed"].element_size()
    moved = step_weight_bytes(fm) + kv_bytes
    row.update(step_ms=ms_step, tok_s=1e3 / ms_step, rank_bytes_gb=moved / 1e9, bw_frac=moved / (ms_step / 1e3) / bw)
    if "verify69" in parts:
        tt = TreeTensors.get(tree, tree.size, dev)
        toks = torch.zeros(1, tree.size, dtype=torch.long, device=dev)
        ms_tree = time_ms(lambda: run_step(fm, cache, toks, (tt.depth + context)[None], tt.mask), dev)
        row.update(verify69_ms=ms_tree, verify69_over_step=ms_tree / ms_step)
        if glide and "glide" in parts:
            g = glide_round_ms(fm, cache, tree, ms_tree) if dev.type == "cuda" else {}
            if g:
                row.update(glide_fused_round_ms=g["glide_fused_round_ms"], efficiency=ms_step / g["glide_fused_round_ms"])
    fm.caches.clear()
    fm.graphs.clear()
    return row


TEXT_PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef read_config(path):", "class Stack:\n    def __init__(self):",
                "def quicksort(items):\n    if len(items) <= 1:"]


def greedy_tokens(fm: FastModel, n: int, text: bool) -> list[int]:
    """Greedy vanilla tokens, ``n`` per prompt, concatenated: the code prompts TEXT_PROMPTS through the embedded
    model's tokenizer (``text``) or one fixed random 64-token prompt (random weights have no text)."""
    import specdec.fast as fast
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    if text:
        tok = load_tokenizer("default")
        prompts = [torch.tensor([encode_prompt(tok, t)]) for t in TEXT_PROMPTS]
    else:
        prompts = [torch.randint(0, fm.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(7))]
    out = []
    for ids in prompts:
        out += fast.vanilla_generate(fm, ids, ids.shape[1], max_gen_len=n, eos_id=[]).output_ids[0].tolist()
    fm.caches.clear()
    fm.graphs.clear()
    return out


def agreed(ok: bool, dev) -> bool:
    """True on every rank iff ``ok`` on every rank (one all-reduce; a no-op without a process group)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1], device=dev)
    dist.all_reduce(flag)
    return int(flag) == 0


def run_case(shape: str, degree: int, world: int, rank: int, args, bw: float, base_tokens: dict, dev, dtype) -> dict:
    """One (shape, TP degree) on ranks < degree; the others wait at the barrier. Returns rank 0's row."""
    row = dict(shape=shape, tp=degree, context=args.context)
    ok, err = True, ""
    if rank < degree:
        try:
            tp = None if degree == 1 else (TensorParallel(rank=rank, world=degree) if degree == world else None)
            if degree not in (1, world):
                raise ValueError(f"TP = {degree} needs a sub-group; run with --nproc-per-node {degree}")
            t0 = time.perf_counter()
            fm = build_model(shape, tp, dtype, dev, graphs=args.backend != "gloo")
            row["build_s"] = time.perf_counter() - t0
            with torch.inference_mode():
                if "step" in args.parts:
                    row.update(measure(fm, args.context, args.parts, bw, glide=True))
                if "agree" in args.parts and args.agree_tokens:
                    toks = greedy_tokens(fm, args.agree_tokens, text=shape == "default")
                    if degree == 1:
                        base_tokens[shape] = toks
                    elif shape in base_tokens:
                        ref = base_tokens[shape]
                        same = [a == b for a, b in zip(toks, ref)]
                        row.update(agree_frac=sum(same) / len(ref),
                                   first_divergence=same.index(False) if not all(same) else None)
            del fm
        except Exception as e:  # recorded; the other ranks learn of it below
            ok, err = False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            traceback.print_exc()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if dist.is_initialized():
        dist.barrier()
    if not agreed(ok, dev):
        row["error"] = err or "failed on another rank"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama3-70b"], choices=sorted(SHAPES))
    ap.add_argument("--degrees", nargs="+", type=int, default=None, help="TP degrees (default: 1 and the world size)")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens when a step is timed (default 1024)")
    ap.add_argument("--parts", nargs="+", default=["step", "verify69", "glide", "agree"])
    ap.add_argument("--agree-tokens", type=int, default=32, help="greedy tokens compared across TP degrees (0 = skip)")
    ap.add_argument("--out", default="runs/bench_tp.jsonl")
    ap.add_argument("--smoke", action="store_true", help="CPU / any device: the tiny shape, fp32, context 64")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--backend", default=None, choices=["nccl", "gloo"],
                    help="collectives (default: nccl on CUDA, gloo on CPU); gloo on CUDA lets N ranks share ONE GPU for "
                         "the agreement part (no CUDA graphs: gloo cannot be captured; timings then mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        args.shapes, args.context = ["smoke"], 64
        os.environ.setdefault("TRITON_INTERPRET", "1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = init_tensor_parallel(world, backend=args.backend) if world > 1 else None
    rank = tp.rank if tp else 0
    dev = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" and not args.smoke else torch.float32)
    bw = copy_bandwidth(dev) if dev.type == "cuda" else 1e10
    degrees = args.degrees or sorted({1, world})
    meta = dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
                backend=dist.get_backend() if dist.is_initialized() else None,
                world=world, dtype=str(dtype).removeprefix("torch."), copy_bw_tbs=bw / 1e12,
                commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
    rows, base_tokens = [], {}
    for shape in args.shapes:
        cfg = ModelConfig(**SHAPES[shape]) if SHAPES[shape] else None
        for degree in degrees:
            bytes_per_rank = 0 if cfg is None else 2 * cfg.num_layers * (4 * cfg.hidden_size * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size) / degree
            if dev.type == "cuda" and bytes_per_rank > 0.85 * torch.cuda.get_device_properties(dev).total_memory:
                rows.append(dict(meta, shape=shape, tp=degree, error="skipped: does not fit one GPU at this degree"))
                continue
            row = dict(meta, **run_case(shape, degree, world, rank, args, bw, base_tokens, dev, dtype))
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"\n{meta['device']}, world {world}, {meta['dtype']}, context {args.context}, copy BW {bw / 1e12:.2f} TB/s per GPU, commit {meta['commit']}")

        def fmt(r, k, spec):
            return format(r[k], spec) if r.get(k) is not None else "-"
        print(tabulate([[r["shape"], r["tp"], fmt(r, "step_ms", ".3f"), fmt(r, "tok_s", ".1f"), fmt(r, "bw_frac", ".0%"),
                         fmt(r, "verify69_ms", ".3f"), fmt(r, "verify69_over_step", ".2f"), fmt(r, "glide_fused_round_ms", ".3f"),
                         fmt(r, "efficiency", ".2f"), fmt(r, "agree_frac", ".3f"), str(r.get("first_divergence", "-")),
                         r.get("error", "")] for r in rows],
                       headers=["shape", "TP", "step ms", "tok/s", "% BW", "verify69 ms", "v69/step", "GLIDE round ms",
                                "step/round", "agree", "1st diff", "error"]))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
