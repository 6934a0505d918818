"""The speculative round, written once. Every speculative decoder is a *drafter* plugged into it.

Before the first round the target reads the prompt (the *prefill*) and picks the first token; a
drafter with a pass of its own over the prompt (a draft model's cache) makes it right after, in the
prefill's time (the optional ``prefill`` hook of :class:`specdec.shared.round.Drafter`).

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

**A batch** (docs/design.md §11): B prompts of any lengths (:mod:`specdec.shared.batch`). Each row
is its own sequence with its own drafter (drafters keep per-sequence state: a draft model's cache,
an n-gram pool, GLIDE's window), its own verified length ``L_b`` and its own budget. The target's
cache is ONE tensor per layer [B, Hkv, S, D] whose row b is valid in ``[0, L_b)`` and padding
beyond (never attended: every mask hides it). A round:

1. every unfinished row drafts from its own state (a per-row loop; the drafter sees a batch-of-one
   view of its row's cache);
2. the drafts are padded to one size M with *dummy nodes* (they see only themselves, sit at the
   row's root position and are never accepted) and ALL rows are verified in one target pass: row b's
   nodes at positions ``L_b + depth``, seeing its prefix ``[0, L_b)`` and its ancestors;
3. each row accepts its own path (ragged acceptance: rows accept different numbers of tokens);
4. each row keeps ``[0, L_b)`` + its accepted path's rows; the cache is re-packed to the longest;
5. each row emits its tokens; a finished row (EOS or ``max_gen_len``) leaves the batch, so it
   costs nothing in later rounds.

``sampling="keyed"`` (temperature > 0): the first token is the keyed choice at position T (the
prompt length) and step 3 is the greedy rule on the target's rows perturbed by the keyed noise
(row u at position ``L + depth(u) + 1``), so the output is exactly vanilla keyed sampling's. Row b
is sequence ``seq_ids[b]`` (default b): its output depends on its prompt, the seed and its sequence
id, never on its batch-mates.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from einops import rearrange

from specdec.ref.model import KVCache, Model, causal_mask, forward_step, new_cache
from specdec.shared.batch import check_seq_ids, normalize_prompts
from specdec.shared.result import GenerationResult, normalize_eos, sync
from specdec.shared.keyed import resolve_sampling, sample_next
from specdec.shared.round import Draft, Drafter, RoundRecord, RoundState, accept_draft
from specdec.shared.sampling import SamplingParams
from specdec.shared.validate import check_generator, check_positive_int

__all__ = ["Draft", "RoundState", "Drafter", "RoundRecord", "verify_tree", "verify_batch", "prefill_batch", "compact_batch",
           "select_rows", "row_view", "accept_draft", "run_speculative"]


def verify_tree(target: Model, cache: KVCache, draft: Draft) -> torch.Tensor:
    """Step 2 for one sequence: score all M nodes in one pass; returns logits [M, V]. Appends M rows to ``cache``."""
    return verify_batch(target, cache, [cache.length], [draft])[0, : draft.tree.size]


def verify_batch(target: Model, cache: KVCache, lengths: list[int], drafts: list[Draft], size: int | None = None) -> torch.Tensor:
    """Step 2 for a batch: row b's draft over its verified prefix ``[0, lengths[b])`` of ``cache``
    ([B, Hkv, S, D] per layer, padding after each row's length), all rows in ONE target pass.

    Drafts are padded with dummy nodes to ``size`` (default: the largest draft). Returns logits
    [B, size, V] (row b's first ``drafts[b].tree.size`` rows are its nodes'); ``cache`` grows by
    ``size`` columns, node j of every row at column ``S + j``."""
    s, dev = cache.length, target.device
    m = max(d.tree.size for d in drafts) if size is None else size
    tokens = torch.zeros(len(drafts), m, dtype=torch.long, device=dev)
    positions = torch.zeros(len(drafts), m, dtype=torch.long, device=dev)
    mask = torch.zeros(len(drafts), m, s + m, dtype=torch.bool, device=dev)
    for b, (L, d) in enumerate(zip(lengths, drafts)):
        n = d.tree.size
        # Real nodes: tokens at positions L + depth; they see the row's prefix [0, L) and their ancestors.
        tokens[b, :n] = d.tokens.to(dev)
        positions[b, :n] = d.tree.positions(L, dev)
        mask[b, :n, :L] = True
        mask[b, :n, s : s + n] = d.tree.ancestor_mask(dev)
        # Dummy nodes (padding): the root's token at the root's position, seeing only themselves.
        tokens[b, n:] = tokens[b, 0]
        positions[b, n:] = L
        mask[b, n:, s + n :] = torch.eye(m - n, dtype=torch.bool, device=dev)
    return forward_step(target, tokens, cache, positions=positions, mask=mask)


def prefill_batch(target: Model, cache: KVCache, prompts: list[torch.Tensor]) -> torch.Tensor:
    """The prompts of a batch (any lengths >= 0) right-padded into ONE causal pass over an empty
    ``cache``; row b's rows ``[0, len_b)`` are its prompt's KV. Returns logits [B, T_max, V] (row b's
    last real position is ``len_b - 1``)."""
    dev = target.device
    lens = [int(p.shape[0]) for p in prompts]
    t = max(lens)
    ids = torch.zeros(len(prompts), t, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        ids[b, : lens[b]] = p
    # Causal, and only over the row's own tokens: padding is never a key of a real token.
    real = torch.arange(t, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]   # [B, T]
    mask = causal_mask(0, t, dev)[None] & rearrange(real, "b s -> b 1 s")                   # [B, T, T]
    # The prefill is shared by vanilla and every speculative decoder, so it may use the fused kernel.
    return forward_step(target, ids, cache, mask=mask, fused_attention=True)


def compact_batch(cache: KVCache, keep: list[torch.Tensor]) -> None:
    """Step 4 for a batch: row b keeps the cache columns ``keep[b]`` (1-D long, in order) in EVERY
    layer. The kept columns move to the front of the row, in place, and the cache is cut to the longest
    row; a shorter row's columns after its own length hold stale values (never attended: every mask
    hides a row's columns past its length)."""
    for b, cols in enumerate(keep):
        # The columns a row keeps where they already are (its verified prefix) stay untouched; only the
        # ones after them -- a round's accepted path, a few columns -- are copied forward.
        m = int((cols == torch.arange(cols.shape[0], device=cols.device)).cumprod(0).sum())
        if m < cols.shape[0]:
            for t in cache.k + cache.v:
                t[b, :, m : cols.shape[0]] = t[b, :, cols[m:]]   # the right side is gathered before the write
    cache.truncate(max(int(cols.shape[0]) for cols in keep))


def select_rows(cache: KVCache, rows: list[int]) -> None:
    """Keep only the batch rows ``rows`` of ``cache`` (finished rows leave the batch)."""
    idx = torch.tensor(rows, dtype=torch.long, device=cache.k[0].device)
    cache.k = [t.index_select(0, idx) for t in cache.k]
    cache.v = [t.index_select(0, idx) for t in cache.v]


def row_view(cache: KVCache, b: int, length: int) -> KVCache:
    """A batch-of-one view of row ``b``'s verified prefix ``[0, length)`` (what a drafter reads)."""
    return KVCache(k=[t[b : b + 1, :, :length] for t in cache.k], v=[t[b : b + 1, :, :length] for t in cache.v])


def _drafters_per_row(drafter, batch: int, method: str) -> list:
    """One drafter per row: a list of B drafters, a factory (called once per row), or one drafter
    object for a batch of one (a drafter keeps per-sequence state, so it cannot serve two rows)."""
    if hasattr(drafter, "propose"):
        if batch != 1:
            raise ValueError(f"{method}: one drafter object supports batch size 1, got batch size {batch}; pass "
                             "drafter as a list of one drafter per row or as a factory (called once per row)")
        return [drafter]
    if isinstance(drafter, (list, tuple)):
        if len(drafter) != batch:
            raise ValueError(f"drafter: got {len(drafter)} drafters for a batch of {batch} prompts; pass one per row of input_ids")
        if not all(hasattr(d, "propose") for d in drafter):
            raise TypeError("drafter: every entry of the list must be a drafter (with a propose(state) method)")
        return list(drafter)
    if callable(drafter):
        return [drafter() for _ in range(batch)]
    raise TypeError(f"drafter must be a drafter (propose(state)), a list of them or a factory, got {type(drafter).__name__}")


@torch.inference_mode()
def run_speculative(
    target: Model,
    drafter,
    input_ids,
    prompt_length,
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
    tree_size: int | None = None,
    seq_ids=None,
) -> GenerationResult:
    """The speculative decoding loop around any drafter, for a batch of prompts of any lengths
    (:mod:`specdec.shared.batch`: ``input_ids`` [B, T] with an int or per-row ``prompt_length``, or a
    list of prompts).

    ``drafter``: one drafter object (batch size 1), a list of one drafter per row, or a factory
    called once per row. ``tree_size``: pad every round's verification to this many nodes (the
    retrieval drafters' fixed capacity); None pads to the round's largest draft. ``seq_ids``: keyed
    sampling's sequence id per row (default: the row index; :func:`specdec.shared.batch.check_seq_ids`).
    ``sampling`` and ``seed`` as in :func:`specdec.ref.vanilla.vanilla_generate`; the drafter sees the
    resolved seed in ``state.params`` and its row's id in ``state.seq_id``. Rejection sampling draws
    every row from the one ``generator`` (rows in order), so only keyed sampling is batch-invariant.
    """
    params = SamplingParams(temperature, top_k, top_p, sampling, seed)
    batch = normalize_prompts(input_ids, prompt_length, max_gen_len, target.config, device=target.device)
    drafters = _drafters_per_row(drafter, batch.size, method)
    ids = check_seq_ids(seq_ids, batch.size)
    if tree_size is not None:
        check_positive_int("tree_size", tree_size)
    check_generator(generator)
    params, generator = resolve_sampling(params, generator, target.device)
    eos = set(normalize_eos(eos_id, target.config.eos_token_ids, target.config.vocab_size))
    B = batch.size
    tokens: list[list[int]] = batch.tolists()                 # row b: prompt + emitted
    emitted: list[list[int]] = [[] for _ in range(B)]
    spec: list[list[bool]] = [[] for _ in range(B)]
    accept_lengths: list[list[int]] = [[] for _ in range(B)]
    cache = new_cache(target, B)
    num = 0

    def finished(b: int) -> bool:
        return len(emitted[b]) >= max_gen_len or bool(eos & set(emitted[b]))

    # 0. Prefill (all rows in one padded pass). With first_target (default) the target reads each
    #    prompt and picks its first token, the row's first root. Without it, the prompt's last token
    #    is the first root and the prefill reads the tokens before it.
    t0 = time.perf_counter()
    fed = [p if first_target else p[:-1] for p in batch.rows]
    lengths = [int(p.shape[0]) for p in fed]                   # L_b: the row's verified cache length
    logits = prefill_batch(target, cache, fed) if max(lengths) > 0 else None
    last_logits = [logits[b, n - 1] if n > 0 else None for b, n in enumerate(lengths)]
    if first_target:
        firsts = sample_next(torch.stack(last_logits), params, generator, lengths, seq_ids=ids)  # position T_b
        for b in range(B):
            tokens[b].append(int(firsts[b]))
            emitted[b].append(int(firsts[b]))
            spec[b].append(False)
            accept_lengths[b].append(1)
        num = 1
    # A drafter with a pass of its own over the prompt (a draft model's cache) makes it here, so the
    # prefill time counts every pass over the prompt, as the fast engine's does. The hook is optional.
    for b in range(B):
        drafter_prefill = getattr(drafters[b], "prefill", None)
        if drafter_prefill is not None and not finished(b):
            drafter_prefill(RoundState(tokens[b], target, row_view(cache, b, lengths[b]), last_logits[b], params,
                                       generator, max_gen_len - len(emitted[b]), ids[b]))
    sync(target.device)
    prefill_time = time.perf_counter() - t0

    active = [b for b in range(B) if not finished(b)]          # batch position i holds row active[i]
    select_rows(cache, active)
    lengths = [lengths[b] for b in active]
    t1 = time.perf_counter()
    while active:
        # 1. Draft: every unfinished row proposes a tree rooted at its last emitted token.
        drafts = []
        for i, b in enumerate(active):
            state = RoundState(tokens[b], target, row_view(cache, i, lengths[i]), last_logits[b], params, generator,
                               max_gen_len - len(emitted[b]), ids[b])
            draft = drafters[b].propose(state)
            if int(draft.tokens[0]) != tokens[b][-1]:
                raise RuntimeError("drafter bug: the draft's root must be the last emitted token")
            if tree_size is not None and draft.tree.size > tree_size:
                raise RuntimeError(f"drafter bug: a draft of {draft.tree.size} nodes exceeds the tree size {tree_size}")
            drafts.append(draft)
        # 2. Verify every row's nodes in one target pass (drafts padded with dummy nodes).
        width = cache.length
        logits = verify_batch(target, cache, lengths, drafts, tree_size)
        num += 1
        keep = []
        for i, b in enumerate(active):
            draft, L = drafts[i], lengths[i]
            row_logits = logits[i, : draft.tree.size]
            # 3. Accept a path and one more token (this row's own rule, position and sequence id).
            path, next_token = accept_draft(draft, row_logits, params, generator, skip_sample_adjustment,
                                            root_position=L, seq_id=ids[b])
            # 4. The row keeps its verified prefix and the accepted path's rows (at columns width + j).
            keep.append(torch.cat([torch.arange(L), width + torch.tensor(path)]).to(target.device))
            lengths[i] = L + len(path)
            # 5. Emit the accepted drafts and the extra token; the latter is the row's next root.
            accepted = [int(draft.tokens[j]) for j in path[1:]]
            emitted[b] += accepted + [next_token]
            spec[b] += [True] * len(accepted) + [False]
            tokens[b] += accepted + [next_token]
            accept_lengths[b].append(len(accepted) + 1)
            last_logits[b] = row_logits[path[-1]]
            if on_round is not None:
                on_round(RoundRecord(draft, path, next_token, b))
        compact_batch(cache, keep)
        # Finished rows leave the batch.
        still = [i for i, b in enumerate(active) if not finished(b)]
        if len(still) < len(active):
            select_rows(cache, still)
            active, lengths = [active[i] for i in still], [lengths[i] for i in still]
    sync(target.device)
    elapsed = time.perf_counter() - t1

    row_nums = [len(a) for a in accept_lengths]
    res = GenerationResult.from_batch(emitted, spec, eos, max_gen_len, num, elapsed, prefill_time, accept_lengths, row_nums)
    return res
