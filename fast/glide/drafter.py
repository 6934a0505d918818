"""The GLIDE drafter of the fast path: :class:`FastGlideDrafter`.

A round's body (catch-up + beam levels, all on the device), its capture as a CUDA graph per
catch-up length (:func:`specdec.fast.graphs.capture`), greedy rounds fused with the target's
verification and acceptance into one graph (:meth:`FastGlideDrafter.fused_round`), and the
device-driven rounds whose integers are built on the device (:meth:`FastGlideDrafter.launch_ahead`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from specdec.fast.engine import DeviceTree, FastDrafter, FusedRound, RunAhead
from specdec.fast.glide.cache import GlideBounds, SlidingCache
from specdec.fast.glide.layer import glide_kv_write, glide_layer
from specdec.fast.glide.packing import catch_up_glide_bounds, catch_up_segments, level_window_lo, pack_ints, unpack_ints
from specdec.fast.glide.state import AHEAD, CapturedRound, GlideRuntime, GraphKey, RoundBuffers, Verify
from specdec.fast.glide.weights import FastGlide
from specdec.fast.graphs import capture
from specdec.fast.model import FastModel, _kernels
from specdec.shared.glide import GlideConfig
from specdec.shared.keyed import keyed_logprobs, sequence_key
from specdec.shared.round import Draft, RoundState, max_drafts
from specdec.shared.sampling import SamplingParams
from specdec.shared.tree import validate_tree_shape

__all__ = ["FastGlideDrafter", "ShardedLogprobs"]


class ShardedLogprobs(NamedTuple):
    """The draft's log-probabilities over the full vocabulary, as one tensor-parallel rank holds them."""

    local: torch.Tensor
    """fp32 [P, R]: the rank's R real vocabulary columns (global ids ``rank * local_width + j``)."""
    vocab_size: int
    """V, the whole vocabulary."""
    local_width: int
    """V', the columns of each rank's lm_head slice (the vocabulary padded to ``world * V'``)."""


