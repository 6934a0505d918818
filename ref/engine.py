"""The speculative round, written once. Every speculative decoder is a *drafter* plugged into it.

One round, step by step:

1. **Draft.** The drafter proposes a token tree. Node 0 is the *root*: the last emitted token,
   whose KV the target has not computed yet. A chain of ``gamma`` drafts is the tree
   ``parents = [-1, 0, 1, ..., gamma - 1]``.
2. **Verify.** The target runs all M nodes in ONE forward pass: positions ``L + depth`` (L =
   verified cache length) and a mask that lets every node see the whole verified prefix plus its
   own ancestors (:meth:`Tree.ancestor_mask`). Row ``u`` of the logits is the target's
   distribution after node ``u``.
3. **Accept.** A rule from :mod:`specdec.shared.acceptance` picks a root-to-node path and one
   more token (greedy match, chain rejection sampling with draft probabilities, or the
   deterministic-candidate tree rule); :func:`specdec.shared.round.accept_draft` chooses it.
4. **Compact.** The cache keeps rows ``[0, L)`` plus the accepted path's rows, in EVERY layer;
   the rejected nodes' KV is dropped.
5. **Emit.** The accepted drafts (``spec_mask`` True) and the extra token (False) are appended;
   the extra token is the root of the next round.

The loop stops after the first EOS or once ``max_gen_len`` tokens were emitted.

``sampling="keyed"`` (temperature > 0): the first token is the keyed choice at position T (the
prompt length) and step 3 is the greedy rule on the target's rows perturbed by the keyed noise
(row u at position ``L + depth(u) + 1``), so the output is exactly vanilla keyed sampling's.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from specdec.ref.model import KVCache, Model, forward_step, new_cache
from specdec.shared.result import GenerationResult, normalize_eos, sync
from specdec.shared.keyed import resolve_sampling, sample_next
from specdec.shared.round import Draft, Drafter, RoundRecord, RoundState, accept_draft
from specdec.shared.sampling import SamplingParams
from specdec.shared.validate import check_batch_one, check_generator, check_prompt

__all__ = ["Draft", "RoundState", "Drafter", "RoundRecord", "verify_tree", "accept_draft", "run_speculative"]


def verify_tree(target: Model, cache: KVCache, draft: Draft) -> torch.Tensor:
    """Step 2: score all M nodes in one pass; returns logits [M, V]. Appends M rows to ``cache``."""
    L, m, dev = cache.length, draft.tree.size, target.device
    positions = draft.tree.positions(L, dev)  # RoPE position of each node = L + depth
    # Mask [M, L + M]: the whole verified prefix, then ancestor-or-self among the nodes.
    mask = torch.cat([torch.ones(m, L, dtype=torch.bool, device=dev), draft.tree.ancestor_mask(dev)], dim=1)
    logits = forward_step(target, draft.tokens.to(dev)[None], cache, positions=positions, mask=mask)
    return logits[0]


@torch.inference_mode()
def run_speculative(
    target: Model,
    drafter: Drafter,
    input_ids: torch.Tensor,
    prompt_length: int,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    method: str = "speculative decoding",
    first_target: bool = True,
    skip_sample_adjustment: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """The speculative decoding loop around any drafter (batch size 1). ``sampling`` and ``seed`` as in
    :func:`specdec.ref.vanilla.vanilla_generate`; the drafter sees the resolved seed in ``state.params``."""
    params = SamplingParams(temperature, top_k, top_p, sampling, seed)
    prompt = check_prompt(input_ids, prompt_length, max_gen_len, target.config, device=target.device)
    check_batch_one(prompt, method)
    check_generator(generator)
    params, generator = resolve_sampling(params, generator, target.device)
    eos = set(normalize_eos(eos_id, target.config.eos_token_ids, target.config.vocab_size))
    tokens: list[int] = prompt[0].tolist()
    cache = new_cache(target, 1)
    emitted: list[int] = []
    spec: list[bool] = []
    accept_lengths: list[int] = []
    num = 0

    # 0. Prefill. With first_target (default) the target reads the prompt and picks the first token,
    #    which becomes the first root. Without it, the prompt's last token is the first root.
    t0 = time.perf_counter()
    if first_target:
        logits = forward_step(target, prompt, cache)
        last_logits = logits[0, -1]
        first = int(sample_next(last_logits, params, generator, prompt.shape[1]))  # the token at position T
        tokens.append(first)
        emitted.append(first)
        spec.append(False)
        accept_lengths.append(1)
        num = 1
    else:
        last_logits = forward_step(target, prompt[:, :-1], cache)[0, -1] if prompt.shape[1] > 1 else None
    sync(target.device)
    prefill_time = time.perf_counter() - t0

    t1 = time.perf_counter()
    while len(emitted) < max_gen_len and not (eos & set(emitted)):
        L = cache.length
        state = RoundState(tokens, target, cache, last_logits, params, generator, max_gen_len - len(emitted))
        # 1. Draft a tree whose root is the last emitted token.
        draft = drafter.propose(state)
        if int(draft.tokens[0]) != tokens[-1]:
            raise RuntimeError("drafter bug: the draft's root must be the last emitted token")
        # 2. Verify every node in one target pass.
        logits = verify_tree(target, cache, draft)
        num += 1
        # 3. Accept a path and one more token.
        path, next_token = accept_draft(draft, logits, params, generator, skip_sample_adjustment, root_position=L)
        # 4. Compact the KV cache: verified prefix + the accepted path's rows, in every layer.
        keep = torch.cat([torch.arange(L), L + torch.tensor(path)]).to(target.device)
        cache.keep(keep)
        # 5. Emit the accepted drafts and the extra token; the latter is the next root.
        accepted = [int(draft.tokens[j]) for j in path[1:]]
        emitted += accepted + [next_token]
        spec += [True] * len(accepted) + [False]
        tokens += accepted + [next_token]
        accept_lengths.append(len(accepted) + 1)
        last_logits = logits[path[-1]]
        if on_round is not None:
            on_round(RoundRecord(draft, path, next_token))
    sync(target.device)
    elapsed = time.perf_counter() - t1

    return GenerationResult.from_rounds(emitted, spec, eos, max_gen_len, num, elapsed, prefill_time, accept_lengths)
