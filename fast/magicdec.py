"""Fast MagicDec: the target drafts for itself over a compressed StreamingLLM cache.

Same algorithm as :mod:`specdec.ref.magicdec` (read that file for the steps); greedy output is
token-identical to it. On the fast path the compressed view is a second static cache of the
target (``sink_tokens + window + gamma`` rows, allocated once): each round ONE gather copies the
sink rows and the recent window of every layer into it, then ``gamma`` graph-replayed one-token
steps draft at the true positions ``L, L + 1, ...`` (keys keep their RoPE positions, so packing the
rows together changes nothing). Greedy drafts stay on the device; the full-cache verification is
:func:`specdec.fast.engine.run_speculative_fast`. Keyed sampling: each draft is the compressed
view's keyed choice at its position, as the reference.

Greedy rounds run fused by default (:attr:`FastMagicDecDrafter.fuse_rounds`, measured on an H100): the
gather, the ``gamma`` draft steps, the verification and the device-side acceptance + KV compaction as ONE
function of device tensors (:meth:`FastMagicDecDrafter.fused_round`), a CUDA graph once the view is full
(``sink_tokens + window`` rows: one shape from then on).
"""

from __future__ import annotations

from typing import Callable

import torch

from einops import rearrange

from specdec.fast.engine import FastDrafter, FusedRound, TreeTensors, check_drafts_fit, run_speculative_fast, verify_and_accept
from specdec.fast.graphs import StaticRound
from specdec.fast.model import FastModel, StaticKVCache, as_fast_model, run_step, step_forward
from specdec.shared.keyed import keyed_choice
from specdec.shared.result import GenerationResult
from specdec.shared.round import Draft, RoundRecord, RoundState
from specdec.shared.sampling import logits_to_probs, sample_from_probs
from specdec.shared.streaming import streaming_rows
from specdec.shared.tree import Tree
from specdec.shared.validate import check_positive_int

__all__ = ["magicdec_generate"]


