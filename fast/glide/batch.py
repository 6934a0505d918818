"""One GLIDE round for every row of a batch at once: :func:`propose_batch` (issue 19).

Row by row, a batch of B rows costs B draft rounds, each a chain of small launches; here every step of the
round -- the catch-up and each beam level -- is ONE draft-layer pass over all B rows (the layer's kernels
take per-row key ranges), and only the beam choice runs per row (:func:`specdec.fast.kernels.beam_select`,
one launch per row and level). The trees are those :meth:`FastGlideDrafter.propose
<specdec.fast.glide.drafter.FastGlideDrafter.propose>` drafts row by row: same catch-up, same levels, same
beam rule, same keys seen by every query (the reference is :class:`specdec.ref.glide.GlideDrafter`).

How the rows fit one pass:

* **Sliding caches.** Each row keeps its own :class:`~specdec.fast.glide.cache.SlidingCache`. A round stacks
  them into one [B, Hkv, R, D] buffer (one copy), runs on it, and copies them back (one multi-tensor copy):
  the catch-up's K/V rows persist, the tree rows are scratch.
* **Ragged catch-up.** Row b catches up on its last k_b emitted positions (k_b <= levels + 1); rows with
  fewer are padded at the front with copies of their first query (same token, position, cache row and keys:
  the copy writes the same K/V row with the same values and its output is dropped).
* **Finished rows** (not drafting this round) ride along as dummies: one token at position 1 over a zero
  scratch cache and the first row of their target cache; their outputs are dropped and nothing of theirs is
  written back. So the pass keeps the batch cache's B rows and its target K/V need no gather.
* **Last rounds.** A row with fewer tokens left than levels takes the first levels of the full tree: the levels
  are chosen one after another, so they are the tree the shorter shape drafts (as the fused rounds do).

* **Graphs.** On CUDA a round in which every row drafts the full tree with plain log-probabilities replays ONE
  captured graph of all of the above (:func:`_capture`, per batch size, catch-up length, target cache and row
  caches; the pack refilled through a pinned buffer). A greedy round of that kind goes further
  (:func:`fused_batch_round`, the engine's ``FastDrafter.fused_rows``): the same graph also verifies the B trees in
  one target pass, accepts every row's path (:func:`specdec.fast.kernels.greedy_paths`, the batch-of-one rule) and
  compacts the accepted rows, so a round is one launch and one [B, 2 + 2M] read-back. The reference of every
  tree, path and token is the eager round here (tested equal on the CPU through a stand-in graph, and on the GPU).

Greedy and rejection sampling (the GLIDE candidates are deterministic: plain log-probabilities) and keyed
sampling (each row's beam ranked with its own sequence's keyed noise), the full or a truncated draft
vocabulary, one process; under tensor parallelism the rows draft one after another
(:meth:`FastGlideDrafter.propose_rows <specdec.fast.glide.drafter.FastGlideDrafter.propose_rows>`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from specdec.fast.engine import DeviceTree
from specdec.fast.glide.cache import GlideBounds, SlidingCache
from specdec.fast.glide.layer import glide_layer
from specdec.fast.glide.packing import catch_up_glide_bounds, catch_up_segments, level_window_lo
from specdec.fast.model import StaticKVCache, _kernels
from specdec.shared.keyed import keyed_logprobs, sequence_key
from specdec.shared.round import Draft, RoundState

__all__ = ["propose_batch", "can_batch", "can_fuse_batch", "fused_batch_round", "CAPTURE", "FUSE"]

CAPTURE = True
"""On CUDA, replay a captured graph for every batched round in which all rows draft the full tree with plain
log-probabilities (False: every batched round runs eagerly -- for A/B measurements and tests)."""

FUSE = True
"""With :data:`CAPTURE`: a greedy round of every row drafting the full tree also verifies, accepts and compacts
inside its graph (:func:`fused_batch_round`); False: the graph drafts only (A/B measurements)."""


def can_batch(drafters: list, states: list[RoundState]) -> bool:
    """Whether :func:`propose_batch` serves these rows (else they draft one after another): two or more
    rows, no tensor parallelism, one draft and one tree shape."""
    d0 = drafters[0]
    return (len(drafters) > 1 and d0.target.tp is None and d0.glide.tp is None
            and all(d.glide is d0.glide and d.target is d0.target and d.tree_shape == d0.tree_shape for d in drafters))


class _Ints:
    """Named int lists -> ONE int32 host-to-device copy, read back as [B] / [B, T] views."""

    def __init__(self):
        self.fields: dict[str, list] = {}

    def add(self, name: str, rows: list) -> None:
        self.fields[name] = rows

    def flat(self) -> tuple[list[int], dict[str, tuple[int, int, int | None]]]:
        """The flat int list (16-byte aligned segments: Triton specialises on alignment) and each field's
        ``(offset, rows, width or None)``; equal fields give an equal layout (a captured round's key)."""
        flat, spans = [], {}
        for name, rows in self.fields.items():
            nested = isinstance(rows[0], list)
            values = [x for r in rows for x in r] if nested else list(rows)
            spans[name] = (len(flat), len(rows), len(rows[0]) if nested else None)
            flat += values + [0] * (-len(values) % 4)
        return flat, spans

    @staticmethod
    def views(t: torch.Tensor, spans: dict[str, tuple[int, int, int | None]]) -> dict[str, torch.Tensor]:
        """The fields' [B] / [B, T] views of the device copy ``t`` of :meth:`flat`."""
        return {name: t[o : o + b] if w is None else t[o : o + b * w].view(b, w) for name, (o, b, w) in spans.items()}

    def to(self, device) -> dict[str, torch.Tensor]:
        flat, spans = self.flat()
        return self.views(torch.tensor(flat, dtype=torch.int32).to(device), spans)


@dataclass
class _BatchGraph:
    """A batched greedy round of full shape captured as a CUDA graph (one per batch size, catch-up length,
    target cache, RoPE table and set of row caches): its static pack and outputs."""

    graph: torch.cuda.CUDAGraph
    pack: torch.Tensor        # int32 device copy of the round's integers (refilled before each replay)
    host: torch.Tensor        # pinned staging buffer of the pack
    out: tuple[torch.Tensor, ...]   # tokens [B, M], parents [B, M], ancestor [B, M, M]; fused: ([B, 2 + 2M],)
    keep: tuple               # what the graph reads by address and nothing else holds (the stacked buffers)


def _pack_round(drafters: list, rows: list[int], states: list[RoundState], B: int, run: tuple[int, ...]) -> tuple[_Ints, int, int]:
    """Step 1 of a batched round, on the host: per drafting row the prompt's long catch-up (first round, on the
    row's own cache), room in the sliding cache, and this round's catch-up of the last k_b emitted positions
    (FastGlideDrafter's rule); then every integer of the round in one :class:`_Ints`. Returns ``(ints, k_pad,
    cross_span)``: the padded catch-up length and the eager cross-attention's key bound."""
    w = drafters[0].glide.window
    row_of = dict(zip(rows, range(len(rows))))
    starts = [d._start_round(st) for d, st in zip(drafters, states)]
    k_pad = max(k for _, k in starts)
    # Per batch row, its catch-up's segments (catch_up_segments: [k_pad] per query, padded at the front with copies
    # of the first query -- same row, same values written) and the first prefix row each level's window reaches.
    # A finished row rides along as a dummy: token 0 at position 1 over row 0 of a zero cache (L = 1, base 1),
    # seeing its target row 0.
    per_query = ("tokens", "rows", "row_lo", "row_hi", "pos", "zeros")
    f: dict[str, list] = {}
    for b in range(B):
        i = row_of.get(b)
        if i is None:
            (L, k), base, toks = (1, 1), 1, [0]
        else:
            (L, k), base = starts[i], drafters[i].cache.base
            toks = states[i].tokens[L + 1 - k : L + 1]
        seg = catch_up_segments(toks, L + 1 - k, base, w)
        for name, values in seg.items():
            f.setdefault(name, []).append(values[:1] * (k_pad - k) + values if name in per_query else values[0])
        f.setdefault("level_lo", []).append(level_window_lo(L + 1 - base, max(len(run), 1), w))
        if i is not None:
            drafters[i]._caught_up(L)
    ints = _Ints()
    for name, values in f.items():
        ints.add(name, values)
    return ints, k_pad, max(f["cross_hi"]) + 1


def _replay(d0, drafters: list, ints: _Ints, k_pad: int, target_k: torch.Tensor, target_v: torch.Tensor,
            verify: StaticKVCache | None = None) -> tuple[torch.Tensor, ...]:
    """Refill and replay the captured full-shape round of all B rows for this pack layout (captured on first use;
    with ``verify`` the fused round, :func:`_fused_body`). Returns its static outputs."""
    fm = d0.target
    flat, spans = ints.flat()
    table = fm.rope_table[0].data_ptr() if fm.rope_table is not None else 0
    key = (target_k.data_ptr(), tuple(target_k.shape), table, len(drafters), k_pad, d0.tree_shape, tuple(spans.items()),
           tuple(d.cache.k.data_ptr() for d in drafters),
           None if verify is None else (id(verify), verify.length_t.data_ptr()))
    graphs = d0.runtime.batch_graphs
    if key not in graphs:
        graphs[key] = _capture(drafters, flat, spans, target_k, target_v, verify)
    bg = graphs[key]
    bg.host.numpy()[:] = flat   # the staging buffer: the previous round's copy has completed
    bg.pack.copy_(bg.host, non_blocking=True)
    bg.graph.replay()
    return bg.out


def propose_batch(drafters: list, rows: list[int], states: list[RoundState], cache: StaticKVCache) -> list[Draft]:
    """The drafts of batch rows ``rows`` (``drafters[i]`` and ``states[i]`` for row ``rows[i]``) from one
    draft-layer pass per catch-up and per beam level over all B rows of ``cache`` (the batch's target
    cache, [B] rows). Returns one :class:`~specdec.shared.round.Draft` per drafting row, a
    :class:`~specdec.fast.engine.DeviceTree` of that row's levels.

    On CUDA a round in which every row drafts the full tree with plain log-probabilities (greedy, or rejection
    sampling's deterministic GLIDE candidates) replays ONE CUDA graph (:func:`_round_body` captured per batch
    size and catch-up length: one host-to-device copy, one launch); other rounds -- a finished row riding
    along, the last rounds' shorter shapes, keyed sampling -- run the same body eagerly."""
    d0 = drafters[0]
    fm, g = d0.target, d0.glide
    dev, w = g.device, g.window
    B = cache.k.shape[1]
    shape = d0.tree_shape
    levels_of = [d._levels_left(st.budget) for d, st in zip(drafters, states)]
    run = shape[: max(levels_of)]             # the levels drafted this round (each row keeps its first levels_of)
    target_k, target_v = cache.k[-1], cache.v[-1]   # [B, Hkv, capacity, D]: every row's last layer
    row_of = dict(zip(rows, range(len(rows))))
    ints, k_pad, cross_span = _pack_round(drafters, rows, states, B, run)   # 1. host side
    params = states[0].params
    keys = {b: sequence_key(params.seed, st.seq_id) for b, st in zip(rows, states)} if params.keyed else None

    if _captures(d0) and keys is None and run == shape and rows == list(range(B)):
        # 2'. Every row drafts the full tree: replay the captured round (captured on first use).
        out_tokens, out_parents, full = _replay(d0, drafters, ints, k_pad, target_k, target_v)
    else:
        # 2. The rows' sliding caches as one [B, Hkv, R, D] buffer (finished rows: zeros), then the round.
        u = ints.to(dev)
        zeros = torch.zeros_like(d0.cache.k)
        ks = [drafters[row_of[b]].cache.k if b in row_of else zeros for b in range(B)]
        vs = [drafters[row_of[b]].cache.v if b in row_of else zeros for b in range(B)]
        stacked = SlidingCache.from_buffers(torch.cat(ks), torch.cat(vs), w)
        out_tokens, out_parents, full = _round_body(d0, stacked, u, target_k, target_v, run, rows, cross_span, keys, params)
        # 5. The catch-up rows persist: every drafting row's cache back from the stacked buffer (one multi-tensor copy).
        torch._foreach_copy_([d.cache.k for d in drafters] + [d.cache.v for d in drafters],
                             [stacked.k[b : b + 1] for b in rows] + [stacked.v[b : b + 1] for b in rows])

    # 6. Row b's draft: the nodes of its first levels_of[b] levels (a prefix of the node order).
    out = []
    for i, (b, d) in enumerate(zip(rows, drafters)):
        sub = shape[: levels_of[i]]
        mb = 1 + sum(sub)
        depth = d._depth_tensor(sub)
        out.append(Draft(out_tokens[b, :mb], DeviceTree(out_parents[b, :mb], depth, full[b, :mb, :mb])))
    return out


def can_fuse_batch(drafters: list, rows: list[int], states: list[RoundState], cache: StaticKVCache, tree_size: int) -> bool:
    """Whether :func:`fused_batch_round` serves this round: greedy, every one of the B rows drafting the full tree
    (no finished row, no last round's shorter shape) of ``tree_size`` nodes, captured rounds on."""
    d0 = drafters[0]
    B = cache.k.shape[1]
    return (FUSE and _captures(d0) and states[0].params.greedy and rows == list(range(B)) and can_batch(drafters, states)
            and tree_size == 1 + sum(d0.tree_shape)
            and all(d._levels_left(st.budget) == len(d0.tree_shape) for d, st in zip(drafters, states)))


def fused_batch_round(drafters: list, rows: list[int], states: list[RoundState], cache: StaticKVCache) -> torch.Tensor:
    """A whole greedy round of every row -- the batched draft, the verification of all B trees in one target
    pass, greedy acceptance and KV compaction of every row -- as ONE graph replay (:func:`_fused_body`; call only
    when :func:`can_fuse_batch` says so). ``cache.length_t`` advances on the device. Returns [B, 2 + 2M] long
    (static: read it before the next round): per row the accepted node, the target's next token, the tree's
    tokens and parents -- the round's one read-back."""
    d0 = drafters[0]
    B = cache.k.shape[1]
    ints, k_pad, _ = _pack_round(drafters, rows, states, B, d0.tree_shape)
    return _replay(d0, drafters, ints, k_pad, cache.k[-1], cache.v[-1], verify=cache)[0]


def _fused_body(d0, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], cache: StaticKVCache) -> torch.Tensor:
    """Verification, greedy acceptance and compaction of the B full trees ``out`` (tokens, parents, ancestor) drafted
    by :func:`_round_body` (graph-capturable): node j of row b at position ``length_t[b] + depth(j)``, written to
    cache row ``length_t[b] + j``; :func:`specdec.fast.kernels.greedy_paths` row by row (the batch-of-one rule);
    the accepted rows moved to ``[L_b, L_b + n_b)`` by one :func:`~specdec.fast.kernels.compact_kv`; ``length_t``
    advanced (:func:`specdec.fast.engine.accept_rows_greedy`, the stepwise round's acceptance). Returns
    [B, 2 + 2M] long: best node, next token, tokens, parents."""
    from specdec.fast import kernels as K
    from specdec.fast.engine import accept_rows_greedy
    from specdec.fast.model import step_forward

    tokens, parents, full = out
    b, m = tokens.shape
    depth = d0._depth_tensor(d0.tree_shape)[None].expand(b, m)
    starts = cache.length_t
    logits = step_forward(d0.target, cache, tokens, depth + starts[:, None].long(), full, starts)   # [B, M, V]
    amax = (K.row_argmax(logits.view(b * m, -1)) if logits.is_cuda else torch.argmax(logits, dim=-1)).view(b, m)
    valid = torch.ones(b, m, dtype=torch.bool, device=tokens.device)
    chosen, n = accept_rows_greedy(cache, amax, tokens, parents, depth, full, valid, starts)
    starts += n
    return torch.cat([chosen, tokens, parents], dim=1)


