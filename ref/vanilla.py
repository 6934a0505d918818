"""Plain autoregressive decoding with a KV cache -- the baseline every speculative decoder must match.

Steps:
1. Prefill: run the whole prompt once (causal mask); its last logit gives the first token.
2. Decode: feed the last token, read the next logit, pick the next token (argmax, or a draw from
   the processed distribution when temperature > 0); stop at EOS or ``max_gen_len``.

``sampling="keyed"``: the token at absolute position t (0-based in prompt + output) of batch row b
is the Gumbel-max choice keyed by (seed, b, t) (:func:`specdec.shared.keyed.sample_next`), so a
row's output depends on its own logits and the seed only, and every speculative decoder given the
same seed emits exactly these tokens.
"""

from __future__ import annotations

import time

import torch

from specdec.ref.model import Model, forward_step, new_cache
from specdec.shared.keyed import resolve_sampling, sample_next
from specdec.shared.result import GenerationResult, normalize_eos
from specdec.shared.sampling import SamplingParams
from specdec.shared.validate import check_generator, check_prompt

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
    """Generate up to ``max_gen_len`` tokens after ``input_ids[:, :prompt_length]``.

    ``eos_id``: None = the model's EOS ids, an int or list of ints, or [] to never stop.
    Batches of equal-length prompts are supported; rows that finished early are padded with their EOS.
    ``sampling``: ``"rejection"`` (default: draws from ``generator``) or ``"keyed"`` (position-keyed,
    see the module docstring; temperature 0 stays greedy). ``seed``: the key (None: the generator's
    initial seed, else one draw from torch's global RNG; :func:`specdec.shared.keyed.resolve_seed`).
    """
    sp = SamplingParams(temperature, top_k, top_p, sampling, seed)
    prompt = check_prompt(input_ids, prompt_length, max_gen_len, model.config, device=model.device)
    check_generator(generator)
    sp, generator = resolve_sampling(sp, generator, model.device)
    eos = normalize_eos(eos_id, model.config.eos_token_ids, model.config.vocab_size)
    b = prompt.shape[0]
    cache = new_cache(model, b)

    # 1. Prefill: the prompt in one pass; the last position's logit predicts the first new token.
    t0 = time.perf_counter()
    logits = forward_step(model, prompt, cache)
    t = prompt.shape[1]  # the first new token's absolute position
    token = sample_next(logits[:, -1], sp, generator, t)  # [B]
    prefill_time = time.perf_counter() - t0
    generated = [token]
    done = torch.isin(token, torch.tensor(eos, dtype=torch.long, device=token.device))

    # 2. Decode one token per target pass.
    t1 = time.perf_counter()
    while len(generated) < max_gen_len and not bool(done.all()):
        logits = forward_step(model, token[:, None], cache)
        token = sample_next(logits[:, -1], sp, generator, t + len(generated))
        generated.append(token)
        done |= torch.isin(token, torch.tensor(eos, dtype=torch.long, device=token.device))
    elapsed = time.perf_counter() - t1

    # 3. Cut each row after its first EOS (finished rows padded with it); one target pass per token.
    return GenerationResult.from_steps(generated, eos, max_gen_len, elapsed, prefill_time)