class FastMagicDecDrafter(FastDrafter):
    fuse_rounds: bool = True
    """Offer :meth:`fused_round` to the engine (greedy rounds once the StreamingLLM view is full; a view that
    still grows runs the stepwise round). On by default: on an H100 in steady state (every graph captured) the
    fused rounds ran 1.00x vanilla against 0.92x stepwise, faster on 9 of 10 prompts
    (``scripts/probes/fused_chain_rounds.py``, BENCHMARKS "Session 17"). Without CUDA the body runs eagerly;
    ``False`` restores the stepwise rounds."""

    def __init__(self, target: FastModel, gamma: int, sink_tokens: int, window: int):
        self.gamma, self.sink_tokens, self.window = gamma, sink_tokens, window
        self.target = target
        self.scratch = target.ensure_cache(1, sink_tokens + window + gamma + 1, name="magicdec")

    def propose(self, state: RoundState) -> Draft:
        fm, main, scratch, p = self.target, state.target_cache, self.scratch, state.params
        L, dev = main.length, fm.device
        gamma = min(self.gamma, state.max_drafts)
        # 1. The compressed view: sink rows + recent window of every layer, in one gather per K and V.
        rows = streaming_rows(L, self.sink_tokens, self.window, dev)
        s = rows.numel()
        scratch.k[:, :, :, :s] = main.k[:, :, :, rows]
        scratch.v[:, :, :, :s] = main.v[:, :, :, rows]
        scratch.set_length(s)
        # 2. Draft gamma tokens at their true positions.
        token = torch.tensor([[state.tokens[-1]]], dtype=torch.long, device=dev)
        one = torch.ones(1, 1, 1, dtype=torch.bool, device=dev)
        drafts, qs = [], []
        for i in range(gamma):
            pos = torch.full((1, 1), L + i, dtype=torch.long, device=dev)
            logits = run_step(fm, scratch, token, pos, one)[0, -1]
            scratch.set_length(scratch.length + 1)
            if p.greedy:
                token = torch.argmax(logits)[None, None]
            elif p.keyed:  # the compressed view's own keyed choice for position L + i + 1; no q
                pos = torch.tensor(L + i + 1, device=dev)
                token = keyed_choice(logits, p.temperature, p.top_k, p.top_p, p.seed, state.seq_id, pos).reshape(1, 1)
            else:
                q = logits_to_probs(logits, p.temperature, p.top_k, p.top_p)
                token = sample_from_probs(q, state.generator).reshape(1, 1).to(dev)
                qs.append(q)
            drafts.append(token[0])
        # 3. Nothing to roll back: the scratch cache is refilled next round.
        tokens = torch.cat([torch.tensor([state.tokens[-1]], dtype=torch.long, device=dev)] + drafts)
        q_all = torch.stack([torch.zeros_like(qs[0])] + qs) if qs else None
        return Draft(tokens, Tree.chain(gamma), q_all)

    # -- fused greedy rounds -------------------------------------------------------------------------

    def fused_round(self, state: RoundState, tree_size: int) -> FusedRound | None:
        """A whole greedy round -- the compressed view's gather, ``gamma`` draft steps, the verification,
        acceptance and KV compaction -- as ONE function of device tensors (:meth:`_body`): the same drafts
        as :meth:`propose` (the same rows gathered, the same one-token steps at the same positions) and the
        engine's :func:`~specdec.fast.engine.verify_and_accept`. A CUDA graph once the view holds its full
        ``sink_tokens + window`` rows (one shape from then on); before that (a short prompt) None: the
        stepwise round. The last rounds replay the full chain with acceptance limited to the first ``d``
        drafts. None when fusing is off, the size is not ``gamma + 1`` or the target is split over ranks."""
        if not (self.fuse_rounds and tree_size == self.gamma + 1 and state.target.tp is None):
            return None
        fm, main = self.target, state.target_cache
        L = main.length
        if L + tree_size > main.capacity:
            raise ValueError(f"KV cache overflow: {L} + {tree_size} rows > capacity {main.capacity}")
        rows = streaming_rows(L, self.sink_tokens, self.window)
        s = rows.numel()
        if s < self.sink_tokens + self.window:
            # the view still grows (a prompt shorter than it): a new shape every round, so no graph to replay --
            # the stepwise round (its one-token steps are graphs) instead of this body run eagerly (on an H100 the
            # eager body ran such prompts at 85-456 tok/s against 750-1870 stepwise; BENCHMARKS "Session 17")
            return None
        d = min(self.gamma, state.max_drafts)
        pack = torch.cat([torch.tensor([L, d, state.tokens[-1]], dtype=torch.long), rows])
        key = (id(main), "fused-magicdec-round", s, self.gamma)
        use_graphs = fm.use_graphs and fm.rope_table is not None
        round_ = StaticRound.get(fm.graphs, key, (self.scratch, fm.rope_table), lambda: self._make_body(main, s), (pack,),
                                 fm.device, use_graphs, lambda: main.restored_tree_rows(self.gamma + 1))
        packed, logits, _ = round_.run(pack)
        return FusedRound(packed, logits, 1 + d)

    def _make_body(self, main: StaticKVCache, s: int):
        """The fused round's body for a view of ``s`` rows (:class:`~specdec.fast.graphs.StaticRound`), with its
        constant tensors: the chain's (its own :class:`~specdec.fast.engine.TreeTensors`, which the graph reads
        by address) and each draft step's prefix length in the scratch cache (``s + i``)."""
        g, dev = self.gamma, self.target.device
        consts = (TreeTensors(Tree.chain(g), g + 1, dev), torch.arange(s, s + g, dtype=torch.int32, device=dev)[:, None])
        return lambda pack: self._body(main, pack, consts)

    def _body(self, main: StaticKVCache, pack: torch.Tensor, consts: tuple) -> tuple:
        """The fused round on device tensors only (graph-capturable; shapes fixed by the view's size and gamma).

        ``pack``: the verified length ``L``, the number ``d`` of drafts that may be accepted, the root token,
        then the view's ``s`` cache rows (:func:`specdec.shared.streaming.streaming_rows`). Gathers those rows
        of every layer into the scratch cache, drafts ``gamma`` tokens at positions ``L, L + 1, ...`` over it
        (greedy, as :meth:`propose`), verifies ``[root, d_1..d_gamma]`` against ``main`` and accepts greedily
        among the first ``1 + d`` nodes. Returns ``(packed, target logits [gamma + 1, V], node tokens)``."""
        fm, scratch, g = self.target, self.scratch, self.gamma
        chain, prefix = consts
        L, d, token = pack[0:1], pack[1], pack[2:3][None]
        rows = pack[3:]
        s = rows.numel()
        # 1. the compressed view: sink rows + recent window of every layer
        scratch.k[:, :, :, :s] = main.k[:, :, :, rows]
        scratch.v[:, :, :, :s] = main.v[:, :, :, rows]
        nodes = [token[0]]
        for i in range(g):
            # 2. draft i + 1: one step over the view at the true position L + i, then its argmax
            logits = step_forward(fm, scratch, token, (L + i)[None], chain.mask[:, :1, :1], prefix[i])[0, -1]
            token = torch.argmax(logits)[None, None]
            nodes.append(token[0])
        node_tokens = torch.cat(nodes)                                        # [gamma + 1]: root, d_1..d_gamma
        # 3-4. verify the chain on the full cache, accept among its first 1 + d nodes, compact
        vlogits, packed = verify_and_accept(fm, main, node_tokens, chain.parents, chain.depth, chain.ancestor, chain.depth <= d)
        return packed, vlogits, node_tokens

    @classmethod
    def propose_rows(cls, drafters: list["FastMagicDecDrafter"], rows: list[int], states: list[RoundState],
                     cache: StaticKVCache) -> list[Draft]:
        """MagicDec's own regime: the drafts of several batch rows, each draft step ONE target pass over every
        row's compressed view (the weights are read once per step for the whole batch, not once per row).

        The same drafts as :meth:`propose` row by row: row ``rows[i]``'s view is its sink rows and recent window
        of ``cache``, its steps run at its true positions, and the decode phase computes each row the same
        whatever the batch (docs/design.md §8). Greedy and keyed; rejection sampling (whose draws come from
        one generator in row order) drafts row by row. ``cache``: the batch's [B] target cache.
        """
        p = states[0].params
        if not (p.greedy or p.keyed) or len(rows) == 1:
            return [d.propose(st) for d, st in zip(drafters, states)]
        d0 = drafters[0]
        fm, dev = d0.target, d0.target.device
        if any((d.target, d.sink_tokens, d.window) != (fm, d0.sink_tokens, d0.window) for d in drafters):
            raise ValueError("propose_rows: the rows' MagicDec drafters must share the target, sink_tokens and window")
        n_layers, B, hkv, _, head_dim = cache.k.shape
        gammas = [min(d.gamma, st.max_drafts) for d, st in zip(drafters, states)]
        scratch = fm.ensure_rows(B, d0.sink_tokens + d0.window + max(d.gamma for d in drafters) + 1, name="magicdec_batch")
        # 1. Every drafting row's compressed view, in ONE gather per K and V: row b's view rows, padded with
        #    row 0 (past its length: never attended, and overwritten by its draft rows). Other rows: empty.
        views = {b: streaming_rows(st.target_cache.length, d0.sink_tokens, d0.window) for b, st in zip(rows, states)}
        width = max(v.numel() for v in views.values())
        idx = torch.zeros(B, width, dtype=torch.long)
        lens = torch.zeros(B, dtype=torch.int32)
        for b, v in views.items():
            idx[b, : v.numel()] = v
            lens[b] = v.numel()
        gather = rearrange(idx.to(dev), "b s -> 1 b 1 s 1").expand(n_layers, B, hkv, width, head_dim)
        scratch.k[:, :, :, :width] = torch.gather(cache.k, 3, gather)
        scratch.v[:, :, :, :width] = torch.gather(cache.v, 3, gather)
        scratch.length_t.copy_(lens.to(dev))
        scratch.length = width
        # 2. max(gammas) draft steps, every row in one pass each, at the rows' true positions L_b + i.
        token = torch.zeros(B, 1, dtype=torch.long)
        start = torch.zeros(B, 1, dtype=torch.long)
        for b, st in zip(rows, states):
            token[b, 0], start[b, 0] = st.tokens[-1], st.target_cache.length
        token, start = token.to(dev), start.to(dev)
        one = torch.ones(B, 1, 1, dtype=torch.bool, device=dev)
        drafted = []
        for i in range(max(gammas)):
            logits = run_step(fm, scratch, token, start + i, one)[:, -1]   # [B, V]
            scratch.length_t += 1
            scratch.length += 1
            if p.greedy:
                token = torch.argmax(logits, dim=-1, keepdim=True)
            else:   # keyed: each row's own keyed choice for position L_b + i + 1
                token = token.clone()
                for b, st in zip(rows, states):
                    pos = torch.tensor(st.target_cache.length + i + 1, device=dev)
                    token[b, 0] = keyed_choice(logits[b], p.temperature, p.top_k, p.top_p, p.seed, st.seq_id, pos).reshape(())
            drafted.append(token[:, 0])
        steps = torch.stack(drafted, dim=1) if drafted else token.new_zeros(B, 0)   # [B, max gamma]
        # 3. Row b's chain: its root and its first gamma_b drafts (nothing to roll back).
        out = []
        for b, g, st in zip(rows, gammas, states):
            root = torch.tensor([st.tokens[-1]], dtype=torch.long, device=dev)
            out.append(Draft(torch.cat([root, steps[b, :g]]), Tree.chain(g)))
        return out


def magicdec_generate(
    target,
    input_ids: torch.Tensor,
    prompt_length: int,
    gamma: int = 4,
    sink_tokens: int = 4,
    window: int = 256,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.magicdec_generate` (``gamma`` <= 127 on the fast path)."""
    check_positive_int("gamma", gamma)
    check_positive_int("sink_tokens", sink_tokens, minimum=0)
    check_positive_int("window", window)
    check_drafts_fit("gamma", gamma)
    fm = as_fast_model(target)
    return run_speculative_fast(fm, lambda: FastMagicDecDrafter(fm, gamma, sink_tokens, window), input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="magicdec_generate", tree_size=gamma + 1, on_round=on_round,
                                sampling=sampling, seed=seed)
