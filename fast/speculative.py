"""Fast draft-model speculative decoding: both models are :class:`FastModel`s with static caches;
every draft step (M = 1) and every verification (M = gamma + 1) is a CUDA-graph replay, and greedy
drafts stay on the device until the round's single synchronisation.

Greedy rounds run fused by default (:attr:`FastDraftModelDrafter.fuse_rounds`; measured on an H100 in steady
state: 1.35x vanilla fused vs 1.09x unfused, BENCHMARKS "Session 17"):
the draft's catch-up, its ``gamma`` steps, the target's verification and the device-side acceptance + KV
compaction as ONE function of device tensors (:meth:`FastDraftModelDrafter.fused_round`), captured as one
CUDA graph per catch-up length -- one host-to-device copy, one replay and one read-back per round.

Same algorithm and arguments as :mod:`specdec.ref.speculative` (read that file for the steps);
must match :func:`specdec.ref.speculative.speculative_generate` token for token (greedy). Keyed
sampling: the draft proposes the keyed choice of its own logits at each draft position, as the reference.

``draft_window=W``: the reference's rule, which this path must match (the same drafts, so the same tokens and
accept lengths): the prefill feeds only the last ``W`` tokens before the root, at draft positions
``0..W-1``, and remembers ``offset = max(0, len(before_root) - W)``; the catch-up rolls the draft cache
back to ``keep - offset`` rows. Everything after -- :meth:`~FastDraftModelDrafter._feed`, the draft
steps, the fused round's :meth:`~FastDraftModelDrafter._body` -- takes its positions from the draft
cache's length (row = position), never from the token's index in the sequence; keyed sampling's keys
stay on the absolute positions. The draft cache then needs ``min(prompt, W) + max_gen_len + gamma + 2`` rows.
"""

from __future__ import annotations

import itertools

import torch

from specdec.fast.engine import FastDrafter, FusedRound, TreeTensors, check_drafts_fit, run_speculative_fast, verify_and_accept
from specdec.fast.graphs import StaticRound
from specdec.fast.model import MAX_TREE_NODES, FastModel, StaticKVCache, as_fast_model, prefill, run_step, step_forward
from specdec.shared.batch import longest_prompt
from specdec.shared.keyed import keyed_choice
from specdec.shared.result import GenerationResult
from specdec.shared.round import Draft, RoundState
from specdec.shared.sampling import logits_to_probs, sample_from_probs
from specdec.shared.tree import Tree
from specdec.shared.validate import check_draft_window, check_positive_int, check_same_vocab

__all__ = ["FastDraftModelDrafter", "speculative_generate"]


