"""Fast plain decoding: static cache, chunked prefill, one CUDA-graph replay per token.

Must match :func:`specdec.ref.vanilla.vanilla_generate` token for token (greedy, fp32).
The loop keeps the next token on the device; the host reads it once per step only to check EOS.
Greedy under tensor parallelism (:mod:`specdec.fast.tp`) takes the argmax over the ranks' vocabulary
slices without gathering the logits.
``sampling="keyed"``: the token at position t of row b is the keyed choice (seed, b, t), exactly as
the reference (:func:`specdec.shared.keyed.sample_next`).

A batch (docs/design.md §11) takes every input form of :mod:`specdec.shared.batch`. Rows of equal
prompt length decode together in one static-cache batch; prompts of different lengths are decoded
one length group after another (the static cache keeps one length for all its rows), each row
keeping its own sequence id, so every row's tokens are the reference's.
"""

from __future__ import annotations

import time

import torch

from specdec.fast.model import FastModel, as_fast_model, prefill, run_step
from specdec.shared.batch import normalize_prompts
from specdec.shared.keyed import resolve_sampling, sample_next
from specdec.shared.result import GenerationResult, finalize_output, normalize_eos, sync
from specdec.shared.sampling import SamplingParams
from specdec.shared.validate import check_generator

__all__ = ["vanilla_generate"]


@torch.inference_mode()
def vanilla_generate(
    model,
    input_ids: torch.Tensor,
    prompt_length: int,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.vanilla_generate` (a batch of prompts of any lengths)."""
    fm: FastModel = as_fast_model(model)
    sp = SamplingParams(temperature, top_k, top_p, sampling, seed)
    batch = normalize_prompts(input_ids, prompt_length, max_gen_len, fm.config, device=fm.device)
    check_generator(generator)
    sp, generator = resolve_sampling(sp, generator, fm.device)
    eos = normalize_eos(eos_id, fm.config.eos_token_ids, fm.config.vocab_size)
    out: list[list[int]] = [[] for _ in range(batch.size)]
    num, elapsed, prefill_time = 0, 0.0, 0.0
    for n in sorted(set(batch.lengths)):  # one static-cache batch per prompt length
        rows = [b for b, m in enumerate(batch.lengths) if m == n]
        steps, e, pt = _decode_group(fm, torch.stack([batch.rows[b] for b in rows]), rows, max_gen_len, eos, sp, generator)
        for i, b in enumerate(rows):
            out[b] = [int(s[i]) for s in steps]
        num, elapsed, prefill_time = num + len(steps), elapsed + e, prefill_time + pt
    # Each row is cut after its first EOS (its group may have run on for other rows); one pass per token.
    rows_out = [finalize_output(o, [False] * len(o), eos, max_gen_len)[0] for o in out]
    return GenerationResult.from_batch(rows_out, [[False] * len(r) for r in rows_out], eos, max_gen_len, num, elapsed,
                                       prefill_time, [[1] * len(r) for r in rows_out])


def _decode_group(fm: FastModel, prompt: torch.Tensor, seq_ids: list[int], max_gen_len: int, eos: list[int],
                  sp: SamplingParams, generator) -> tuple[list[torch.Tensor], float, float]:
    """Decode prompts of one length [b, t] together; row i is keyed sampling's sequence ``seq_ids[i]``.
    Returns (one [b] token tensor per target pass, decode seconds, prefill seconds)."""
    eos_t = torch.tensor(eos, dtype=torch.long, device=fm.device)
    b, t = prompt.shape
    cache = fm.ensure_cache(b, t + max_gen_len + 1)

    t0 = time.perf_counter()
    logits = prefill(fm, cache, prompt)
    token = sample_next(logits, sp, generator, t, seq_ids=seq_ids)  # [B], the token at position t
    sync(fm.device)
    prefill_time = time.perf_counter() - t0
    generated = [token]
    done = torch.isin(token, eos_t)
    mask = torch.ones(b, 1, 1, dtype=torch.bool, device=fm.device)

    # Greedy under tensor parallelism: the argmax is taken across the ranks' vocabulary slices (one int64
    # key per row and rank exchanged) instead of gathering every rank's logits.
    sharded_argmax = fm.tp is not None and sp.greedy
    t1 = time.perf_counter()
    while len(generated) < max_gen_len and not bool(done.all()):  # one host sync per token (EOS check)
        pos = torch.full((b, 1), cache.length, dtype=torch.long, device=fm.device)
        logits = run_step(fm, cache, token[:, None], pos, mask, gather=not sharded_argmax)
        cache.set_length(cache.length + 1)
        if sharded_argmax:
            token = fm.tp.argmax(logits[:, -1], fm.config.vocab_size)
        else:
            token = sample_next(logits[:, -1], sp, generator, t + len(generated), seq_ids=seq_ids)
        generated.append(token)
        done |= torch.isin(token, eos_t)
    sync(fm.device)
    return generated, time.perf_counter() - t1, prefill_time