class FastGlideDrafter(FastDrafter, RunAhead):
    """GLIDE beam trees (chains when every level keeps one node) on the fast path.

    A round is one function of device tensors, :meth:`_round_body`: catch up on the last ``k``
    emitted tokens (root included), then one draft forward per beam level, the beam choice
    (:func:`specdec.fast.kernels.beam_select`, the rule of :func:`specdec.shared.glide.beam_level`)
    writing the tree's tokens, parents and ancestor mask in place, all on the device. Every integer
    the round needs (tokens, positions, cache rows, key ranges) is computed on the host and sent in
    ONE int32 copy (:meth:`_pack`). On CUDA the body is captured once per ``k`` as a CUDA graph
    (the graphs live in the :class:`FastGlide`'s :attr:`~FastGlide.runtime`, a
    :class:`~specdec.fast.glide.state.GlideRuntime`, and are reused across calls); elsewhere it runs
    eagerly. Only the first round's long catch-up (the prompt) runs outside it, in window-sized
    chunks.

    Keyed sampling (``sampling="keyed"``): the beam ranks the draft's processed log-probabilities plus the
    keyed Gumbel noise of each child's absolute position, exactly :class:`specdec.ref.glide.GlideDrafter`'s
    ranking (:meth:`_scores`); the sequence key and the positions are read from the pack on the device,
    so the graphs (keyed by the sampling constants, not the seed) serve every seed and every round.

    Truncated draft vocabulary (:attr:`FastGlide.vocab_map`, N target ids): the draft's logits are
    ``hidden @ lm_head_target[vocab_map]^T`` [n, N] (:meth:`FastGlide.lm_head_for`), the beam kernel picks
    draft ids and one gather turns them into target ids in the tree buffer, on the device
    (:meth:`_to_target`); keyed noise is that of the mapped target ids. Same trees as
    :class:`specdec.ref.glide.GlideDrafter`.

    Tensor parallelism (a target split over ranks, :mod:`specdec.fast.tp`; the draft layer then holds the same
    rank's heads, :func:`specdec.fast.glide.shard_glide`): every rank runs the same round on the same integers;
    the layer's row-parallel projections are all-reduced (:func:`~specdec.fast.glide.layer.glide_layer`), and
    the draft's logits come from the rank's slice of the vocab-parallel lm_head. With plain log-probabilities
    and the full vocabulary the beam never gathers them: the log-softmax needs each row's (max, sum of exp) per
    rank and each level's top-k a merge of every rank's best ``k`` (:meth:`_select`,
    :meth:`specdec.fast.tp.TensorParallel.beam_topk`); keyed sampling (top-k / top-p over the whole
    distribution) and a truncated draft vocabulary (its ids spread over the ranks) gather the logits and run
    the one-process beam on every rank. Every rank then writes the same tree.

    Greedy rounds go further (:meth:`fused_round`, used by
    :func:`specdec.fast.engine.run_speculative_fast`): the draft body, the target's verification of
    the tree and the device-side acceptance + KV compaction are ONE graph per ``k``, so a round is
    one host-to-device copy, one graph launch and one read-back.

    Device-driven rounds (:meth:`launch_ahead`): a round that catches up on the last
    ``levels + 1`` positions whatever was accepted (re-writing K/V rows that are already there with
    the same values) has ONE shape, and every integer it needs follows from the target cache length
    (:func:`specdec.fast.kernels.round_pack` builds the pack on the device, the tokens come from
    ``seq``, the sequence by position that the acceptance kernel writes). The engine launches it
    before reading the previous round's result, so the GPU does not wait for the host between rounds.
    """

    fuse_rounds: bool = True
    """Offer :meth:`fused_round` to the engine (profiling scripts turn it off to time the phases apart)."""
    ahead_rounds: bool = True
    """Offer device-driven rounds (:meth:`launch_ahead`) to the engine's fused loop."""

    def __init__(self, target: FastModel, glide: FastGlide, tree_shape: Sequence[int], row: int = 0):
        want = GlideConfig.from_target(target.config, glide.config.window)
        if want != glide.config:
            raise ValueError(f"GLIDE draft {glide.config} does not match the target, which needs {want}")
        if target.world != glide.world or (glide.tp is not None and glide.tp.rank != target.tp.rank):
            raise ValueError(f"the GLIDE draft is split over {glide.world} rank(s) and the target over {target.world}: "
                             "shard the draft for the target's ranks (as_fast_glide(glide, tp=target.tp))")
        self.target, self.glide = target, glide
        self.tree_shape = validate_tree_shape(tree_shape)
        if glide.vocab_map is not None:  # the fixed-size tree must be fillable from N draft tokens per node
            n_vocab, prev = glide.draft_vocab_size, 1
            for level, width in enumerate(self.tree_shape):
                if width > prev * n_vocab:
                    raise ValueError(f"tree_shape level {level + 1} keeps {width} nodes, more than {prev} nodes x "
                                     f"{n_vocab} draft tokens can fill (draft vocabulary of {n_vocab} tokens)")
                prev = width
        self.lm_head = glide.lm_head_for(target)  # the target's lm_head, or its draft-vocabulary rows
        # the sliding cache and the captured rounds persist on the glide object across calls; row b > 0
        # of a batch drafts with its own (two drafters never share a sliding cache within one call)
        if row < 0:
            raise ValueError(f"row must be >= 0 (the batch row this drafter serves), got {row}")
        if row == 0:
            if glide.runtime is None:
                glide.runtime = GlideRuntime(SlidingCache(glide))
            self.runtime: GlideRuntime = glide.runtime
        else:
            if row not in glide.row_runtimes:
                glide.row_runtimes[row] = GlideRuntime(SlidingCache(glide))
            self.runtime = glide.row_runtimes[row]
        self.cache, self.graphs, self._depth = self.runtime.cache, self.runtime.graphs, self.runtime.depth
        self.cache.n, self.cache.base = 0, 0
        self.processed = 0
        self.use_graphs = target.use_graphs and target.rope_table is not None
        self._ahead_buf: CapturedRound | None = None  # the device-driven round of this call (graph or eager buffers)
        self._seq_ready = False  # seq holds this call's tokens

    batch_rounds: bool = False
    """Draft the rows of a batch together (:mod:`specdec.fast.glide.batch`: one draft-layer pass per step for all
    rows) where :func:`~specdec.fast.glide.batch.can_batch` allows; off (the default): row after row. Off by
    default because measured slower on an H200 (BENCHMARKS "Batched decoding", session 14: tree_spec at B = 8
    2119 vs 4042 tok/s row by row): the batched round runs eagerly -- ~130 launches and a beam choice per row
    and level -- while a row's own round replays one CUDA graph. Equal trees either way (tested)."""

    @classmethod
    def propose_rows(cls, drafters: list["FastGlideDrafter"], rows: list[int], states: list[RoundState],
                     cache) -> list[Draft]:
        """Step 1 for several batch rows: one batched round (:func:`specdec.fast.glide.batch.propose_batch`)
        when :attr:`batch_rounds` is on and the rows allow it, else each row's :meth:`propose` in turn."""
        from specdec.fast.glide.batch import can_batch, propose_batch

        if cls.batch_rounds and can_batch(drafters, states):
            return propose_batch(drafters, rows, states, cache)
        return [d.propose(st) for d, st in zip(drafters, states)]

    @classmethod
    def fused_rows(cls, drafters: list["FastGlideDrafter"], rows: list[int], states: list[RoundState], cache,
                   tree_size: int):
        """With :attr:`batch_rounds` on: a greedy round of every row -- the batched draft, one verification
        pass, acceptance and compaction -- as ONE CUDA graph (:func:`specdec.fast.glide.batch.fused_batch_round`)
        where :func:`~specdec.fast.glide.batch.can_fuse_batch` allows; else None."""
        from specdec.fast.glide.batch import can_fuse_batch, fused_batch_round

        if cls.batch_rounds and can_fuse_batch(drafters, rows, states, cache, tree_size):
            return fused_batch_round(drafters, rows, states, cache)
        return None

    def _scores(self, hidden: torch.Tensor, keyed: tuple[float, int, float] | None, u: dict[str, torch.Tensor],
                level: int) -> torch.Tensor | ShardedLogprobs:
        """What the beam ranks for the children of the nodes whose draft hidden states are ``hidden`` [n, H]:
        [n, V] fp32 ([n, N] over a truncated draft vocabulary) -- must match
        :meth:`specdec.ref.glide.GlideDrafter._scores`. On a tensor-parallel target with plain log-probabilities
        and the full vocabulary: the rank's slice of them, a :class:`ShardedLogprobs` (:meth:`_select` takes both).

        * ``keyed`` None: the draft's log-probabilities, ``log_softmax(hidden @ lm_head^T)`` (no final norm).
        * ``keyed = (temperature, top_k, top_p)``: the processed log-probabilities plus the keyed Gumbel noise
          of the children's absolute position (:func:`specdec.shared.keyed.keyed_logprobs`): the root's
          children (``level`` 0) at L + 1, the children of level ``level - 1``'s nodes at L + level + 1 --
          ``u["level_pos"][level]``. The position and the row's sequence key (``u["noise_key"]``) are
          read from the round's device pack, never on the host: the same captured graph serves every
          round and every seed. With a truncated vocabulary draft id i gets the noise of target token
          ``vocab_map[i]``.
        """
        logits = F.linear(hidden.to(self.target.dtype), self.lm_head)  # no final norm
        tp = self.target.tp
        if tp is not None:   # logits of this rank's vocabulary slice [n, V']
            vocab = self.target.config.vocab_size
            if keyed is None and self.glide.vocab_map is None:   # the beam merges the ranks' best (_select)
                return ShardedLogprobs(tp.log_softmax(logits, vocab), vocab, logits.shape[-1])
            logits = tp.all_gather_last(logits)[..., :vocab]     # the whole distribution on every rank
            if self.glide.vocab_map is not None:
                logits = logits[:, self.glide.vocab_map]
        if keyed is None:   # one launch for 16-bit logits on CUDA (no separate fp32 cast)
            return _kernels().logprobs_f32(logits)
        temperature, top_k, top_p = keyed
        key = u["noise_key"][0]  # int32 on the device: the 32-bit key's bits (keyed_noise masks them)
        positions = u["level_pos"][level : level + 1].expand(logits.shape[0])
        vocab = {} if self.glide.vocab_map is None else {"token_ids": self.glide.vocab_map}
        return keyed_logprobs(logits, temperature, top_k, top_p, key, positions, **vocab)

    def _select(self, cum: torch.Tensor | None, logprobs: torch.Tensor | ShardedLogprobs, n: int, tokens: torch.Tensor,
                parents: torch.Tensor, cum_out: torch.Tensor, first: int, parent_first: int, ancestor: torch.Tensor,
                root_token: torch.Tensor | None) -> None:
        """One beam level written into the tree buffers (graph-capturable): the best ``n`` (node, token) pairs
        by :func:`specdec.shared.glide.beam_level`'s order become nodes ``first .. first + n - 1`` (token,
        parent = ``parent_first`` + the chosen node's index in the level, cumulative score in ``cum_out``,
        ancestor-or-self row); ``root_token`` (the first level) also writes the root, node 0.

        Full log-probabilities [P, V]: :func:`specdec.fast.kernels.beam_select` does all of it. A
        :class:`ShardedLogprobs` (tensor parallelism): :meth:`specdec.fast.tp.TensorParallel.beam_topk` picks the
        pairs (the same order: every rank gets the same pairs), then the same writes in torch ops."""
        if not isinstance(logprobs, ShardedLogprobs):
            _kernels().beam_select(cum, logprobs, n, tokens, parents, cum_out, node_offset=first, parent_offset=parent_first,
                                   ancestor=ancestor, root_token=root_token)
            return
        parent, token, score = self.target.tp.beam_topk(cum, logprobs.local, logprobs.vocab_size, n, logprobs.local_width)
        if root_token is not None:   # the root: node 0, parent -1, ancestor row {0}
            tokens[:1].copy_(root_token)
            parents[:1].fill_(-1)
            ancestor[0].fill_(False)
            ancestor[0, 0] = True
        new = torch.arange(first, first + n, device=tokens.device)
        tokens[first : first + n].copy_(token)
        parents[first : first + n].copy_(parent + parent_first)
        cum_out[:n].copy_(score)
        rows = ancestor[parent + parent_first]          # the parents' rows (written by an earlier level or above)
        rows[:, 0] = True
        rows[torch.arange(n, device=rows.device), new] = True
        ancestor[first : first + n] = rows

    def _to_target(self, tokens: torch.Tensor) -> None:
        """Turn the draft ids the beam kernel wrote into ``tokens`` [n] (a view of the tree buffer) into target
        ids, in place, on the device (graph-capturable); nothing without a truncated vocabulary. Matches
        :meth:`specdec.ref.glide.GlideDrafter._to_target`."""
        if self.glide.vocab_map is not None:
            tokens.copy_(self.glide.vocab_map[tokens])

    @staticmethod
    def _keyed(params: SamplingParams) -> tuple[float, int, float] | None:
        """The sampling constants a keyed round is built with (a graph bakes them in: part of its
        :class:`~specdec.fast.glide.state.GraphKey`), or None when the beam ranks plain log-probabilities."""
        return (params.temperature, params.top_k, params.top_p) if params.keyed else None

    def _catch_up_prefix(self, tokens: list[int], stop_at: int) -> None:
        """Write the draft K/V of positions [processed, stop_at) (the prompt, or a catch-up longer than a round's)
        into the sliding cache. Only their K/V are ever read -- the round's own catch-up runs the whole layer
        for the rows whose hidden states it uses -- and only the last ``window`` of them can be (a query at
        t >= stop_at sees (t - window, t]), so no more are written (:func:`~specdec.fast.glide.layer.glide_kv_write`,
        the K/V the layer would write; as :meth:`specdec.ref.glide.GlideDrafter._catch_up`). The target's
        cache is not read: the K/V do not depend on it."""
        dev, window, cache = self.glide.device, self.glide.window, self.cache
        start = max(self.processed, stop_at - window)
        if start >= stop_at:
            return
        if start > self.processed:
            # every cached row and every skipped position lie before any later query's window: start afresh at `start`
            cache.n, cache.base = 0, start
        cache.make_room(stop_at - start)
        rows = torch.arange(start - cache.base, stop_at - cache.base, dtype=torch.int32, device=dev)
        ids = torch.tensor(tokens[start:stop_at], dtype=torch.long, device=dev)
        glide_kv_write(self.target, self.glide, cache, ids[None], torch.arange(start, stop_at, device=dev), rows[None])
        cache.n = stop_at - cache.base
        self.processed = stop_at

    def prefill(self, state: RoundState) -> None:
        """The draft's pass over the prompt, called by the engine during the prefill (so it counts in the
        time to first token, like the target's): every position but the last ``levels + 1``, which the
        first round catches up on; greedy calls also copy the sequence to the device (``seq``)."""
        cache = state.target_cache
        k = len(self.tree_shape) + 1
        self._catch_up_prefix(state.tokens, max(cache.length + 1 - k, 0))
        if state.params.greedy and self.fuse_rounds:
            self._sync_seq(state)

    def _pack(self, tokens: list[int], L: int, k: int, shape: tuple[int, ...], scratch: bool = False,
              depth_limit: int | None = None, params: SamplingParams | None = None, seq_id: int = 0):
        """Every integer of one round, for ONE host-to-device copy: ``(flat list, layout)`` of :func:`pack_ints`.

        ``scratch=True`` builds a stand-in round whose catch-up rows lie past the prefix (rows the
        tree overwrites every round), for capturing graphs of other catch-up lengths harmlessly.
        ``depth_limit`` (default: every level) is the deepest level a fused round may accept.
        Keyed ``params`` (seed resolved) add ``noise_key``: the 32-bit key of sequence ``seq_id`` -- the batch
        row's own sequence, whose noise the reference ranks the row's beam with
        (:func:`specdec.shared.keyed.sequence_key`) -- as an int32's bits, which :meth:`_scores` reads.
        """
        window, base = self.glide.window, self.cache.base
        n = L + 1 - base  # prefix rows in the sliding cache after the catch-up (root included)
        first = L + 1 if scratch else L + 1 - k
        levels = len(shape)
        # tree level l (depth l + 1, position L + l + 1, query row n + l) sees prefix rows
        # (n + l - window, n) and the tree rows n + j of its ancestors
        level_lo = level_window_lo(n, levels, window)
        level_pos = [L + lv + 1 for lv in range(levels)]
        tree_rows = [n + j for j in range(sum(shape))]
        segments = catch_up_segments([0] * k if scratch else tokens[L + 1 - k :], first, base, window)
        # the tree levels read n (prefix rows = tree_start) and L from the catch-up's self_hi / cross_hi; a real
        # catch-up ends at row n - 1, position L, so these are its own values (a scratch one must not go past them)
        segments.update(self_hi=[n], cross_hi=[L])
        max_depth = [levels if depth_limit is None else depth_limit]
        segments = dict(segments, level_lo=level_lo, level_pos=level_pos, tree_rows=tree_rows, max_depth=max_depth)
        if params is not None and params.keyed:
            key = sequence_key(params.seed, seq_id)
            segments["noise_key"] = [key - (1 << 32) if key >= 1 << 31 else key]  # the same 32 bits as an int32
        return pack_ints(segments)

    def _round_body(self, buf: RoundBuffers, shape: tuple[int, ...]) -> None:
        """Catch-up of the last ``k`` tokens + the beam levels of ``shape``; writes buf.out_* (graph-capturable)."""
        dev, cache = self.glide.device, self.cache
        tk, tv, span = buf.target_k, buf.target_v, buf.cross_span
        u = unpack_ints(buf.pack, buf.layout)
        # 1. Catch up: the last k emitted tokens, root last; query at position t sees target rows < t.
        h = glide_layer(self.target, self.glide, cache, u["tokens"][None], u["pos"], u["rows"][None], tk, tv,
                        catch_up_glide_bounds(u, span))
        # the beam's scores for the root's children [1, V] (none without a level: the last round)
        logprobs = self._scores(h[0, -1:], buf.keyed, u, 0) if shape else None
        # The tree buffers (global node ids, root = 0): every level's kernel writes its nodes' tokens,
        # parents and ancestor-or-self rows in place (the root's entries with the first level).
        m = 1 + sum(shape)
        out_tokens = torch.empty(m, dtype=torch.long, device=dev)
        out_parents = torch.empty(m, dtype=torch.long, device=dev)
        full = torch.empty(m, m, dtype=torch.bool, device=dev)
        # cumulative log-probabilities of the current and the next level (two buffers: a level reads one, writes the other)
        cums = torch.empty(2, -(-max(shape, default=1) // 4) * 4, dtype=torch.float32, device=dev)  # rows 16-byte aligned
        if not shape:  # no draft level (the last round): the root alone
            out_tokens.copy_(u["tokens"][-1:])
            out_parents.fill_(-1)
            full.fill_(True)
        prev_first, prev_n, first = 0, 1, 1
        for level, width in enumerate(shape):
            # 2. Best (node, token) pairs over the whole level (specdec.shared.glide.beam_level).
            vocab = logprobs.vocab_size if isinstance(logprobs, ShardedLogprobs) else logprobs.shape[-1]
            n = min(width, prev_n * vocab)
            self._select(cums[(level + 1) % 2, :prev_n] if level else None, logprobs, n, out_tokens, out_parents,
                         cums[level % 2], first, prev_first, full, u["tokens"][-1:] if level == 0 else None)
            self._to_target(out_tokens[first : first + n])  # draft ids -> target ids (truncated vocabulary)
            if level == len(shape) - 1:
                break
            # 3. One draft forward over this level (tree rows follow the prefix rows in the cache):
            #    prefix rows (row - window, n) and the ancestors' tree rows; target rows [0, L).
            lo = first - 1  # tree row offset of this level (the root is a prefix row)
            bounds = GlideBounds(self_lo=u["level_lo"][level : level + 1], self_hi=u["self_hi"], cross_hi=u["cross_hi"],
                                 cross_span=span, tree_start=u["self_hi"])
            h = glide_layer(self.target, self.glide, cache, out_tokens[first : first + n][None],
                            u["level_pos"][level : level + 1].expand(n), u["tree_rows"][lo : lo + n][None], tk, tv, bounds,
                            tree_mask=full[first : first + n, 1 : first + n][None])
            logprobs = self._scores(h[0], buf.keyed, u, level + 1)  # the next level's children: L + level + 2
            prev_first, prev_n, first = first, n, first + n
        buf.out_tokens, buf.out_parents, buf.out_anc = out_tokens, out_parents, full

    def _prepare(self, state: RoundState, shape: tuple[int, ...] | None = None, depth_limit: int | None = None):
        """Host side of a round: catch up on the prompt (chunks), pack the round's integers.

        Returns ``(k, shape, pack, layout, target_k, target_v, key)``: the catch-up length, the tree
        shape of this round (default: :meth:`_shape`), the packed integers, and the
        :class:`~specdec.fast.glide.state.GraphKey` (target cache allocation, RoPE table, ``k``, shape,
        and the keyed sampling constants when the beam is keyed).
        """
        target_k = state.target_cache.k[-1]  # [1, Hkv, capacity, D]: rows [0, L) are verified
        target_v = state.target_cache.v[-1]
        shape = self._shape(state) if shape is None else shape
        L, k = self._start_round(state)
        pack, layout = self._pack(state.tokens, L, k, shape, depth_limit=depth_limit, params=state.params,
                                  seq_id=state.seq_id)
        self._caught_up(L)
        # one set of graphs per (target cache allocation, RoPE table): the graphs read both by address
        table = self.target.rope_table[0].data_ptr() if self.target.rope_table is not None else 0
        key = GraphKey(target_k.data_ptr(), tuple(target_k.shape), table, k, shape, sampling=self._keyed(state.params))
        return k, shape, pack, layout, target_k, target_v, key

    def _start_round(self, state: RoundState) -> tuple[int, int]:
        """The host side of a round's start: ``(L, k)`` -- the verified length and the number of last positions
        (root included, at most levels + 1) the round's body catches up on. The positions before those (a catch-up
        longer than a round's) get their draft K/V here first (:meth:`_catch_up_prefix`); the sliding cache gets
        room for the k rows."""
        L = state.target_cache.length
        k = min(L + 1 - self.processed, len(self.tree_shape) + 1)
        self._catch_up_prefix(state.tokens, L + 1 - k)
        self.cache.make_room(k)
        return L, k

    def _caught_up(self, L: int) -> None:
        """After a round's catch-up (packed or run): positions [0, L] are in the draft's cache."""
        self.cache.n = L + 1 - self.cache.base
        self.processed = L + 1

    def _levels_left(self, budget: int) -> int:
        """Levels a round may accept when ``budget`` tokens may still be emitted (one is the bonus token).
        The device-driven rounds apply the same rule on the device (``round_pack``, kind 2)."""
        return min(len(self.tree_shape), max_drafts(budget))

    def _shape(self, state: RoundState) -> tuple[int, ...]:
        """This round's tree shape: the full one, or fewer levels when fewer tokens may still be emitted."""
        return self.tree_shape[: self._levels_left(state.budget)]

    def _depth_tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        depth_t = self._depth.get(shape)
        if depth_t is None or depth_t.device != self.glide.device:
            depth_t = self._depth[shape] = torch.tensor([0] + [lv + 1 for lv, w in enumerate(shape) for _ in range(w)],
                                                        device=self.glide.device)
        return depth_t

    def _replay(self, g: CapturedRound, pack: list[int]) -> RoundBuffers:
        g.host.numpy()[:] = pack  # pinned staging buffer: the previous round's copy has completed
        g.buf.pack.copy_(g.host, non_blocking=True)
        g.graph.replay()
        return g.buf

    def _capture_all(self, state: RoundState, key: GraphKey, shape, target_k, target_v, verify: Verify | None = None) -> None:
        """Capture every catch-up length now (stand-in rounds on scratch rows), so no capture or kernel
        compilation stalls a later round. ``key._replace(k=k)`` names each graph."""
        L = state.target_cache.length
        pool = torch.cuda.graph_pool_handle()  # rounds never overlap: one memory pool for all
        for kk in range(1, len(self.tree_shape) + 2):
            kkey = key._replace(k=kk)
            if kkey not in self.graphs:
                self.graphs[kkey] = self._capture(*self._pack(state.tokens, L, kk, shape, scratch=True, params=state.params),
                                                  shape, target_k, target_v, pool, verify, keyed=key.sampling)

    def propose(self, state: RoundState) -> Draft:
        dev = self.glide.device
        L = state.target_cache.length
        k, shape, pack, layout, target_k, target_v, key = self._prepare(state)
        if self.use_graphs and shape == self.tree_shape:  # a shorter shape (the last rounds) runs eagerly
            if key not in self.graphs:
                self._capture_all(state, key, shape, target_k, target_v)
            buf = self._replay(self.graphs[key], pack)
        else:
            buf = RoundBuffers(torch.tensor(pack, dtype=torch.int32, device=dev), layout, target_k, target_v, cross_span=L + 1,
                               keyed=key.sampling)
            self._round_body(buf, shape)
        return Draft(buf.out_tokens, DeviceTree(buf.out_parents, self._depth_tensor(shape), buf.out_anc))

    def fused_round(self, state: RoundState, tree_size: int) -> FusedRound | None:
        """A whole greedy round -- draft, verification, acceptance and KV compaction -- as ONE CUDA graph.

        Returns a :class:`~specdec.fast.engine.FusedRound` ``(packed, logits, m)``: ``packed`` and ``logits`` as
        :func:`specdec.fast.engine.verify_and_accept` returns them, ``m`` the number of nodes of this
        round's tree. The last rounds (fewer tokens left than levels) replay the same full-shape graph
        with acceptance limited to the first ``d`` levels, whose nodes are exactly the tree the shorter
        shape would draft (the levels are chosen one after another) -- same path, same tokens. The
        graphs are captured per catch-up length on the first fused round of a target cache; without
        graphs (CPU) the same body runs eagerly. None when fusing is off or the size does not match.
        """
        shape = self.tree_shape
        cache = state.target_cache
        if not (self.fuse_rounds and tree_size == 1 + sum(shape)):
            return None
        if cache.length + tree_size > cache.capacity:
            raise ValueError(f"KV cache overflow: {cache.length} + {tree_size} rows > capacity {cache.capacity}")
        L = cache.length
        d = len(self._shape(state))  # levels this round may accept
        seq = self._sync_seq(state)
        k, shape, pack, layout, target_k, target_v, key = self._prepare(state, shape=shape, depth_limit=d)
        self._set_ctl(L + state.budget)
        verify = Verify(cache, self._depth_tensor(shape), seq)
        if not self.use_graphs:
            buf = RoundBuffers(torch.tensor(pack, dtype=torch.int32, device=self.glide.device), layout, target_k, target_v,
                               cross_span=L + 1)
            self._body(buf, shape, verify)
            if self.ahead_rounds and self._ahead_buf is None:
                self._ahead_buf = self._ahead_buffers(target_k, target_v, verify)
        else:
            key = key._replace(fused=True, length_ptr=cache.length_t.data_ptr(), seq_ptr=seq.data_ptr())
            if key not in self.graphs:
                self._capture_all(state, key, shape, target_k, target_v, verify=verify)
            if self.ahead_rounds and L + 1 - (len(shape) + 1) >= self.cache.base:
                akey = key._replace(k=AHEAD)
                if akey not in self.graphs:  # real rows of this length: see _capture
                    self.graphs[akey] = self._capture(None, None, shape, target_k, target_v, verify=verify, ahead=True)
                self._ahead_buf = self.graphs[akey]
            buf = self._replay(self.graphs[key], pack)
        return FusedRound(buf.packed, buf.logits, 1 + sum(shape[:d]))

    # -- device-driven rounds ------------------------------------------------------------------------

    def _sync_seq(self, state: RoundState) -> torch.Tensor:
        """The device copy of the sequence by position (int32, sized for the target cache); on the first
        fused round of a call it receives the host's tokens (prompt and first token)."""
        cache, rt = state.target_cache, self.runtime
        key = (cache.k.data_ptr(), cache.capacity)
        if rt.ctl is None:  # read by address by every device-driven graph: allocated once
            rt.ctl = torch.zeros(4, dtype=torch.int32, device=self.glide.device)
            rt.ctl_value = None
        if rt.seq_key != key:
            rt.seq = torch.zeros(cache.capacity + 8, dtype=torch.int32, device=self.glide.device)
            rt.seq_key = key
        seq = rt.seq
        if not self._seq_ready:
            seq[: len(state.tokens)].copy_(torch.tensor(state.tokens, dtype=torch.int32))
            self._seq_ready = True
        return seq

    def _set_ctl(self, end: int) -> None:
        """``ctl = [base, end]`` for :func:`specdec.fast.kernels.round_pack` (``end``: the cache length at
        which the call's budget is spent)."""
        value = (self.cache.base, end)
        if self.runtime.ctl_value != value:
            self.runtime.ctl.copy_(torch.tensor([*value, 0, 0], dtype=torch.int32))
            self.runtime.ctl_value = value

    def _ahead_recipe(self, shape: tuple[int, ...]) -> tuple[list[list[int]], dict]:
        """The :func:`specdec.fast.kernels.round_pack` recipe of a round that catches up on the last
        ``len(shape) + 1`` positions: every entry of :meth:`_pack` (``k = len(shape) + 1``) written as a
        function of the cache length ``L`` and the window base. Returns (5 field lists, layout)."""
        from specdec.fast.kernels.round_pack import AFFINE, DEPTH, NO_CLAMP, TOKEN

        k, w, levels = len(shape) + 1, self.glide.window, len(shape)

        def aff(a: int, b: int, c: int, lo: int = NO_CLAMP) -> tuple[int, ...]:
            return (AFFINE, a, b, c, lo)

        # catch-up of positions L + 1 - k + i (i < k): rows = position - base, window (row - w, row]
        entries = dict(
            tokens=[(TOKEN, 0, 0, 1 - k + i, 0) for i in range(k)],
            rows=[aff(1, -1, 1 - k + i) for i in range(k)],
            row_lo=[aff(1, -1, 2 - k + i - w, 0) for i in range(k)],
            row_hi=[aff(1, -1, 2 - k + i) for i in range(k)],
            pos=[aff(1, 0, 1 - k + i) for i in range(k)],
            zeros=[aff(0, 0, 0, 0)] * k,
            self_lo=[aff(1, -1, 2 - k - w, 0)],
            self_hi=[aff(1, -1, 1)],      # n = L + 1 - base prefix rows
            cross_hi=[aff(1, 0, 0)],      # L
            level_lo=[aff(1, -1, 2 + lv - w, 0) for lv in range(levels)],
            level_pos=[aff(1, 0, lv + 1) for lv in range(levels)],
            tree_rows=[aff(1, -1, 1 + j) for j in range(sum(shape))],
            max_depth=[(DEPTH, 0, 0, levels, 0)],
        )
        fields, layout = [], None
        for f in range(5):
            flat, layout = pack_ints({name: [e[f] for e in es] for name, es in entries.items()})
            fields.append(flat)
        return fields, layout

    def _ahead_buffers(self, target_k, target_v, verify: Verify) -> CapturedRound:
        """Static buffers of a device-driven round (its pack is filled on the device), run eagerly (no graph)."""
        fields, layout = self._ahead_recipe(self.tree_shape)
        dev = self.glide.device
        buf = RoundBuffers(torch.zeros(len(fields[0]), dtype=torch.int32, device=dev), layout, target_k, target_v,
                           cross_span=target_k.shape[-2], recipe=torch.tensor(fields, dtype=torch.int32, device=dev))
        return CapturedRound(buf, verify)

    def _ahead_body(self, buf: RoundBuffers, shape: tuple[int, ...], verify: Verify) -> None:
        """A device-driven round: the pack from the cache length (one launch), then :meth:`_body`."""
        _kernels().round_pack(buf.recipe, verify.seq, verify.target_cache.length_t, self.runtime.ctl, buf.pack)
        self._body(buf, shape, verify)

    def run_ahead(self) -> RunAhead | None:
        """This drafter runs its own device-driven rounds (unless :attr:`ahead_rounds` is off)."""
        return self if self.ahead_rounds else None

    def can_run_ahead(self, L: int, emitted: int, max_gen_len: int) -> bool:
        """May a device-driven round start right after the round in flight, which began at cache length
        ``L`` with ``emitted`` tokens out? Only if that round cannot spend the budget (it emits at most
        ``levels + 1`` tokens), the next catch-up starts at or after the window base, and the draft
        window needs no host-side shift (:meth:`SlidingCache.make_room`) for any outcome."""
        k, base, w = len(self.tree_shape) + 1, self.cache.base, self.glide.window
        return (self.ahead_rounds and self._ahead_buf is not None and max_gen_len - emitted > k
                and L + 2 - k >= base and L + k + 1 - base <= 2 * w)

    def launch_ahead(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch a device-driven round (see the class docstring); returns its ``(packed, logits)``."""
        g = self._ahead_buf
        if g.graph is not None:
            g.graph.replay()
        else:
            self._ahead_body(g.buf, self.tree_shape, g.inputs)
        return g.buf.packed, g.buf.logits

    def ahead_round_read(self, L: int, emitted: int, max_gen_len: int) -> int:
        """Host bookkeeping after reading a device-driven round that began at cache length ``L``: its
        catch-up covered positions up to ``L``. Returns the number of tree nodes it could accept from."""
        self.processed = L + 1
        self.cache.n = L + 1 - self.cache.base
        return 1 + sum(self.tree_shape[: self._levels_left(max_gen_len - emitted)])

    def _body(self, buf: RoundBuffers, shape: tuple[int, ...], verify: Verify | None = None) -> None:
        """:meth:`_round_body`, then (with ``verify``: target cache, depth, seq) the verification and greedy
        acceptance of the drafted tree (:func:`specdec.fast.engine.verify_and_accept`); nodes deeper than
        the pack's ``max_depth`` can never be accepted."""
        from specdec.fast.engine import verify_and_accept

        self._round_body(buf, shape)
        if verify is not None:
            valid = verify.depth <= buf.pack[buf.layout["max_depth"][0]]
            buf.logits, buf.packed = verify_and_accept(self.target, verify.target_cache, buf.out_tokens, buf.out_parents,
                                                       verify.depth, buf.out_anc, valid, seq=verify.seq)

    def _capture(self, pack: list[int] | None, layout: dict | None, shape, target_k, target_v, pool=None,
                 verify: Verify | None = None, ahead: bool = False,
                 keyed: tuple[float, int, float] | None = None) -> CapturedRound:
        """Capture :meth:`_body` for this catch-up length as a CUDA graph (static buffers).

        With ``verify`` the warm-up runs verify and compact too: the target rows and length they
        change are restored afterwards. ``ahead=True`` captures the device-driven round
        (:meth:`_ahead_body`) instead: its warm-up works on the real last ``levels + 1`` positions,
        re-writing their draft K/V rows with the values they get anyway.
        The warm-up and the capture are :func:`specdec.fast.graphs.capture` (side stream, twice, then
        the capture into ``pool``).
        """
        dev = self.glide.device
        if ahead:
            buf = self._ahead_buffers(target_k, target_v, verify).buf
            body = lambda: self._ahead_body(buf, shape, verify)  # noqa: E731
        else:  # cross_span: the split count must hold for any length
            buf = RoundBuffers(torch.tensor(pack, dtype=torch.int32, device=dev), layout, target_k, target_v,
                               cross_span=target_k.shape[-2], keyed=keyed)
            body = lambda: self._body(buf, shape, verify)  # noqa: E731
        restored = verify.target_cache.restored_tree_rows(1 + sum(shape)) if verify is not None else contextlib.nullcontext()
        with restored:
            # warm-up twice: compiles kernels (writes the same K/V rows again: harmless)
            graph, _ = capture(body, device=dev, warmup=2, pool=pool)
        # the graph reads every tensor it was captured with by address: keep the inputs made outside it alive
        host = torch.empty(len(pack) if pack is not None else 1, dtype=torch.int32).pin_memory()
        return CapturedRound(buf, verify, graph, host)
