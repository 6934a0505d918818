"""Tensor parallelism for the fast target model over ``torch.distributed`` (issue 23; gpt-fast's layout).

Every rank holds a slice of each layer and runs the same decoder loop on the same inputs; two
all-reduces per layer and one all-gather of the logits keep every rank's view of the sequence
identical, so the host-side logic of every decoder (drafting, acceptance, EOS) runs unchanged on
each rank and takes the same decisions. Nothing here is a home-made transport: the collectives are
``torch.distributed``'s (NCCL on CUDA, gloo on CPU), and CUDA graphs capture them like any kernel.

How a layer is split over ``world`` ranks (rank r of world W):

* ``wqkv`` (column-parallel): rank r keeps the q rows of query heads ``[r Hq/W, (r+1) Hq/W)`` and the
  k / v rows of KV heads ``[r Hkv/W, (r+1) Hkv/W)`` (GQA-aware: a query head's KV head lands on the
  same rank), so attention and the KV cache are local -- each rank caches ``Hkv / W`` heads.
* ``wo`` (row-parallel): the columns of rank r's query heads; the partial products are summed by an
  all-reduce, then added to the residual stream. Its bias is added once (rank 0 keeps it).
* ``w13`` (column-parallel): rank r's slice of the gate rows and of the up rows (``F / W`` each).
* ``w2`` (row-parallel): the matching columns; all-reduce, then the residual add.
* ``lm_head`` (vocab-parallel): rows ``[r V', (r+1) V')`` of the vocabulary padded to ``W V'``; the
  ranks' logits are all-gathered and the padding cut, so every rank sees the full logits.
* The embedding and the norms are replicated.

Where a greedy step needs only the argmax over the vocabulary, :meth:`TensorParallel.argmax` finds it
from the ranks' vocabulary slices without gathering the logits: each rank reduces its slice to one
(value, global index) pair per row, packed into one int64 order key (:func:`order_key`), and only those
keys are all-gathered -- one int64 per row and rank instead of ``V'`` floats. The result is
``torch.argmax`` of the full logits, bit for bit (ties and NaN included). The GLIDE beam uses the same
keys for its top-k over a sharded vocabulary (:meth:`TensorParallel.beam_topk`), and the draft's
log-softmax over the sharded vocabulary needs only each row's (max, sum of exp) per rank
(:meth:`TensorParallel.log_softmax`). Sampling still gathers the full logits: top-k / top-p and the
draws need the whole processed distribution on every rank.

Needs ``Hq``, ``Hkv`` and the MLP width divisible by ``W`` (a clear error otherwise). The reference
path stays single-process; ``tests/fast/test_tensor_parallel.py`` checks TP = 2 against TP = 1 on the
CPU with gloo.

The GLIDE draft layer is sharded the same way (:func:`shard_weights` knows its names too): its
self-attention's ``wqkv`` / ``wo``, its cross-attention's ``wq_x`` / ``wo_x`` (query heads of the
rank, whose KV heads are the ones the rank caches for the target -- so the cross-attention over the
target's last-layer cache stays local) and its MLP ``w13`` / ``w2``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from specdec.shared.config import ModelConfig
from specdec.shared.glide import GlideConfig

__all__ = ["TensorParallel", "TPShard", "init_tensor_parallel", "shard_weights", "check_divisible", "order_key", "decode_key",
           "local_argmax_key", "local_beam_keys", "merge_beam_keys", "shard_canonical", "shard_columns", "INVALID_KEY"]

INVALID_KEY = torch.iinfo(torch.int64).min
"""The order key of "no entry": below every key :func:`order_key` makes."""

_LOW = 2**31 - 1   # the low half of a key holds _LOW - index (a lower index is a larger key)
_INDEX_LIMIT = 2**31 - 1


def order_key(values: torch.Tensor, index: torch.Tensor, nan: str = "max") -> torch.Tensor:
    """int64 keys whose integer order is the order (value descending, index ascending).

    ``values`` (any float dtype, compared as fp32) and ``index`` (integers in ``[0, 2**31 - 1)``) of the
    same shape. High 32 bits: the fp32 bits mapped to a signed integer with the float's order (-0.0 is
    made +0.0 first, so they tie as ``==`` says); low 32 bits: ``2**31 - 1 - index``. The same key as the
    GLIDE beam kernel's (:mod:`specdec.fast.kernels.beam`). ``nan``: ``"max"`` -- NaN ranks above
    +inf, as ``torch.argmax`` treats it (the first NaN wins); ``"-inf"`` -- NaN counts as -inf, the beam's
    rule (:func:`specdec.shared.glide.beam_level`).
    """
    if nan not in ("max", "-inf"):
        raise ValueError(f"nan must be 'max' or '-inf', got {nan!r}")
    v = values.float()
    isnan = torch.isnan(v)
    if nan == "-inf":
        v = torch.where(isnan, float("-inf"), v)
    bits = (v + 0.0).view(torch.int32).long()          # + 0.0: -0.0 -> +0.0
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    if nan == "max":
        mono = torch.where(isnan, 0x7FFFFFFF, mono)
    return (mono << 32) | (_LOW - index.long())


def decode_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(value fp32, index int64)`` of keys made by :func:`order_key` (with ``nan="-inf"``: the value
    exactly as ranked, -0.0 read back as +0.0)."""
    index = _LOW - (key & 0xFFFFFFFF)
    mono = key >> 32
    bits = mono ^ ((mono >> 31) & 0x7FFFFFFF)
    return bits.to(torch.int32).view(torch.float32), index


