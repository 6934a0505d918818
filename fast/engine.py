"""The speculative round on the fast path: the same five steps as :mod:`specdec.ref.engine`,
with a static cache, fixed-size (CUDA-graph) verification and device-side greedy acceptance.

Per round:

1. **Draft** -- the drafter (:class:`FastDrafter`, or any :class:`specdec.shared.round.Drafter`) returns a
   :class:`~specdec.shared.round.Draft` (root first) whose tree is a host :class:`~specdec.shared.tree.Tree` or a
   :class:`DeviceTree` built on the device.
2. **Verify** -- the tree is padded to the decoder's fixed size ``M`` with dummy nodes (children
   of the root that only see themselves and can never be accepted), so one CUDA graph per
   ``M`` serves every round; positions ``L + depth`` and the ancestor mask come from a per-shape
   cache of device tensors.
3. **Accept** -- greedy: :func:`specdec.shared.acceptance.greedy_best_node` on the device, then
   ONE host synchronisation reads the accepted node, the next token and the path. Sampling uses
   the same shared rules as the reference (on the device's probabilities).
   A drafter that builds its tree on the device may offer :meth:`FastDrafter.fused_round`: steps
   1-4 of a greedy round captured as ONE CUDA graph (draft body + :func:`verify_and_accept`), so
   the host launches one graph and reads one result per round (a :class:`FusedRound`).
   If it also offers device-driven rounds (:meth:`FastDrafter.run_ahead` returns a :class:`RunAhead`,
   see :class:`specdec.fast.glide.FastGlideDrafter`), the loop launches the
   next round BEFORE reading the current one (:func:`_run_fused_greedy`): the GPU runs rounds back
   to back while the host reads results one round behind.
4. **Compact** -- :func:`specdec.fast.model.commit` moves the accepted rows of every layer into
   place in one kernel launch (nothing to move when the path is already contiguous).
5. **Emit** -- as in the reference.

Keyed sampling (``sampling="keyed"``, temperature > 0) takes the host-side sampling path: the first
token is the keyed choice at position T and :func:`specdec.shared.round.accept_draft` applies the greedy
rule to the keyed-perturbed rows (root position L), exactly as the reference does.

Greedy output is token-identical to :func:`specdec.ref.engine.run_speculative` with the same
drafter logic (checked by the tests, never by importing the reference).

**Batches** (B > 1, prompts of any lengths; docs/design.md §11): :func:`_run_batch` -- one drafter per
row, every row's draft padded to the fixed tree size and verified in ONE target pass over the static
[B, ...] cache with per-row prefix lengths (``cache.length_t``), ragged acceptance, every row's
accepted rows compacted in ONE :func:`specdec.fast.kernels.compact_kv` launch (per-row destinations);
greedy rounds accept and compact every row on the device (:func:`accept_rows_greedy`) and synchronise once
per round (a [B, 2] read-back: each row's best node and next token). A finished row stops being drafted for
and emitted; its slot rides along as a masked dummy (its verification rows are scratch; its prefix length is 0 for
the pass, so its attention reads none of its cache) until at most half the slots still run: then the running rows
move into the lowest slots (:func:`compact_slots`) and the rounds run on half the width (:func:`compacted_width`,
``cache.leading``), since a verification's masked rows still cost their GEMM rows. Drafters
that build device trees (GLIDE) draft row by row, each on its row of the batch cache, and join the ONE
batched verification; their trees are read back right after it, in one copy (the fused single-graph round
and run-ahead of a batch of one are not used for B > 1). With the decode phase's
row-invariant kernels (docs/design.md §8) a row's tokens do not depend on its batch-mates.
"""

from __future__ import annotations

import abc
import functools
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from specdec.fast.graphs import CapturedFn
from specdec.fast.model import FastModel, MAX_TREE_NODES, StaticKVCache, commit, prefill, run_step, step_forward
from specdec.shared.batch import PromptBatch, normalize_prompts
from specdec.shared.keyed import resolve_sampling, sample_next
from specdec.shared.result import GenerationResult, normalize_eos, sync
from specdec.shared.round import Draft, Drafter, RoundRecord, RoundState, accept_draft
from specdec.shared.sampling import SamplingParams
from specdec.shared.tree import Tree
from specdec.shared.validate import check_generator

__all__ = ["run_speculative_fast", "verify_and_accept", "FastDrafter", "HostDrafter", "RunAhead", "FusedRound", "DeviceTree",
           "TreeTensors", "tree_tensors", "check_drafts_fit"]


def _read_packed(packed: list[int], tree_size: int, m: int) -> tuple[int, list[int], list[int], list[int]]:
    """(next token, accepted path, draft tokens, parents) from :func:`accept_and_compact`'s read-back."""
    path = [j for j, on in enumerate(packed[2 : 2 + tree_size]) if on]
    return packed[1], path, packed[2 + tree_size : 2 + tree_size + m], packed[2 + 2 * tree_size : 2 + 2 * tree_size + m]


