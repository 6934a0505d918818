"""Fast plain decoding: static cache, chunked prefill, one CUDA-graph replay per token.

Must match :func:`specdec.ref.vanilla.vanilla_generate` token for token (greedy, fp32).
The loop keeps the next token on the device; the host reads it once per step only to check EOS.
``sampling="keyed"``: the token at position t of row b is the keyed choice (seed, b, t), exactly as
the reference (:func:`specdec.shared.keyed.sample_next`).
"""

from __future__ import annotations

import time

import torch

from specdec.fast.model import FastModel, as_fast_model, prefill, run_step
from specdec.shared.keyed import resolve_sampling, sample_next
from specdec.shared.result import GenerationResult, normalize_eos, sync
from specdec.shared.sampling import SamplingParams
from specdec.shared.validate import check_generator, check_prompt

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
    """Same contract as :func:`specdec.ref.vanilla_generate` (batches of equal-length prompts)."""
    fm: FastModel = as_fast_model(model)
    sp = SamplingParams(temperature, top_k, top_p, sampling, seed)
    prompt = check_prompt(input_ids, prompt_length, max_gen_len, fm.config, device=fm.device)
    check_generator(generator)
    sp, generator = resolve_sampling(sp, generator, fm.device)
    eos = normalize_eos(eos_id, fm.config.eos_token_ids, fm.config.vocab_size)
    eos_t = torch.tensor(eos, dtype=torch.long, device=fm.device)
    b, t = prompt.shape
    cache = fm.ensure_cache(b, t + max_gen_len + 1)

    t0 = time.perf_counter()
    logits = prefill(fm, cache, prompt)
    token = sample_next(logits, sp, generator, t)  # [B], the token at position t
    sync(fm.device)
    prefill_time = time.perf_counter() - t0
    generated = [token]
    done = torch.isin(token, eos_t)
    mask = torch.ones(b, 1, 1, dtype=torch.bool, device=fm.device)

    t1 = time.perf_counter()
    while len(generated) < max_gen_len and not bool(done.all()):  # one host sync per token (EOS check)
        pos = torch.full((b, 1), cache.length, dtype=torch.long, device=fm.device)
        logits = run_step(fm, cache, token[:, None], pos, mask)
        cache.set_length(cache.length + 1)
        token = sample_next(logits[:, -1], sp, generator, t + len(generated))
        generated.append(token)
        done |= torch.isin(token, eos_t)
    sync(fm.device)
    elapsed = time.perf_counter() - t1

    return GenerationResult.from_steps(generated, eos, max_gen_len, elapsed, prefill_time)
