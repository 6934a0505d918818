"""Fast plain decoding: static cache, chunked prefill, one CUDA-graph replay per token.

Must match :func:`specdec.ref.vanilla.vanilla_generate` token for token (greedy, fp32).
The loop keeps the next token on the device; the host reads the new tokens once per step (the EOS
check). Greedy under tensor parallelism (:mod:`specdec.fast.tp`) takes the argmax over the ranks'
vocabulary slices without gathering the logits.
``sampling="keyed"``: the token at position t of row b is the keyed choice (seed, b, t), exactly as
the reference (:func:`specdec.shared.keyed.sample_next`).

A batch (docs/design.md §11) takes every input form of :mod:`specdec.shared.batch` and decodes ALL its
rows together, whatever their prompt lengths: each row is prefilled alone into its slice of one static
[B] cache, whose per-row lengths live in ``cache.length_t`` (the decode attention reads a [B]
``prefix_len``), and every step is ONE target pass (one graph replay) that feeds each unfinished row its
last token at its own position. A row that finished (EOS or ``max_gen_len``) stays in the pass as a
dummy whose prefix length is 0, so it reads none of its cache. The decode phase is row-invariant
(§8), so each row's tokens are the prompt's decoded alone; rejection sampling draws the unfinished
rows from the one generator in one call per step, as the reference does.
"""

from __future__ import annotations

import time

import torch

from specdec.fast.model import FastModel, as_fast_model, prefill, run_step
from specdec.shared.batch import normalize_prompts
from specdec.shared.keyed import resolve_sampling, sample_next
from specdec.shared.result import GenerationResult, normalize_eos, sync
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
    dev, b, lengths = fm.device, batch.size, list(batch.lengths)
    cache = fm.ensure_cache(b, max(lengths) + max_gen_len + 1)

    # 1. Prefill: every row alone into its slice of the batch cache (its own length); row b's last prompt
    #    position predicts its first token, at position len_b.
    t0 = time.perf_counter()
    last = []
    for r in range(b):
        view = cache.row(r, 0)
        last.append(prefill(fm, view, batch.rows[r][None])[0])
        view.set_length(lengths[r])
    token = sample_next(torch.stack(last), sp, generator, lengths)   # [B]
    out = [[t] for t in token.tolist()]
    sync(dev)
    prefill_time = time.perf_counter() - t0
    num = 1

    def finished(r: int) -> bool:
        return len(out[r]) >= max_gen_len or out[r][-1] in eos

    # 2. Decode: one target pass per token for all rows; each row reads its own prefix (cache.length_t[r])
    #    and writes its new K/V there. Greedy under tensor parallelism: the argmax across the ranks'
    #    vocabulary slices (one int64 key per row and rank exchanged) instead of gathering the logits.
    sharded_argmax = fm.tp is not None and sp.greedy
    mask = torch.ones(b, 1, 1, dtype=torch.bool, device=dev)
    active = list(range(b))
    sel: slice | torch.Tensor = slice(None)   # the unfinished rows as an index (all rows until one finishes)
    t1 = time.perf_counter()
    while True:
        still = [r for r in active if not finished(r)]
        if not still:
            break
        if len(still) < len(active):   # rows that finished read no cache from now on (prefix length 0)
            cache.length_t[torch.tensor([r for r in active if r not in still], device=dev)] = 0
            active, sel = still, torch.tensor(still, device=dev)
        cache.length = max(lengths[r] + len(out[r]) - 1 for r in active)   # the longest row (the overflow check)
        positions = cache.length_t.long()[:, None]   # row r's fed token sits at position len_r + emitted - 1
        logits = run_step(fm, cache, token[:, None], positions, mask, gather=not sharded_argmax)[:, -1]
        cache.length_t[sel] += 1
        if sharded_argmax:
            new = fm.tp.argmax(logits, fm.config.vocab_size)[sel]
        else:
            new = sample_next(logits[sel], sp, generator, [lengths[r] + len(out[r]) for r in active], seq_ids=active)
        token[sel] = new
        num += 1
        for r, t in zip(active, new.tolist()):   # the step's one read-back
            out[r].append(t)
    sync(dev)
    elapsed = time.perf_counter() - t1

    # 3. Each row is cut after its first EOS (finished rows padded with it); one target pass per token.
    return GenerationResult.from_batch(out, [[False] * len(o) for o in out], eos, max_gen_len, num, elapsed,
                                       prefill_time, [[1] * len(o) for o in out])