class _Emitted:
    """What the loop has produced so far (step 5, emit): the sequence, the emitted tokens and the
    per-token / per-round bookkeeping :class:`GenerationResult` needs."""

    def __init__(self, tokens: list[int], on_round):
        self.tokens, self.on_round = tokens, on_round
        self.emitted: list[int] = []
        self.spec: list[bool] = []
        self.accept_lengths: list[int] = []

    def first(self, token: int) -> None:
        self.tokens.append(token)
        self.emitted.append(token)
        self.spec.append(False)
        self.accept_lengths.append(1)

    def round(self, draft_tokens: list[int], parents: list[int], path: list[int], next_token: int, q=None) -> None:
        accepted = [draft_tokens[j] for j in path[1:]]
        self.emitted += accepted + [next_token]
        self.spec += [True] * len(accepted) + [False]
        self.tokens += accepted + [next_token]
        self.accept_lengths.append(len(accepted) + 1)
        if self.on_round is not None:
            self.on_round(RoundRecord(Draft(torch.tensor(draft_tokens), Tree.from_parents(parents), q), path, next_token))

    def done(self, max_gen_len: int, eos: set[int], new: int | None = None) -> bool:
        """Budget spent, or an EOS among the emitted tokens (only the last ``new`` ones are checked)."""
        tail = self.emitted if new is None else self.emitted[-new:]
        return len(self.emitted) >= max_gen_len or bool(eos.intersection(tail))


# ---------------------------------------------------------------------------------------------
# What a fast drafter implements
# ---------------------------------------------------------------------------------------------


@dataclass
class DeviceTree:
    """A draft tree whose topology lives on the device (no host sync to build it).

    ``parents`` [M] long (root -1), ``depth`` [M] long, ``ancestor`` [M, M] bool (ancestor-or-self).
    The other variant of ``Draft.tree`` besides the host :class:`~specdec.shared.tree.Tree`
    (:func:`tree_tensors` takes both): :func:`run_speculative_fast` verifies it as it is and reads
    it back to the host in the round's single synchronisation.
    """

    parents: torch.Tensor
    depth: torch.Tensor
    ancestor: torch.Tensor

    @property
    def size(self) -> int:
        return self.parents.shape[0]


class FusedRound(NamedTuple):
    """A greedy round launched as one graph by :meth:`FastDrafter.fused_round` (results on the device).

    ``packed``: the round's read-back as :func:`accept_and_compact` returns it; ``logits`` [M, V]:
    the verification's rows; ``m``: the number of real nodes of this round's tree.
    """

    packed: torch.Tensor
    logits: torch.Tensor
    m: int