class FastDraftModelDrafter(FastDrafter):
    """Chain of ``gamma`` drafts from a fast draft model whose static cache is rolled back, not rebuilt."""

    fuse_rounds: bool = True
    """Offer :meth:`fused_round` to the engine (greedy rounds of a full chain, no tensor parallelism). On by
    default: on an H100 in steady state the fused rounds ran 1.35x vanilla where the unfused ones ran 1.09x,
    faster on every prompt (``scripts/probes/fused_chain_rounds.py``). Without CUDA the body runs eagerly.
    ``False`` restores the stepwise rounds (``propose`` + the engine's verification)."""

    def __init__(self, draft: FastModel, gamma: int, capacity: int, name: str = "draft",
                 draft_window: int | None = None) -> None:
        self.model = draft
        self.gamma = gamma
        self.window = draft_window   # None: the whole prompt; W: its last W tokens (the reference's rule)
        self.cache = draft.ensure_cache(1, capacity, name=name)   # one cache per drafter (per batch row)
        # tokens accounted for (absolute); the first `offset` lie before the window and have no cache rows:
        # cache row i holds cached[offset + i], at draft position i
        self.cached: list[int] = []
        self.offset = 0
        self.pending: torch.Tensor | None = None  # drafts fed last round, still on the device

    def _catch_up_plan(self, state: RoundState) -> list[int]:
        """Step 1's host part: learn last round's drafts, roll the draft cache back to the longest prefix
        that still matches ``state.tokens`` (re-feeding at least the root) and return the tokens to feed."""
        if self.pending is not None:
            self.cached += self.pending.tolist()
            self.pending = None
        keep = 0
        for seen, real in zip(self.cached, state.tokens):
            if seen != real:
                break
            keep += 1
        keep = min(keep, len(state.tokens) - 1)
        self.cache.set_length(keep - self.offset)   # the rows of tokens offset..keep-1 (keep >= offset)
        return state.tokens[keep:]

    def _feed(self, new: list[int]) -> torch.Tensor:
        """Append ``new`` tokens to the draft cache at the draft positions ``cache.length, ...`` (row = position,
        whatever the window's offset); logits [V] after the last one."""
        dev = self.model.device
        cache = self.cache
        if cache.length == 0 or len(new) > MAX_TREE_NODES:
            return prefill(self.model, cache, torch.tensor([new], dtype=torch.long, device=dev))[0]
        n = len(new)
        pos = torch.arange(cache.length, cache.length + n, device=dev)[None]
        mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril_()[None]
        logits = run_step(self.model, cache, torch.tensor([new], dtype=torch.long, device=dev), pos, mask)
        cache.set_length(cache.length + n)
        return logits[0, -1]

    def prefill(self, state: RoundState) -> None:
        """Step 0, called by the engine during the prefill (so it counts in the time to first token, like
        the target's): the draft model reads the tokens before the root -- all of them, or with a window ``W``
        only the last ``W``, at draft positions ``0..W-1`` -- in one :func:`prefill` pass; the first round's
        catch-up then feeds the root alone. Matches ``ref.speculative.DraftModelDrafter.prefill``."""
        before_root = state.tokens[:-1]
        self.offset = 0 if self.window is None else max(0, len(before_root) - self.window)
        self.cache.set_length(0)   # a fresh drafter (its named cache may hold an earlier call's rows)
        if before_root:
            self._feed(before_root[self.offset:])   # onto an empty cache: one prefill pass
        self.cached = list(before_root)

    def propose(self, state: RoundState) -> Draft:
        p = state.params
        gamma = min(self.gamma, state.max_drafts)
        # 1. Catch up: roll back to the longest still-right prefix (re-feeding at least the root).
        logits = self._feed(self._catch_up_plan(state))
        self.cached = list(state.tokens)
        # 2. Draft gamma tokens; greedy drafts never leave the device.
        dev = self.model.device
        drafts, qs = [], []
        root_pos = len(state.tokens) - 1  # the root's absolute position L
        for i in range(gamma):
            if p.greedy:
                x = torch.argmax(logits, dim=-1, keepdim=True)
            elif p.keyed:  # the draft's own keyed choice at position L + 1 + i; no q
                pos = torch.tensor(root_pos + 1 + i, device=dev)
                x = keyed_choice(logits, p.temperature, p.top_k, p.top_p, p.seed, state.seq_id, pos).reshape(1)
            else:
                q = logits_to_probs(logits, p.temperature, p.top_k, p.top_p)
                x = sample_from_probs(q, state.generator).reshape(1).to(dev)
                qs.append(q)
            drafts.append(x)
            if i + 1 < gamma:
                pos = torch.full((1, 1), self.cache.length, dtype=torch.long, device=dev)
                logits = run_step(self.model, self.cache, x[None], pos, torch.ones(1, 1, 1, dtype=torch.bool, device=dev))[0, -1]
                self.cache.set_length(self.cache.length + 1)
        root = torch.tensor([state.tokens[-1]], dtype=torch.long, device=dev)
        tokens = torch.cat([root] + drafts)
        # drafts 1..gamma-1 were fed to the cache; the host learns their values next round (after the
        # engine's synchronisation, so reading them then costs no extra wait)
        self.pending = tokens[1:-1]
        q_all = None
        if qs:
            q_all = torch.stack([torch.zeros_like(qs[0])] + qs)
        return Draft(tokens=tokens, tree=Tree.chain(len(drafts)), q=q_all)

    # -- fused greedy rounds -------------------------------------------------------------------------

    def fused_round(self, state: RoundState, tree_size: int) -> FusedRound | None:
        """A whole greedy round -- catch-up, ``gamma`` draft steps, verification, acceptance and KV
        compaction -- as ONE function of device tensors (:meth:`_body`), a CUDA graph per catch-up shape.

        The same drafts and tokens as :meth:`propose` + the engine's verification: the catch-up follows
        :meth:`_feed`'s rule -- a short one (at most ``gamma + 1`` tokens onto a non-empty cache) is one
        :func:`~specdec.fast.model.step_forward` pass inside the round, as ``run_step`` would run it; the
        prompt (or a longer one) is fed by :meth:`_feed` itself before the round, whose graph then starts
        from those logits -- then the same one-token draft steps and the engine's
        :func:`~specdec.fast.engine.verify_and_accept`. The last rounds (fewer tokens left than ``gamma``)
        replay the full chain with acceptance limited to the first ``d`` drafts. None when fusing is off,
        the size is not ``gamma + 1`` or either model is split over ranks."""
        if not (self.fuse_rounds and tree_size == self.gamma + 1 and self.model.tp is None and state.target.tp is None):
            return None
        target, cache = state.target, state.target_cache
        if cache.length + tree_size > cache.capacity:
            raise ValueError(f"KV cache overflow: {cache.length} + {tree_size} rows > capacity {cache.capacity}")
        new = self._catch_up_plan(state)
        d = min(self.gamma, state.max_drafts)
        fed = self.cache.length == 0 or len(new) > self.gamma + 1
        if fed:      # _feed's own pass (a prefill for the prompt); the round starts from its logits
            seed = self._feed(new)
            pack = torch.tensor([self.cache.length - 1, d, new[-1]], dtype=torch.long)
        else:
            seed = None
            pack = torch.tensor([self.cache.length, d, *new], dtype=torch.long)
        dm, k = self.model, pack.numel() - 2
        key = (id(self.cache), "fused-draft-round", k, self.gamma, fed)
        use_graphs = dm.use_graphs and target.use_graphs and dm.rope_table is not None and target.rope_table is not None
        inputs = (pack, seed) if fed else (pack,)
        round_ = StaticRound.get(dm.graphs, key, (target, cache, dm.rope_table, target.rope_table),
                                 lambda: self._make_body(target, cache, k), inputs, dm.device, use_graphs,
                                 lambda: cache.restored_tree_rows(self.gamma + 1))
        packed, logits, node_tokens = round_.run(*inputs)
        self.cached = list(state.tokens)
        self.pending = node_tokens[1:self.gamma]   # drafts 1..gamma-1 went into the draft cache
        return FusedRound(packed, logits, 1 + d)

    def _make_body(self, target: FastModel, cache: StaticKVCache, k: int):
        """The fused round's body for ``k`` catch-up tokens (:class:`~specdec.fast.graphs.StaticRound`), with its
        constant tensors: the chain's (its own :class:`~specdec.fast.engine.TreeTensors`, which the graph reads
        by address), the catch-up's causal mask and offsets."""
        g, dev = self.gamma, self.model.device
        consts = (TreeTensors(Tree.chain(g), g + 1, dev), torch.ones(1, k, k, dtype=torch.bool, device=dev).tril_(),
                  torch.arange(k, device=dev))
        return lambda pack, seed=None: self._body(target, cache, pack, consts, seed)

    def _body(self, target: FastModel, cache: StaticKVCache, pack: torch.Tensor, consts: tuple,
              seed: torch.Tensor | None) -> tuple:
        """The fused round on device tensors only (graph-capturable; shapes fixed by ``k`` and gamma).

        Reads ``pack`` -- the draft cache's verified length ``base`` (the first catch-up token's position), the
        number ``d`` of drafts that may be accepted, then the ``k`` catch-up tokens (the root last); writes the
        ``k`` catch-up rows (unless ``seed`` holds the root's draft logits already) and drafts 1..gamma-1 into
        the draft cache at their positions (row = position), verifies ``[root, d_1..d_gamma]`` against the target cache from ``cache.length_t`` and
        accepts greedily among the first ``1 + d`` nodes. Returns ``(packed, target logits [gamma + 1, V],
        node tokens [gamma + 1])``."""
        dm, g = self.model, self.gamma
        chain, causal, ar = consts
        k = ar.numel()
        base, d = pack[0:1], pack[1]
        tokens = pack[2:][None]                                               # [1, k]; the root last
        if seed is None:
            # 1. catch-up: the k tokens at positions [base, base + k) in one pass; the last row's logits
            logits = step_forward(dm, self.cache, tokens, (base + ar)[None], causal, base.to(torch.int32))[0, -1]
        else:
            logits = seed
        nodes = [tokens[0, k - 1:]]
        for i in range(g):
            # 2. draft i + 1 = the draft's argmax (as propose); drafts 1..gamma-1 are fed back one by one
            x = torch.argmax(logits, dim=-1, keepdim=True)
            nodes.append(x)
            if i + 1 < g:
                at = base + k + i
                logits = step_forward(dm, self.cache, x[None], at[None], causal[:, :1, :1], at.to(torch.int32))[0, -1]
        node_tokens = torch.cat(nodes)                                        # [gamma + 1]: root, d_1..d_gamma
        # 3-4. verify the chain, accept greedily among its first 1 + d nodes, compact the target's KV
        vlogits, packed = verify_and_accept(target, cache, node_tokens, chain.parents, chain.depth, chain.ancestor, chain.depth <= d)
        return packed, vlogits, node_tokens


