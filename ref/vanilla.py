"""Plain autoregressive decoding with a KV cache -- the baseline every speculative decoder must match.

Steps:
1. Prefill: run the whole prompt once (causal mask); its last logit gives the first token.
2. Decode: feed the last token, read the next logit, pick the next token (argmax, or a draw from
   the processed distribution when temperature > 0); stop at EOS or ``max_gen_len``.

A batch (docs/design.md §11): B prompts of any lengths (:mod:`specdec.shared.batch`). The prefill
reads them right-padded in one pass; row b's cache is valid in ``[0, len_b)``, then padding up to
the longest prompt (masked out forever), then one column per decode step. Every step feeds each
unfinished row its last token at its own position ``len_b + tokens so far - 1``; a row that emitted
its EOS (or ``max_gen_len`` tokens) leaves the batch.

``sampling="keyed"``: the token at absolute position t (0-based in prompt + output) of batch row b
is the Gumbel-max choice keyed by (seed, b, t) (:func:`specdec.shared.keyed.sample_next`), so a
row's output depends on its own logits and the seed only, and every speculative decoder given the
same seed emits exactly these tokens.
"""

from __future__ import annotations

import time

import torch
from einops import rearrange

from specdec.ref.engine import prefill_batch, select_rows
from specdec.ref.model import Model, forward_step, new_cache
from specdec.shared.batch import normalize_prompts
from specdec.shared.keyed import resolve_sampling, sample_next
from specdec.shared.result import GenerationResult, normalize_eos
from specdec.shared.sampling import SamplingParams
from specdec.shared.validate import check_generator

__all__ = ["vanilla_generate"]


@torch.inference_mode()
def vanilla_generate(
    model: Model,
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
    """Generate up to ``max_gen_len`` tokens after each prompt.

    ``input_ids``, ``prompt_length``: [B, T] right-padded with one length or B lengths, or a list of
    prompts (:mod:`specdec.shared.batch`). ``eos_id``: None = the model's EOS ids, an int or list of
    ints, or [] to never stop. Rows that finished early are padded with their EOS (the result's
    ``row_lengths`` are the real lengths). ``sampling``: ``"rejection"`` (default: draws from
    ``generator``) or ``"keyed"`` (position-keyed, see the module docstring; temperature 0 stays
    greedy). ``seed``: the key (None: the generator's initial seed, else one draw from torch's
    global RNG; :func:`specdec.shared.keyed.resolve_seed`).
    """
    sp = SamplingParams(temperature, top_k, top_p, sampling, seed)
    batch = normalize_prompts(input_ids, prompt_length, max_gen_len, model.config, device=model.device)
    check_generator(generator)
    sp, generator = resolve_sampling(sp, generator, model.device)
    eos = normalize_eos(eos_id, model.config.eos_token_ids, model.config.vocab_size)
    dev = model.device
    b, lengths = batch.size, batch.lengths
    cache = new_cache(model, b)

    # 1. Prefill: the prompts in one right-padded pass; row b's last prompt position predicts its first token.
    t0 = time.perf_counter()
    logits = prefill_batch(model, cache, list(batch.rows))
    last = logits[torch.arange(b, device=dev), torch.tensor(lengths, device=dev) - 1]  # [B, V]
    token = sample_next(last, sp, generator, lengths)  # row b's token at position len_b
    prefill_time = time.perf_counter() - t0
    out = [[int(t)] for t in token]
    num = 1
    # Cache columns each row may attend to: its prompt, not the padding after it.
    valid = torch.arange(cache.length, device=dev)[None, :] < torch.tensor(lengths, device=dev)[:, None]  # [B, S]

    def finished(r: int) -> bool:
        return len(out[r]) >= max_gen_len or out[r][-1] in eos

    # 2. Decode one token per target pass for every unfinished row (finished rows leave the batch).
    t1 = time.perf_counter()
    active = list(range(b))
    while True:
        still = [i for i, r in enumerate(active) if not finished(r)]
        if not still:
            break
        if len(still) < len(active):
            select_rows(cache, still)
            valid, token = valid[still], token[still]
            active = [active[i] for i in still]
        pos = torch.tensor([lengths[r] + len(out[r]) - 1 for r in active], device=dev)  # the fed token's position
        valid = torch.cat([valid, torch.ones(len(active), 1, dtype=torch.bool, device=dev)], dim=1)
        logits = forward_step(model, token[:, None], cache, positions=pos[:, None], mask=rearrange(valid, "b s -> b 1 s"))
        token = sample_next(logits[:, -1], sp, generator, (pos + 1).tolist(), seq_ids=active)
        num += 1
        for r, t in zip(active, token.tolist()):
            out[r].append(t)
    elapsed = time.perf_counter() - t1

    # 3. Each row is cut after its first EOS (finished rows padded with it); one target pass per token.
    return GenerationResult.from_batch(out, [[False] * len(o) for o in out], eos, max_gen_len, num, elapsed,
                                       prefill_time, [[1] * len(o) for o in out])
