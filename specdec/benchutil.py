"""Small measuring helpers for the benchmark scripts (never used by timed tests).

* :func:`copy_bandwidth` -- device copy bandwidth in bytes/s (read + write), measured now;
* :func:`cuda_time_ms` -- median milliseconds of a callable between CUDA events after warm-up;
* :func:`kernel_totals` -- ``torch.profiler`` GPU time per kernel name of a callable, per call;
* :data:`MODEL_SHAPES` -- the reference architectures (random weights: cost does not depend on values);
* :func:`random_model` -- a :class:`~specdec.shared.weights.Model` of such a shape with random weights
  created directly on the device (no checkpoint, no Hugging Face model);
* :func:`report` -- print a result table and write the records as JSONL;
* :func:`distinct_ngram_share` -- how repetitive a completion is (issue 21's distinct 4-gram measure);
* :func:`question_prompts` -- a prompt set's questions with their first turn tokenised for the embedded model;
* :func:`exactness_prompts` / :func:`fast_greedy_decoders` -- the prompts and the decoders of the GPU exactness
  test (``tests/fast/test_exact_dtypes.py``), shared with the probe that locates a divergence
  (``scripts/probes/exact_divergence.py``).
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from specdec.shared.config import ModelConfig
from specdec.shared.weights import Model, expected_shapes

__all__ = ["copy_bandwidth", "cuda_time_ms", "kernel_totals", "MODEL_SHAPES", "random_model", "report",
           "distinct_ngram_share", "question_prompts", "exactness_prompts", "fast_greedy_decoders"]


def report(rows: list[list], headers: list[str], records: list[dict], out: str | None) -> None:
    """Print ``rows`` as a GitHub table under ``headers``; write ``records`` to ``out`` (JSONL), if given."""
    import json
    import os

    from tabulate import tabulate

    print(tabulate(rows, headers=headers, tablefmt="github"))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


def kernel_totals(fn: Callable[[], object], reps: int = 5, warmup: int = 2, width: int = 70) -> tuple[float, list[list]]:
    """GPU kernel time of one ``fn()`` call, from ``torch.profiler`` over ``reps`` calls.

    Returns ``(total_ms, rows)`` with rows ``[kernel name (first `width` chars), launches per call,
    ms per call]``, largest first. Kernels inside CUDA-graph replays are listed one by one.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    agg: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        a = agg.setdefault(ev.name[:width], [0, 0.0])
        a[0] += 1
        a[1] += (ev.device_time if hasattr(ev, "device_time") else ev.cuda_time) / 1e3
    rows = sorted(([k, v[0] / reps, v[1] / reps] for k, v in agg.items()), key=lambda r: -r[2])
    return sum(r[2] for r in rows), rows


MODEL_SHAPES = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=131072 + 4096),
    "vicuna-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=32768 + 4096),
}


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``device``, counting read + write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps=reps)
    return 2 * nbytes / (ms / 1e3)


def cuda_time_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median time of ``fn()`` in milliseconds, measured with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def random_model(shape: str | dict, dtype: torch.dtype = torch.bfloat16, device: str = "cuda", seed: int = 0, std: float = 0.02) -> Model:
    """A model of a named shape (:data:`MODEL_SHAPES`) or config dict with random weights on ``device``."""
    cfg = ModelConfig(**(MODEL_SHAPES[shape] if isinstance(shape, str) else shape))
    g = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shp in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shp, dtype=dtype, device=device)
        else:
            weights[name] = (torch.randn(shp, generator=g, device=device, dtype=torch.float32) * std).to(dtype)
    if cfg.tie_word_embeddings:
        weights["lm_head.weight"] = weights["embed_tokens.weight"]
    return Model(cfg, weights, source=f"random:{shape if isinstance(shape, str) else 'custom'}")


def distinct_ngram_share(ids: list[int], n: int = 4) -> float:
    """Distinct n-grams / all n-grams of a token sequence (1.0: no n-gram repeats; a greedy loop drives it
    towards 0). Sequences shorter than ``n`` count as 1.0."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def question_prompts(bench: str = "stdlib_code", begin: int = 0, end: int | None = None) -> list[tuple[dict, torch.Tensor]]:
    """Questions ``[begin, end)`` of a prompt set, each with its first turn encoded by the embedded default
    model's tokenizer as ``input_ids`` [1, T] -- the prompts the CPU front-door probes decode."""
    from specdec.bench import load_questions
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer("default")
    return [(q, torch.tensor([encode_prompt(tok, q["turns"][0])])) for q in load_questions(bench, begin, end)]


def exactness_prompts(n: int = 20, prompt_tokens: int = 192, min_tokens: int = 64) -> list[torch.Tensor]:
    """The first ``n`` held-out stdlib code prompts of at least ``min_tokens`` tokens, each cut to its first
    ``prompt_tokens`` tokens, as ``[1, T]`` ids -- the prompts the exactness contract is checked on."""
    from specdec.bench import load_questions
    from specdec.shared.tokenizer import load_tokenizer

    tok = load_tokenizer("default")
    out = []
    for q in load_questions("stdlib_code"):
        ids = tok.encode(q["turns"][0])
        if len(ids) >= min_tokens:
            out.append(torch.tensor([ids[:prompt_tokens]]))
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"n={n}: only {len(out)} stdlib_code prompts have >= {min_tokens} tokens")
    return out


def fast_greedy_decoders(target, draft, glide) -> dict[str, Callable]:
    """Every fast speculative decoder of :data:`specdec.methods.METHODS` with its defaults, as
    ``name -> run(ids, kwargs)`` (a GenerationResult); ``target`` / ``draft`` are fast models, ``glide`` a fast
    GLIDE draft of ``target`` -- each decoder gets the one its table entry ``needs``."""
    import specdec.fast as fast
    from specdec.methods import METHODS

    drafts = {"draft": draft, "glide": glide}

    def runner(method):
        fn = getattr(fast, method.function)
        models = (target,) if method.needs is None else (target, drafts[method.needs])
        return lambda ids, kw: fn(*models, ids, ids.shape[1], **kw)

    return {name: runner(m) for name, m in METHODS.items() if name != "vanilla"}