def speculative_generate(
    target,
    draft_model,
    input_ids: torch.Tensor,
    prompt_length: int,
    gamma: int = 5,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    first_target: bool = True,
    skip_sample_adjustment: bool = False,
    sampling: str = "rejection",
    seed: int | None = None,
    draft_window: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.speculative_generate` (``gamma`` <= 127 on the fast path),
    ``draft_window`` included: the draft reads only the last ``W`` prompt tokens, exactly as the reference."""
    tm, dm = as_fast_model(target), as_fast_model(draft_model)
    check_same_vocab(tm.config, dm.config)
    check_positive_int("gamma", gamma)
    check_drafts_fit("gamma", gamma)
    check_draft_window(draft_window)
    # the draft cache holds at most the window (or the prompt), then the generated tokens and one chain
    prompt_rows = longest_prompt(input_ids)
    if draft_window is not None:
        prompt_rows = min(prompt_rows, draft_window)
    capacity = prompt_rows + max_gen_len + gamma + 2
    rows = itertools.count()

    def drafter():   # one per batch row, each with its own draft cache ("draft", "draft1", ...)
        i = next(rows)
        return FastDraftModelDrafter(dm, gamma, capacity, name="draft" if i == 0 else f"draft{i}", draft_window=draft_window)

    return run_speculative_fast(
        tm, drafter, input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p, generator,
        method="speculative decoding", tree_size=gamma + 1, first_target=first_target,
        skip_sample_adjustment=skip_sample_adjustment, sampling=sampling, seed=seed,
    )