def shard_columns(vocab_size: int, local_width: int, rank: int, world: int) -> int:
    """How many of rank ``rank``'s ``local_width`` vocabulary columns are real: the vocabulary of
    ``vocab_size`` padded to ``world * local_width`` puts ids ``[rank * local_width, (rank + 1) * local_width)``
    on rank ``rank``; the padding (zero lm_head rows) sits at the end of the last shards and must never win."""
    if not 1 <= vocab_size <= world * local_width:
        raise ValueError(f"vocab_size must be in [1, world * local width] = [1, {world * local_width}] for a "
                         f"vocabulary slice of {local_width} columns per rank, got {vocab_size}")
    return max(0, min(local_width, vocab_size - rank * local_width))


def local_argmax_key(local_logits: torch.Tensor, vocab_size: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s part of :meth:`TensorParallel.argmax`: the :func:`order_key` (NaN highest) of its
    slice's argmax ``[...]`` -- value and GLOBAL index of ``torch.argmax`` over its real columns -- or
    :data:`INVALID_KEY` where the slice holds only padding. ``local_logits`` [..., V'] (V' = columns per rank)."""
    width = local_logits.shape[-1]
    real = shard_columns(vocab_size, width, rank, world)
    if real == 0:
        return torch.full(local_logits.shape[:-1], INVALID_KEY, dtype=torch.int64, device=local_logits.device)
    x = local_logits[..., :real]
    idx = torch.argmax(x, dim=-1, keepdim=True)             # first max, first NaN: torch.argmax's rule
    return order_key(x.gather(-1, idx)[..., 0], idx[..., 0] + rank * width, nan="max")


def local_beam_keys(cum: torch.Tensor | None, local_logprobs: torch.Tensor, vocab_size: int, k: int, rank: int,
                    world: int, local_width: int) -> torch.Tensor:
    """Rank ``rank``'s part of :meth:`TensorParallel.beam_topk`: the :func:`order_key` (NaN = -inf) of its
    best ``k`` (node, token) pairs, best first, ``[k]`` int64, padded with :data:`INVALID_KEY` when its
    slice holds fewer than ``k`` pairs.

    ``cum`` [P] fp32 (None: zeros, the root level), ``local_logprobs`` [P, R] -- the rank's R real columns
    (global ids ``rank * local_width + j``). A pair's score is ``cum[p] + logprobs[p, j]`` (one fp32 add,
    as :func:`specdec.shared.glide.beam_level`); its index is the flat index over the PADDED vocabulary,
    ``p * world * local_width + rank * local_width + j``, whose order over real pairs is the unsharded flat
    index ``p * V + v``'s."""
    p, real = local_logprobs.shape
    if real != shard_columns(vocab_size, local_width, rank, world):
        raise ValueError(f"local_logprobs must hold rank {rank}'s {shard_columns(vocab_size, local_width, rank, world)} "
                         f"real columns, got {real}")
    if p * world * local_width >= _INDEX_LIMIT:
        raise ValueError(f"P * padded vocabulary must be < 2**31 - 1, got {p} * {world * local_width}")
    keys = torch.full((k,), INVALID_KEY, dtype=torch.int64, device=local_logprobs.device)
    if real == 0:
        return keys
    scores = local_logprobs.float() if cum is None else cum.float()[:, None] + local_logprobs.float()
    cols = torch.arange(real, device=scores.device) + rank * local_width
    rows = torch.arange(p, device=scores.device)[:, None] * (world * local_width)
    flat = order_key(scores, rows + cols, nan="-inf").reshape(-1)
    take = min(k, flat.numel())
    keys[:take] = torch.topk(flat, take).values             # keys are distinct: the order is exact
    return keys