class RunAhead(abc.ABC):
    """Device-driven rounds: a round whose every input follows from the device state, so the loop can
    launch it BEFORE reading the round in flight (:func:`_run_fused_greedy`)."""

    @abc.abstractmethod
    def can_run_ahead(self, L: int, emitted: int, max_gen_len: int) -> bool:
        """May a device-driven round start right after the round in flight, which began at cache length
        ``L`` with ``emitted`` tokens out of ``max_gen_len``?"""

    @abc.abstractmethod
    def launch_ahead(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Launch one device-driven round; returns its ``(packed, logits)`` (device tensors)."""

    @abc.abstractmethod
    def ahead_round_read(self, L: int, emitted: int, max_gen_len: int) -> int:
        """Host bookkeeping after reading a device-driven round that began at cache length ``L``;
        returns the number of tree nodes it could accept from."""


class FastDrafter(abc.ABC):
    """What :func:`run_speculative_fast` calls on a drafter.

    Required: :meth:`propose` (as :class:`specdec.shared.round.Drafter`). Optional capabilities,
    each with a default that opts out: :meth:`prefill` (the drafter's own pass over the prompt),
    :meth:`fused_round` (a greedy round as one graph) and :meth:`run_ahead` (device-driven rounds).
    A plain :class:`specdec.shared.round.Drafter` (``propose`` only, e.g. the retrieval drafters of
    :mod:`specdec.shared.retrieval`) is run as if it declared none of them.
    """

    @abc.abstractmethod
    def propose(self, state: RoundState) -> Draft:
        """Step 1: a token tree rooted at ``state.tokens[-1]``, at most ``tree_size`` nodes."""

    def prefill(self, state: RoundState) -> None:  # noqa: B027 -- an optional hook: nothing by default
        """The drafter's own pass over the prompt, timed with the prefill (after the target's)."""

    def fused_round(self, state: RoundState, tree_size: int) -> FusedRound | None:
        """Steps 1-4 of a greedy round as ONE graph launch, or None where this round cannot be fused
        (the loop then runs :meth:`propose` and its own verification). Only called when greedy."""
        return None

    def run_ahead(self) -> RunAhead | None:
        """The device-driven rounds this drafter offers after a fused round, or None."""
        return None

    @property
    def reads_last_logits(self) -> bool:
        """Whether :meth:`propose` reads ``state.last_logits`` (the root's full target logits). When no drafter
        does, a greedy round under tensor parallelism takes its argmax across the vocabulary shards without
        gathering the logits (``last_logits`` is then None)."""
        return False

    @classmethod
    def propose_rows(cls, drafters: list["FastDrafter"], rows: list[int], states: list[RoundState],
                     cache: StaticKVCache) -> list[Draft]:
        """Step 1 for several rows of a batch (:func:`_run_batch`): ``drafters[i]`` (all of this class) drafts
        for batch row ``rows[i]`` of ``cache`` with ``states[i]``. The default asks each row in turn; a drafter
        whose draft steps are target passes overrides it to draft every row in ONE pass per step (MagicDec)."""
        return [d.propose(st) for d, st in zip(drafters, states)]

    @classmethod
    def fused_rows(cls, drafters: list["FastDrafter"], rows: list[int], states: list[RoundState], cache: StaticKVCache,
                   tree_size: int) -> torch.Tensor | None:
        """Steps 1-4 of a greedy round for every row of a batch as ONE graph launch (as :meth:`propose_rows`'s
        arguments, all B rows drafting), or None where this round cannot be fused (the loop then drafts with
        :meth:`propose_rows` and verifies itself). Returns [B, 2 + 2M] long: per row the accepted node, the
        target's next token, the tree's M tokens and parents; ``cache.length_t`` advanced on the device and the
        accepted rows compacted. Only called when greedy without tensor parallelism."""
        return None


class HostDrafter(FastDrafter):
    """A :class:`specdec.shared.round.Drafter` (``propose`` only) seen as a :class:`FastDrafter`.

    ``reads_last_logits``: whether its ``propose`` reads ``state.last_logits``; a plain Drafter may, so the
    default is True -- a caller that knows its drafter does not (PLD) says so."""

    def __init__(self, drafter, reads_last_logits: bool = True):
        self.drafter = drafter
        self._reads_last_logits = reads_last_logits

    def propose(self, state: RoundState) -> Draft:
        return self.drafter.propose(state)

    @property
    def reads_last_logits(self) -> bool:
        return self._reads_last_logits


def as_fast_drafter(drafter) -> FastDrafter:
    """The drafter itself if it is a :class:`FastDrafter`, else a wrapper declaring no capabilities."""
    if isinstance(drafter, FastDrafter):
        return drafter
    if not isinstance(drafter, Drafter):
        raise TypeError(f"a drafter must implement propose(state) -> Draft, got {type(drafter).__name__}")
    return HostDrafter(drafter)


def _drafters_per_row(drafter, batch: int, method: str) -> list:
    """One drafter per row: a list of B drafters, a factory (called once per row), or one drafter
    object for a batch of one (a drafter keeps per-sequence state, so it cannot serve two rows)."""
    if isinstance(drafter, (FastDrafter, Drafter)):
        if batch != 1:
            raise ValueError(f"{method} does not batch on the fast path yet (got batch size {batch}): batching of this "
                             "method is in the reference path only for now (specdec.ref, issue 19); call it once per "
                             "prompt or use specdec.ref. (Engine callers: pass one drafter per row, or a factory.)")
        return [drafter]
    if isinstance(drafter, (list, tuple)):
        if len(drafter) != batch:
            raise ValueError(f"drafter: got {len(drafter)} drafters for a batch of {batch} prompts; pass one per row of input_ids")
        return list(drafter)
    if callable(drafter):
        return [drafter() for _ in range(batch)]
    raise TypeError(f"drafter must be a drafter (propose(state)), a list of them or a factory, got {type(drafter).__name__}")


def _sharded_greedy(target: FastModel, params: SamplingParams, drafters: list[FastDrafter]) -> bool:
    """Whether this call's verifications keep the logits sharded: greedy under tensor parallelism needs only the
    argmax, taken across the vocabulary shards (tp.argmax: one 8-byte key per row crosses the ranks), unless a
    drafter reads the root's full logits."""
    return target.tp is not None and params.greedy and not any(d.reads_last_logits for d in drafters)


def _read_drafts(drafts: dict[int, Draft]) -> dict[int, tuple[list[int], Tree]]:
    """Every row's draft on the host as ``(tokens, Tree)``: the device-side drafts (GLIDE's device trees)
    come back in ONE device-to-host copy for all rows (their tokens and parents concatenated), not two per row."""
    out, dev_rows, parts = {}, [], []
    for b, draft in drafts.items():
        if isinstance(draft.tree, Tree):
            out[b] = (draft.tokens.tolist(), draft.tree)
        else:
            dev_rows.append((b, draft.tree.size))
            parts += [draft.tokens.long(), draft.tree.parents.long()]
    if parts:
        flat, at = torch.cat(parts).tolist(), 0
        for b, m in dev_rows:
            out[b] = (flat[at : at + m], Tree.from_parents(flat[at + m : at + 2 * m]))
            at += 2 * m
    return out


def _run_batch(target: FastModel, drafters: list, batch: PromptBatch, max_gen_len: int, eos: set[int],
               params: SamplingParams, generator, method: str, tree_size: int, first_target: bool,
               skip_sample_adjustment: bool, on_round) -> GenerationResult:
    """The speculative loop for B > 1 rows of any prompt lengths (module docstring, "Batches"); the same
    five steps and rules as the batch-of-one loop, per row. Row b is keyed sampling's sequence b."""
    dev, B, T = target.device, batch.size, tree_size
    ids = list(range(B))
    tokens = batch.tolists()                                   # row b: prompt + emitted
    emitted: list[list[int]] = [[] for _ in range(B)]
    spec: list[list[bool]] = [[] for _ in range(B)]
    accept_lengths: list[list[int]] = [[] for _ in range(B)]
    cache = target.ensure_cache(B, max(batch.lengths) + max_gen_len + T + 1)
    num = 0

    # 0. Prefill every row into its slice of the batch cache (rows of different lengths).
    t0 = time.perf_counter()
    fed = [r if first_target else r[:-1] for r in batch.rows]
    lengths = [int(f.shape[0]) for f in fed]                   # L_b: row b's verified cache length
    last_logits: list[torch.Tensor | None] = []
    for b in range(B):
        view = cache.row(b, 0)
        last_logits.append(prefill(target, view, fed[b][None])[0] if lengths[b] > 0 else None)
        view.set_length(lengths[b])
    if first_target:
        firsts = sample_next(torch.stack(last_logits), params, generator, lengths, seq_ids=ids)   # position T_b
        for b, tok in enumerate(firsts.tolist()):
            tokens[b].append(int(tok))
            emitted[b].append(int(tok))
            spec[b].append(False)
            accept_lengths[b].append(1)
        num = 1
    for b in range(B):
        drafters[b].prefill(RoundState(tokens[b], target, cache.row(b, lengths[b]), last_logits[b], params,
                                       generator, max_gen_len - len(emitted[b]), ids[b]))
    sync(dev)
    prefill_time = time.perf_counter() - t0

    def finished(b: int) -> bool:
        return len(emitted[b]) >= max_gen_len or bool(eos & set(emitted[b]))

    def emit(b: int, draft_tokens: list[int], tree: Tree, q, path: list[int], next_token: int, row_logits) -> None:
        """5. Row b emits its accepted drafts and the extra token (its next root); its verified length grows by
        the path. ``row_logits``: the target's logits after the accepted node (what the next round's drafter may read)."""
        lengths[b] += len(path)
        accepted = [draft_tokens[j] for j in path[1:]]
        emitted[b] += accepted + [next_token]
        spec[b] += [True] * len(accepted) + [False]
        tokens[b] += accepted + [next_token]
        accept_lengths[b].append(len(accepted) + 1)
        last_logits[b] = row_logits
        if on_round is not None:
            on_round(RoundRecord(Draft(torch.tensor(draft_tokens), tree, q), path, next_token, b))

    # a slot without a running row: T dummy roots (token 0 at position 0, each seeing only itself)
    eye, zeros = torch.eye(T, dtype=torch.bool, device=dev), torch.zeros(T, dtype=torch.long, device=dev)
    no_nodes = torch.zeros(T, dtype=torch.bool, device=dev)
    tp_local = _sharded_greedy(target, params, drafters)
    slot = list(range(B))    # row b's slot of the batch cache; compaction moves running rows to lower slots
    width = B                # the rounds run on slots [0, width): cache.leading(width)
    t1 = time.perf_counter()
    active = [b for b in range(B) if not finished(b)]
    while active:
        # 0. Finished rows leave: once at most half the slots still run, the running rows move into the lowest
        #    slots and the rounds run on fewer (a verification's finished rows would still cost their T GEMM rows).
        narrower = compacted_width(len(active), width)
        if narrower < width:
            compact_slots(cache, slot, active, lengths, narrower)
            width = narrower
        work = cache.leading(width)
        owner: list[int | None] = [None] * width       # the running row in each slot (None: finished or empty)
        for b in active:
            owner[slot[b]] = b
        # Each slot's verified length, on the host and in ``length_t`` (which a fused round reads on the device),
        # written once per round and after any compaction. A slot without a running row gets 0: the verification's
        # dummy roots in it then read none of the cache (they write rows [0, T) of the slot, which nothing reads
        # again), so such a slot costs only its T GEMM rows.
        starts_h = [0 if b is None else lengths[b] for b in owner]
        work.length = max(starts_h)
        work.length_t.copy_(torch.tensor(starts_h, dtype=torch.int32))
        states = [RoundState(tokens[b], target, work.row(slot[b], lengths[b]), last_logits[b], params, generator,
                             max_gen_len - len(emitted[b]), ids[b]) for b in active]
        rows = [slot[b] for b in active]
        # 0'. A drafter may run the whole greedy round of every slot as one graph (fused_rows): then one read-back.
        #     Rows stay in row order everywhere else (sampling draws from one generator in that order).
        fused = None
        if params.greedy and not tp_local and len(active) == width:   # every slot holds a running row: owner[s]
            state_of = dict(zip(active, states))
            fused = type(drafters[active[0]]).fused_rows([drafters[b] for b in owner], list(range(width)),
                                                         [state_of[b] for b in owner], work, T)
        if fused is not None:
            num += 1
            for s_, row in enumerate(fused.tolist()):   # every slot holds a running row
                tree = Tree.from_parents(row[2 + T :])
                emit(owner[s_], row[2 : 2 + T], tree, None, tree.path(row[0]), row[1], None)
            active = [b for b in active if not finished(b)]
            continue
        # 1. Draft: every unfinished row proposes a tree rooted at its last token -- a host Tree, or a
        #    DeviceTree (GLIDE: built on the device); row by row, or all rows at once (propose_rows).
        drafts: dict[int, Draft] = dict(zip(active, type(drafters[active[0]]).propose_rows(
            [drafters[b] for b in active], rows, states, work)))
        for draft in drafts.values():
            if draft.tree.size > T:
                raise RuntimeError(f"drafter bug: a draft of {draft.tree.size} nodes exceeds the fixed tree size {T}")
        # 2. Verify: every slot's tree padded to T nodes (a slot without a running row: T dummy roots that see
        #    only themselves), one target pass with per-slot prefix lengths.
        tts = {b: tree_tensors(d.tree, T, dev) for b, d in drafts.items()}   # each tree padded to T nodes
        node_tokens = torch.stack([zeros if b is None else F.pad(drafts[b].tokens.to(device=dev, dtype=torch.long),
                                                                  (0, T - drafts[b].tree.size)) for b in owner])
        positions = torch.stack([zeros if b is None else tts[b].depth for b in owner]) \
            + torch.tensor(starts_h, dtype=torch.long, device=dev)[:, None]
        masks = torch.stack([eye if b is None else tts[b].mask[0] for b in owner])
        logits = run_step(target, work, node_tokens, positions, masks, gather=not tp_local)   # [width, T, V (or V')]
        num += 1
        # 3. Accept; 4. compact every row's accepted rows in one launch; 5. emit. Greedy: acceptance and
        #    compaction of all rows on the device, then the round's one read-back ([width, 2]: best node, next token).
        if params.greedy:
            amax = target.tp.argmax(logits, target.config.vocab_size) if tp_local else torch.argmax(logits, dim=-1)
            parents = torch.stack([zeros if b is None else tts[b].parents for b in owner])
            depth = torch.stack([zeros if b is None else tts[b].depth for b in owner])
            valid = torch.stack([no_nodes if b is None else tts[b].valid for b in owner])
            starts = torch.tensor(starts_h, dtype=torch.int32, device=dev)
            chosen = accept_rows_greedy(work, amax, node_tokens, parents, depth, masks, valid, starts)[0].tolist()
        else:
            src = torch.zeros(width, T, dtype=torch.int32)
            n_acc = torch.zeros(width, dtype=torch.int32)
            dst = torch.tensor(starts_h, dtype=torch.int32)
        read = _read_drafts(drafts)   # the device trees: ONE read-back for all rows, after the round's (no wait)
        for b, draft in drafts.items():
            draft_tokens, tree = read[b]
            m, L, s_ = tree.size, lengths[b], slot[b]
            if params.greedy:
                path, next_token = tree.path(chosen[s_][0]), chosen[s_][1]
            else:
                path, next_token = accept_draft(Draft(torch.tensor(draft_tokens), tree, draft.q), logits[s_, :m], params,
                                                generator, skip_sample_adjustment, root_position=L, seq_id=ids[b])
                src[s_, : len(path)] = torch.tensor(path, dtype=torch.int32) + L
                n_acc[s_] = len(path)
            emit(b, draft_tokens, tree, draft.q, path, next_token, None if tp_local else logits[s_, path[-1]])
        if not params.greedy:
            from specdec.fast import kernels as K

            K.compact_kv(work.k, work.v, src.to(dev), dst.to(dev), n_accept=n_acc.to(dev))
        active = [b for b in active if not finished(b)]
    sync(dev)
    elapsed = time.perf_counter() - t1
    row_nums = [len(a) for a in accept_lengths]
    return GenerationResult.from_batch(emitted, spec, eos, max_gen_len, num, elapsed, prefill_time, accept_lengths, row_nums)


def compacted_width(running: int, width: int) -> int:
    """The slots a batch's rounds run on once ``running`` of its ``width`` slots still hold unfinished rows:
    ``width`` halved (rounded down) while the running rows fit in half of it -- so a batch of B runs on B, B // 2,
    B // 4, ... slots, one CUDA graph per width. A verification's finished rows cost their T GEMM rows each
    (BENCHMARKS "Session 40: what a finished row costs": at T = 4 compaction pays back its copy within 1-14
    passes, at T = 32 within one), so a batch halves as soon as it can."""
    if not 0 <= running <= width:
        raise ValueError(f"running must be in [0, {width}] (the current width), got {running}")
    while width > 1 and running <= width // 2:
        width //= 2
    return width


def compact_slots(cache: StaticKVCache, slot: list[int], running: list[int], lengths: list[int], width: int) -> None:
    """Move every running row whose slot is at or past ``width`` into a free slot below it (the slot of a finished
    row): its verified rows ``[0, L_b)`` of every layer are copied and ``slot[b]`` updated in place. Rows below
    ``width`` stay where they are. The decode phase's kernels compute a row the same in any slot and beside any
    batch-mates (docs/design.md §8), so a moved row's tokens do not change."""
    if len(running) > width:
        raise ValueError(f"{len(running)} running rows do not fit {width} slots")
    taken = {slot[b] for b in running if slot[b] < width}
    free = [s for s in range(width) if s not in taken]
    for b, dst in zip([b for b in running if slot[b] >= width], free):
        src, n = slot[b], lengths[b]
        cache.k[:, dst, :, :n].copy_(cache.k[:, src, :, :n])
        cache.v[:, dst, :, :n].copy_(cache.v[:, src, :, :n])
        slot[b] = dst


def accept_rows_greedy(cache, amax: torch.Tensor, node_tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                       ancestor: torch.Tensor, valid: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance and KV compaction of a verified batch, every row at once on the device (no host sync;
    graph-capturable): the batched engine's stepwise round and the fused batched GLIDE round both call it.

    Shapes: ``amax``, ``node_tokens``, ``parents``, ``depth``, ``valid`` [B, T] (each row's tree padded to T nodes;
    ``valid`` marks real nodes -- none for a finished row, which then moves nothing), ``ancestor`` [B, T, T]
    bool; ``starts`` [B] int32: row b's verified length L_b, its tree verified at cache rows ``[L_b, L_b + T)``.
    :func:`specdec.fast.kernels.greedy_paths` (the batch-of-one rule of :func:`accept_and_compact`, row by row)
    gives each row's accepted path, whose rows ONE :func:`specdec.fast.kernels.compact_kv` launch moves to
    ``[L_b, L_b + n_b)`` in every layer. ``cache.length_t`` is left to the caller. Returns ``([B, 2] long: the best
    node and the target's next token (its argmax after the best node), [B] int32: the rows kept n_b)``."""
    from specdec.fast import kernels as K

    best, on_path, order = K.greedy_paths(amax, node_tokens, parents, depth, ancestor, valid)
    n = (on_path.sum(dim=1) * valid[:, 0]).to(torch.int32)                       # a finished row: 0 rows
    K.compact_kv(cache.k, cache.v, (order + starts[:, None]).to(torch.int32), starts, n_accept=n)
    return torch.stack([best, amax.gather(1, best[:, None])[:, 0]], dim=1), n


def check_drafts_fit(name: str, drafts: int) -> None:
    """The fast path verifies at most MAX_TREE_NODES nodes (root + drafts) per round."""
    if drafts + 1 > MAX_TREE_NODES:
        raise ValueError(f"{name} must be <= {MAX_TREE_NODES - 1} on the fast path (at most {MAX_TREE_NODES} "
                         f"verified nodes per round), got {drafts}")


class TreeTensors:
    """Device tensors of a (padded) tree topology, built once per distinct ``parents`` tuple."""

    _cache: dict = {}

    def __init__(self, tree: Tree, size: int, device: torch.device):
        m = tree.size
        parents = list(tree.parents) + [0] * (size - m)  # dummy nodes hang off the root
        depth = tree.depth + [1] * (size - m)
        anc = torch.zeros(size, size, dtype=torch.bool)
        anc[:m, :m] = tree.ancestor_mask()
        anc[m:, m:] = torch.eye(size - m, dtype=torch.bool)  # a dummy sees the prefix and itself only
        self.size, self.real = size, m
        self.parents = torch.tensor(parents, dtype=torch.long, device=device)
        self.depth = torch.tensor(depth, dtype=torch.long, device=device)
        self.ancestor = anc.to(device)
        self.mask = self.ancestor[None]  # [1, M, M]
        self.valid = (torch.arange(size) < m).to(device)

    @classmethod
    def from_device(cls, tree, size: int) -> "TreeTensors":
        """Pad a device-side tree (``parents``/``depth``/``ancestor`` tensors) to ``size`` nodes, on the device."""
        t = cls.__new__(cls)
        m = tree.parents.shape[0]
        dev = tree.parents.device
        t.size, t.real = size, m
        if m == size:
            t.parents, t.depth, t.ancestor = tree.parents, tree.depth, tree.ancestor
            key = ("all-valid", size, str(dev))  # a constant: built once
            t.valid = cls._cache.get(key)
            if t.valid is None:
                t.valid = cls._cache[key] = torch.ones(size, dtype=torch.bool, device=dev)
            t.mask = t.ancestor[None]
            return t
        t.parents = torch.cat([tree.parents, torch.zeros(size - m, dtype=torch.long, device=dev)])
        t.depth = torch.cat([tree.depth, torch.ones(size - m, dtype=torch.long, device=dev)])
        t.ancestor = torch.zeros(size, size, dtype=torch.bool, device=dev)
        t.ancestor[:m, :m] = tree.ancestor
        t.ancestor[m:, m:] = torch.eye(size - m, dtype=torch.bool, device=dev)
        t.mask = t.ancestor[None]
        t.valid = torch.arange(size, device=dev) < m
        return t

    @classmethod
    def get(cls, tree: Tree, size: int, device: torch.device) -> "TreeTensors":
        key = (tree.parents, size, str(device))
        t = cls._cache.get(key)
        if t is None:
            if len(cls._cache) > 4096:
                cls._cache.clear()
            t = cls._cache[key] = TreeTensors(tree, size, device)
        return t


@functools.singledispatch
def tree_tensors(tree, size: int, device: torch.device) -> TreeTensors:
    """The device tensors of ``Draft.tree`` padded to ``size`` nodes: one function per declared variant."""
    raise TypeError(f"Draft.tree must be a specdec.shared.tree.Tree or a DeviceTree, got {type(tree).__name__}")


@tree_tensors.register
def _(tree: Tree, size: int, device: torch.device) -> TreeTensors:
    return TreeTensors.get(tree, size, device)


@tree_tensors.register
def _(tree: DeviceTree, size: int, device: torch.device) -> TreeTensors:
    return TreeTensors.from_device(tree, size)


def accept_and_compact(cache, logits, node_tokens, parents, depth, ancestor, valid, seq=None, tp=None,
                       vocab_size: int | None = None) -> torch.Tensor:
    """Greedy acceptance and KV compaction with no host synchronisation (graph-capturable).

    Applies :func:`specdec.shared.acceptance.greedy_best_node` (dummy nodes can never be accepted),
    moves the accepted path's rows to ``[L, L + n)`` in every layer with one
    :func:`specdec.fast.kernels.compact_kv` launch, and advances ``cache.length_t`` by ``n``.
    Returns ``[best, next_token, path mask (M), node tokens (M), parents (M)]`` as one long tensor,
    for the round's single read-back. With ``seq`` (int32, the sequence by position) the accepted
    tokens and the next one are also written at their positions (for device-driven rounds).
    Three launches: :func:`specdec.fast.kernels.row_argmax`, :func:`specdec.fast.kernels.greedy_accept`
    and the compaction. With ``tp`` (a :class:`~specdec.fast.tp.TensorParallel`), ``logits`` is this rank's
    vocabulary slice [M, V'] and the argmax is :meth:`~specdec.fast.tp.TensorParallel.argmax` over the
    ``vocab_size`` real ids (one 8-byte key per row gathered, not the logits).
    """
    from specdec.fast import kernels as K

    if tp is not None:
        amax = tp.argmax(logits, vocab_size)
    else:
        amax = K.row_argmax(logits) if logits.is_cuda else torch.argmax(logits, dim=-1)
    packed, src, dst, n = K.greedy_accept(amax, node_tokens, parents, depth, ancestor, valid, cache.length_t, seq=seq)
    K.compact_kv(cache.k, cache.v, src[None], dst, n_accept=n)
    return packed


def verify_and_accept(target: FastModel, cache, node_tokens, parents, depth, ancestor, valid, seq=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 of a greedy round on the device (graph-capturable): verify the ``M`` nodes at rows
    ``[L, L + M)`` (``L`` = ``cache.length_t``), then :func:`accept_and_compact`.

    Returns ``(logits [M, V], packed)`` -- ``packed`` as :func:`accept_and_compact` returns it; under tensor
    parallelism the logits stay this rank's vocabulary slice [M, V'] (greedy acceptance needs only their
    argmax, taken across the ranks without gathering them; the fused rounds never read the logits). A
    drafter that builds its tree on the device captures this after its own body, so a whole round is
    one CUDA graph (see ``fused_round`` in :class:`specdec.fast.glide.FastGlideDrafter`).
    """
    positions = depth + cache.length_t[:1].long()
    tp = target.tp
    logits = step_forward(target, cache, node_tokens[None], positions[None], ancestor[None], cache.length_t,
                          gather=tp is None)[0]
    return logits, accept_and_compact(cache, logits, node_tokens, parents, depth, ancestor, valid, seq=seq, tp=tp,
                                      vocab_size=target.config.vocab_size)


def _run_fused_greedy(target: FastModel, drafter: FastDrafter, state: RoundState, first: FusedRound, out_: _Emitted,
                      max_gen_len: int, eos: set[int], tree_size: int) -> int:
    """Greedy fused rounds until the budget is spent or an EOS is emitted; returns the rounds read.

    ``first`` is the :class:`FusedRound` just launched by ``drafter.fused_round``.
    Each launched round's read-back is copied to one of two pinned buffers (with an event), so the
    host can wait for ONE round while the next one already runs. Before reading a round, the loop
    launches the next as a device-driven round when the drafter offers them (:meth:`FastDrafter.run_ahead`)
    and allows this one (:meth:`RunAhead.can_run_ahead`); otherwise (start, the draft window's shift, the last rounds) it
    reads first and launches a host-packed round (``fused_round``). A device-driven round launched
    past an EOS is dropped (its cache-length advance is undone).
    """
    from collections import deque

    cache, dev = state.target_cache, target.device
    cuda = dev.type == "cuda"
    ahead = drafter.run_ahead()
    slots = [torch.empty(2 + 3 * tree_size, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
    inflight: deque = deque()  # (host slot, event, device-driven?, m) in launch order; at most two
    turn = 0

    def launched(packed_t: torch.Tensor, ahead: bool, m: int | None) -> None:
        nonlocal turn
        slot = slots[turn]
        turn ^= 1
        slot.copy_(packed_t, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        inflight.append((slot, event, ahead, m))

    launched(first.packed, False, first.m)
    num = 0
    L = cache.length  # the start length of the oldest round in flight
    while inflight:
        # 1-4 of the NEXT round go to the GPU now, before this round's result is read (no host input)
        if ahead is not None and len(inflight) == 1 and ahead.can_run_ahead(L, len(out_.emitted), max_gen_len):
            launched(ahead.launch_ahead()[0], True, None)
        slot, event, device_driven, m = inflight.popleft()
        if event is not None:
            event.synchronize()
        if device_driven:
            m = ahead.ahead_round_read(L, len(out_.emitted), max_gen_len)
        num += 1
        next_token, path, draft_tokens, parents = _read_packed(slot.tolist(), tree_size, m)
        L += len(path)
        cache.length = L  # the device mirror was advanced by the round's acceptance kernel
        out_.round(draft_tokens, parents, path, next_token)
        if out_.done(max_gen_len, eos, new=len(path)):
            break
        if not inflight:  # nothing may run ahead: a host-packed round on the up-to-date state
            state = RoundState(out_.tokens, target, cache, None, state.params, state.generator, max_gen_len - len(out_.emitted))
            nxt = drafter.fused_round(state, tree_size)
            launched(nxt.packed, False, nxt.m)
    if inflight:  # a round launched past an EOS: its results are dropped
        sync(dev)
        cache.set_length(cache.length)
    return num


@torch.inference_mode()
def run_speculative_fast(
    target: FastModel,
    drafter: FastDrafter | Drafter,
    input_ids: torch.Tensor,
    prompt_length: int,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    method: str = "speculative decoding",
    tree_size: int = MAX_TREE_NODES,
    first_target: bool = True,
    skip_sample_adjustment: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """The fast speculative loop around any drafter (batch size 1).

    ``tree_size`` is the fixed number of verified nodes per round (root included): drafts are
    padded up to it; a larger draft is an error. ``drafter`` is a :class:`FastDrafter` or a plain
    :class:`specdec.shared.round.Drafter`. ``sampling`` and ``seed`` as in
    :func:`specdec.ref.engine.run_speculative` (the drafter sees the resolved seed in ``state.params``).
    """
    params = SamplingParams(temperature, top_k, top_p, sampling, seed)
    dev = target.device
    batch = normalize_prompts(input_ids, prompt_length, max_gen_len, target.config, device=dev)
    drafters = [as_fast_drafter(d) for d in _drafters_per_row(drafter, batch.size, method)]
    drafter = drafters[0]
    prompt = batch.padded(0)
    if not 1 <= tree_size <= MAX_TREE_NODES:
        raise ValueError(f"the verified tree must have 1..{MAX_TREE_NODES} nodes, got {tree_size}")
    check_generator(generator)
    params, generator = resolve_sampling(params, generator, dev)
    eos = set(normalize_eos(eos_id, target.config.eos_token_ids, target.config.vocab_size))
    if batch.size > 1:
        return _run_batch(target, drafters, batch, max_gen_len, eos, params, generator, method, tree_size, first_target,
                          skip_sample_adjustment, on_round)
    out_ = _Emitted(prompt[0].tolist(), on_round)
    tokens = out_.tokens
    # room for the prompt, every emitted token, and one round of tree rows past the end
    cache = target.ensure_cache(1, prompt.shape[1] + max_gen_len + tree_size + 1)
    num = 0

    t0 = time.perf_counter()
    if first_target:
        last_logits = prefill(target, cache, prompt)[0]
        out_.first(int(sample_next(last_logits, params, generator, prompt.shape[1])))  # the token at position T
        num = 1
    else:
        last_logits = prefill(target, cache, prompt[:, :-1])[0] if prompt.shape[1] > 1 else None
    # the drafter's own pass over the prompt belongs to the prefill too
    drafter.prefill(RoundState(tokens, target, cache, last_logits, params, generator, max_gen_len - len(out_.emitted)))
    sync(dev)
    prefill_time = time.perf_counter() - t0

    tp_local = _sharded_greedy(target, params, [drafter])
    t1 = time.perf_counter()
    while not out_.done(max_gen_len, eos):
        L = cache.length
        state = RoundState(tokens, target, cache, last_logits, params, generator, max_gen_len - len(out_.emitted))
        # A drafter offering fused rounds runs draft + verify + greedy accept as ONE graph per round.
        out = drafter.fused_round(state, tree_size) if params.greedy else None
        if out is not None:
            # every remaining round is fused (1-4 in one graph replay); device-driven ones run ahead
            num += _run_fused_greedy(target, drafter, state, out, out_, max_gen_len, eos, tree_size)
            break
        # 1. Draft (a host Tree, or a DeviceTree built on the device by the drafter).
        draft: Draft = drafter.propose(state)
        m = draft.tree.size
        if m > tree_size:
            raise RuntimeError(f"drafter bug: a draft of {m} nodes exceeds the fixed tree size {tree_size}")
        tt = tree_tensors(draft.tree, tree_size, dev)
        if m == tree_size and draft.tokens.device == dev and draft.tokens.dtype == torch.long:
            node_tokens = draft.tokens  # a full device-side draft (GLIDE): nothing to pad
        else:
            node_tokens = torch.zeros(tree_size, dtype=torch.long, device=dev)
            node_tokens[:m] = draft.tokens.to(dev)
        # 2. Verify all nodes (padded to tree_size) in one graph-replayed pass.
        logits = run_step(target, cache, node_tokens[None], (tt.depth + L)[None], tt.mask, gather=not tp_local)[0]
        num += 1
        # 3. Accept.
        if params.greedy:
            # 3-4 on the device (one graph replay on CUDA): accept, then compact the KV of every layer.
            inputs = dict(logits=logits, node_tokens=node_tokens, parents=tt.parents, depth=tt.depth,
                          ancestor=tt.ancestor, valid=tt.valid)
            sharded = dict(tp=target.tp, vocab_size=target.config.vocab_size) if tp_local else {}
            key = ("accept", id(cache), tree_size, tp_local)
            fn = target.graphs.get(key)
            if fn is None and target.use_graphs:
                with cache.restored_tree_rows(tree_size):  # capturing runs the function (twice to warm up)
                    fn = target.graphs[key] = CapturedFn(lambda **kw: accept_and_compact(cache, **kw, **sharded), inputs)
            packed_t = fn(**inputs) if fn is not None else accept_and_compact(cache, **inputs, **sharded)
            # the one host synchronisation of the round: accepted node, next token, its path, the draft
            next_token, path, draft_tokens, parents = _read_packed(packed_t.tolist(), tree_size, m)
            cache.length = L + len(path)  # the device mirror was advanced by accept_and_compact
        else:
            draft_tokens, parents = draft.tokens.tolist(), tt.parents[:m].tolist()
            host = Draft(torch.tensor(draft_tokens), Tree.from_parents(parents), draft.q)
            path, next_token = accept_draft(host, logits[:m], params, generator, skip_sample_adjustment, root_position=L)
            # 4. Compact: the accepted rows of every layer move to [L, L + len(path)).
            contiguous = path == list(range(len(path)))
            commit(cache, None if contiguous else torch.tensor([path], dtype=torch.int32, device=dev), len(path))
        # 5. Emit.
        out_.round(draft_tokens, parents, path, next_token, draft.q)
        last_logits = None if tp_local else logits[path[-1]]
    sync(dev)
    elapsed = time.perf_counter() - t1
    return GenerationResult.from_rounds(out_.emitted, out_.spec, eos, max_gen_len, num, elapsed, prefill_time, out_.accept_lengths)