def _captures(d0) -> bool:
    """Whether batched rounds may replay captured graphs: :data:`CAPTURE` and the target's CUDA graphs on."""
    return CAPTURE and d0.use_graphs


def _round_body(d0, stacked: SlidingCache, u: dict[str, torch.Tensor], target_k: torch.Tensor, target_v: torch.Tensor,
                run: tuple[int, ...], rows: list[int], cross_span: int, keys: dict | None = None,
                params=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3-4 of a batched round on the device (graph-capturable without ``keys``): the catch-up of every
    row's last emitted positions and the beam levels ``run``, all B rows of ``stacked`` in each draft-layer pass,
    the beam choice for batch rows ``rows``. ``u``: the round's integers (:class:`_Ints` views); ``cross_span``
    bounds the cross-attention's key count (its split count). Returns the trees' tokens [B, M], parents [B, M]
    and ancestor-or-self masks [B, M, M] (M = 1 + sum(run)). ``keys`` (keyed sampling): row b's sequence key, with
    the :class:`~specdec.shared.sampling.SamplingParams` ``params``; None: plain log-probabilities."""
    fm, g = d0.target, d0.glide
    dev = g.device
    B = stacked.k.shape[0]
    # 3. Catch-up: ONE pass over every row's last k emitted positions (query at position t sees draft rows
    #    (t - window, t] and target rows < t); the last query of each row is its root.
    bounds = catch_up_glide_bounds(u, cross_span)
    h = glide_layer(fm, g, stacked, u["tokens"], u["pos"].long(), u["rows"], target_k, target_v, bounds)
    lm_head = d0.lm_head
    vocab = lm_head.shape[0]

    def scores(hidden: torch.Tensor, offset: int) -> torch.Tensor:
        """What the beam ranks for the children of nodes with draft hidden states ``hidden`` [B, n, H], at
        position L_b + offset: the draft's log-probs, or (keyed) each row's processed log-probs plus its own
        sequence's keyed noise -- :meth:`FastGlideDrafter._scores` row by row."""
        logits = F.linear(hidden.to(fm.dtype), lm_head)   # no final norm
        if keys is None:   # as FastGlideDrafter._scores: the same kernel, row by row the same bits
            return _kernels().logprobs_f32(logits)
        out = torch.zeros(logits.shape, dtype=torch.float32, device=dev)
        vmap = {} if g.vocab_map is None else {"token_ids": g.vocab_map}
        for b in rows:
            where = (u["cross_hi"][b] + offset).long().expand(logits.shape[1])
            out[b] = keyed_logprobs(logits[b], params.temperature, params.top_k, params.top_p, keys[b], where, **vmap)
        return out

    logprobs = scores(h[:, -1:], 1)   # [B, 1, V]: the root's children, at L_b + 1

    # 4. The beam levels: the choice per row (one beam_select launch each), the draft forward over all rows.
    m = 1 + sum(run)
    out_tokens = torch.zeros(B, m, dtype=torch.long, device=dev)
    out_parents = torch.full((B, m), -1, dtype=torch.long, device=dev)
    full = torch.zeros(B, m, m, dtype=torch.bool, device=dev)
    full[:, 0, 0] = True
    out_tokens[:, 0] = u["tokens"][:, -1]
    cums = torch.zeros(B, 2, -(-max(run, default=1) // 4) * 4, dtype=torch.float32, device=dev)
    roots = u["tokens"][:, -1:].long()
    n_pref_t = u["self_hi"]
    L_t = u["cross_hi"]
    prev_first, prev_n, first = 0, 1, 1
    kern = _kernels()
    for level, width in enumerate(run):
        n = min(width, prev_n * vocab)
        for b in rows:
            kern.beam_select(cums[b, (level + 1) % 2, :prev_n] if level else None, logprobs[b], n, out_tokens[b],
                             out_parents[b], cums[b, level % 2], node_offset=first, parent_offset=prev_first,
                             ancestor=full[b], root_token=roots[b] if level == 0 else None)
        if g.vocab_map is not None:   # draft ids -> target ids (truncated vocabulary)
            out_tokens[:, first : first + n] = g.vocab_map[out_tokens[:, first : first + n]]
        if level == len(run) - 1:
            break
        # one draft forward over this level's nodes of every row (all at position L_b + level + 1): the
        # prefix rows (row - window, n_b) of the row's cache and its ancestors among the tree rows n_b + j
        lo = first - 1
        positions = (L_t + level + 1).long()[:, None].expand(B, n)
        tree_rows = n_pref_t[:, None] + torch.arange(lo, lo + n, dtype=torch.int32, device=dev)[None, :]
        lb = GlideBounds(self_lo=u["level_lo"][:, level].contiguous(), self_hi=n_pref_t, cross_hi=L_t,
                         cross_span=cross_span, tree_start=n_pref_t)
        h = glide_layer(fm, g, stacked, out_tokens[:, first : first + n], positions, tree_rows, target_k, target_v, lb,
                        tree_mask=full[:, first : first + n, 1 : first + n])
        logprobs = scores(h, level + 2)   # [B, n, V]: this level's children, at L_b + level + 2
        prev_first, prev_n, first = first, n, first + n
    return out_tokens, out_parents, full


def _capture(drafters: list, flat: list[int], spans: dict, target_k: torch.Tensor, target_v: torch.Tensor,
             verify: StaticKVCache | None = None) -> _BatchGraph:
    """Capture a full-shape round of all B rows (``drafters[b]`` drafting row b) for this pack layout: the rows'
    sliding caches copied into one stacked buffer, :func:`_round_body` (cross-attention split for the whole
    capacity, so any length fits), the caches copied back -- and with ``verify`` (the target cache) the
    verification, acceptance and compaction of :func:`_fused_body`. The warm-up runs re-write the catch-up rows
    with the values they get anyway (the same pack) and the tree rows are scratch; a fused round's warm-ups also
    verify and compact (only rows past each row's length, which nothing reads before it is written again) and
    advance ``length_t``, which is put back afterwards."""
    from specdec.fast.graphs import capture

    d0 = drafters[0]
    dev, B = d0.glide.device, len(drafters)
    pack = torch.tensor(flat, dtype=torch.int32, device=dev)
    u = _Ints.views(pack, spans)
    stacked = SlidingCache.from_buffers(torch.empty((B,) + tuple(d0.cache.k.shape[1:]), dtype=d0.cache.k.dtype, device=dev),
                                        torch.empty((B,) + tuple(d0.cache.v.shape[1:]), dtype=d0.cache.v.dtype, device=dev),
                                        d0.glide.window)
    caches_k, caches_v = [d.cache.k for d in drafters], [d.cache.v for d in drafters]
    slices_k, slices_v = [stacked.k[b : b + 1] for b in range(B)], [stacked.v[b : b + 1] for b in range(B)]
    run = d0.tree_shape

    def body():
        torch._foreach_copy_(slices_k + slices_v, caches_k + caches_v)
        out = _round_body(d0, stacked, u, target_k, target_v, run, list(range(B)), target_k.shape[-2])
        torch._foreach_copy_(caches_k + caches_v, slices_k + slices_v)
        return out if verify is None else (_fused_body(d0, out, verify),)

    lengths = verify.length_t.clone() if verify is not None else None
    graph, out = capture(body, device=dev, warmup=2)
    if verify is not None:
        verify.length_t.copy_(lengths)
    host = torch.empty(len(flat), dtype=torch.int32)
    if pack.is_cuda:
        host = host.pin_memory()
    return _BatchGraph(graph, pack, host, out, (stacked, slices_k, slices_v))