def merge_beam_keys(keys: torch.Tensor, k: int, padded_vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best ``k`` of every rank's :func:`local_beam_keys` (``keys`` [W * k] or [W, k]):
    ``(parent [k] long, token [k] long -- a global id, score [k] fp32)``, best first -- the order of
    :func:`specdec.shared.glide.beam_level`. ``k`` must not exceed the real pairs (P * V)."""
    top = torch.topk(keys.reshape(-1), k).values
    score, flat = decode_key(top)
    return flat // padded_vocab, flat % padded_vocab, score


class TPShard:
    """``world`` and ``local_kv_heads`` of a fast-path weight holder (FastModel, FastGlide): a class with a
    ``config`` (``num_kv_heads``) and a ``tp`` (:class:`TensorParallel` or None) attribute."""

    @property
    def world(self) -> int:
        """Tensor-parallel ranks sharing these weights (1 without TP)."""
        return 1 if self.tp is None else self.tp.world

    @property
    def local_kv_heads(self) -> int:
        """KV heads this rank caches and attends over (all of them without TP)."""
        return self.config.num_kv_heads // self.world


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: ``rank`` of ``world`` in ``group``."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place (returns it)."""
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along the last dim, in rank order (same shape on every rank)."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def all_gather_stack(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked in rank order: ``[world, *t.shape]`` (same shape on every rank)."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def argmax(self, local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``torch.argmax(full_logits, dim=-1)`` from this rank's vocabulary slice, without gathering the logits.

        ``local_logits`` [..., V'] is the rank's slice of the vocab-parallel lm_head's output (global ids
        ``[rank V', (rank + 1) V')`` of the vocabulary padded to ``world V'``; ids ``>= vocab_size`` are
        padding and never win). Each rank packs its slice's argmax (value, global index) into one int64
        key (:func:`local_argmax_key`); the keys ``[...]`` are all-gathered and the largest wins. Returns
        int64 ``[...]`` global ids, the same on every rank and equal to ``torch.argmax`` of the gathered
        logits bit for bit: the largest value, the lowest index among equal ones (-0.0 == +0.0), the first
        NaN if there is one. One collective of 8 bytes per row; no host synchronisation (graph-capturable).
        """
        keys = self.all_gather_stack(local_argmax_key(local_logits, vocab_size, self.rank, self.world))
        return decode_key(keys.amax(dim=0))[1]

    def log_softmax(self, local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``log_softmax`` over the full vocabulary, computed from this rank's slice: fp32 [n, R] for the rank's
        R real columns (padding dropped).

        Each rank all-gathers its rows' (max, sum of exp(x - max)) -- [n, 2] -- and every rank combines them
        into the global ``M = max`` and ``S = sum exp(x - M)``; the result is ``(x - M) - log(S)``, the order
        of ``torch.log_softmax``'s arithmetic. The sums run in another order than one process's, so values
        may differ from the unsharded ones in the last bits (as the row-parallel sums do)."""
        real = shard_columns(vocab_size, local_logits.shape[-1], self.rank, self.world)
        x = local_logits[..., :real].float()
        if real:
            m = x.amax(dim=-1)
        else:
            m = torch.full(x.shape[:-1], float("-inf"), device=x.device)
        m_safe = torch.where(torch.isneginf(m), 0.0, m)       # an all -inf slice adds exp(-inf) = 0
        s = torch.exp(x - m_safe[..., None]).sum(dim=-1)
        both = self.all_gather_stack(torch.stack([m, s], dim=-1))       # [W, n, 2]
        big = both[..., 0].amax(dim=0)                                    # M
        scale = torch.where(torch.isneginf(both[..., 0]), 0.0, torch.exp(both[..., 0] - big))
        total = (both[..., 1] * scale).sum(dim=0)                         # S
        return x - big[..., None] - torch.log(total)[..., None]

    def beam_topk(self, cum: torch.Tensor | None, local_logprobs: torch.Tensor, vocab_size: int, k: int,
                  local_width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One GLIDE beam level over a vocab-sharded draft: :func:`specdec.shared.glide.beam_level` of the
        full log-probabilities, from this rank's slice.

        ``cum`` [P] fp32 or None (the root level), ``local_logprobs`` [P, R] fp32: the rank's R real columns
        (:meth:`log_softmax`), of ``local_width`` columns per rank. Each rank keeps its best ``k`` pairs as
        order keys (:func:`local_beam_keys`), the ``[k]`` keys are all-gathered and the best ``k`` of the
        ``world * k`` are kept (:func:`merge_beam_keys`): every pair of the global best ``k`` is among its
        own rank's best ``k``. Returns ``(parent [k], token [k] global id, score [k] fp32)``, best first: score
        descending, ties to the lower flat index ``node * V + token``, NaN as -inf -- beam_level's order.
        ``k`` is clamped to ``P * vocab_size``."""
        k = min(int(k), local_logprobs.shape[0] * vocab_size)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        mine = local_beam_keys(cum, local_logprobs, vocab_size, k, self.rank, self.world, local_width)
        return merge_beam_keys(self.all_gather_stack(mine), k, self.world * local_width)

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, world={self.world})"


def init_tensor_parallel(world: int, backend: str | None = None) -> TensorParallel:
    """Join (or start) the default process group for TP over ``world`` ranks.

    Under ``torchrun --nproc-per-node N`` the environment names the rank and the world; ``world`` must
    equal it. Backend: NCCL when CUDA is available, else gloo. On CUDA each rank uses device
    ``LOCAL_RANK``.
    """
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"tp must be an int >= 1, got {world!r}")
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != world:
        raise ValueError(f"tp={world} needs {world} processes; this one runs in a world of {env_world} "
                         f"(launch with: torchrun --nproc-per-node {world} -m specdec generate --tp {world} ...)")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return TensorParallel(rank=dist.get_rank(), world=dist.get_world_size())


def check_divisible(config: ModelConfig | GlideConfig, world: int) -> None:
    """Raise a ValueError naming the first head count / width that ``world`` does not divide."""
    for name, value in (("attention heads", config.num_heads), ("KV heads", config.num_kv_heads),
                        ("MLP width (intermediate_size)", config.intermediate_size)):
        if value % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs the model's {name} ({value}) to be a "
                             f"multiple of {world}; choose a tp that divides {value}")


def _part(t: torch.Tensor, rank: int, world: int, dim: int = 0) -> torch.Tensor:
    """Rank ``rank``'s contiguous ``1 / world`` of ``t`` along ``dim`` (a view): the one split rule of every
    column-parallel row block (a head group's q / k / v rows, a slice of the gate / up rows) and every
    row-parallel column block (``wo``, ``w2``)."""
    size = t.shape[dim] // world
    return t.narrow(dim, rank * size, size)


def _vocab_rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s ``ceil(V / world)`` rows of a [V, H] vocab-parallel output weight, zero-padded at the end."""
    v_local = -(-t.shape[0] // world)
    rows = t[rank * v_local:(rank + 1) * v_local]
    if rows.shape[0] < v_local:
        rows = torch.cat([rows, rows.new_zeros(v_local - rows.shape[0], rows.shape[1])])
    return rows


def shard_canonical(key: str, t: torch.Tensor, config: ModelConfig, tp: TensorParallel) -> torch.Tensor:
    """Rank ``tp.rank``'s slice of ONE checkpoint tensor under its canonical name (``layers.i.self_attn.q_proj.weight``,
    ...; :func:`specdec.shared.weights.expected_shapes`), as a view where possible.

    The same split as :func:`shard_weights` applies to the fused weights, tensor by tensor, so a checkpoint can be
    sharded while it is read (:func:`specdec.fast.model.load_model`): concatenating a layer's sliced q / k / v
    (gate / up) gives exactly ``shard_weights``'s ``wqkv`` (``w13``) of that layer. Biases of q / k / v follow their
    rows; ``o_proj``'s bias goes to rank 0 only (zeros elsewhere: the all-reduce adds it once)."""
    check_divisible(config, tp.world)
    r, W = tp.rank, tp.world
    leaf = key.rsplit(".", 2)
    proj, kind = leaf[-2], leaf[-1]
    if proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        return _part(t, r, W)
    if proj == "o_proj":
        if kind == "bias":
            return t if r == 0 else torch.zeros_like(t)
        return _part(t, r, W, dim=1)
    if proj == "down_proj":
        return _part(t, r, W, dim=1)
    if key == "lm_head.weight":
        return _vocab_rows(t, r, W)
    return t                                                     # embedding, norms: replicated


def shard_weights(w: dict[str, torch.Tensor], config: ModelConfig | GlideConfig, tp: TensorParallel) -> dict[str, torch.Tensor]:
    """Rank ``tp.rank``'s slice of the fused fast-path weights ``w``, as new contiguous tensors.

    Two weight sets use it: the target's (``specdec.fast.model._fuse``'s names: ``layers.i.wqkv/bqkv/wo/bo/
    w13/w2``, ``lm_head``, ``embed``, norms) and the GLIDE draft layer's (``specdec.fast.glide.as_fast_glide``'s:
    ``wqkv/bqkv/wo`` of its self-attention, ``wq_x/bq_x/wo_x`` of its cross-attention -- query heads split
    like ``wqkv``'s q rows, ``wo_x`` like ``wo`` --, ``w13/w2``, norms). ``config`` supplies the head counts,
    head dim and MLP width (a target's :class:`ModelConfig` or a :class:`GlideConfig`, which has the same)."""
    check_divisible(config, tp.world)
    r, W = tp.rank, tp.world
    d, hq, hkv, f = config.head_dim, config.num_heads, config.num_kv_heads, config.intermediate_size
    out: dict[str, torch.Tensor] = {}
    for name, t in w.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("wqkv", "bqkv"):
            out[name] = torch.cat([_part(p, r, W) for p in t.split([hq * d, hkv * d, hkv * d], dim=0)], dim=0)
        elif leaf in ("wq_x", "bq_x"):                          # the GLIDE cross-attention's query heads
            out[name] = _part(t, r, W).contiguous()
        elif leaf in ("wo", "wo_x", "w2"):
            out[name] = _part(t, r, W, dim=1).contiguous()
        elif leaf == "bo":
            out[name] = t.clone() if r == 0 else torch.zeros_like(t)   # added once by the all-reduce
        elif leaf == "w13":
            out[name] = torch.cat([_part(p, r, W) for p in t.split([f, f], dim=0)], dim=0)
        elif name == "lm_head":                                  # ceil(V / W) rows per rank, zero-padded
            out[name] = _vocab_rows(t, r, W).contiguous()
        else:                                                    # embedding, norms: replicated
            out[name] = t
    return out
