"""One GLIDE beam level on the device: the best ``k`` (node, token) pairs and the tree bookkeeping.

What it computes -- exactly :func:`specdec.shared.glide.beam_level`::

    score[p, v] = cum[p] + logprobs[p, v]            # fp32, the same single add as the reference
    the k best pairs by (score descending, flat index p * V + v ascending)

and, for the fast GLIDE round, writes the new level straight into the round's tree buffers
(global node ids ``node_offset + j``, ``j < k``, best first)::

    tokens[node_offset + j]  = v_j
    parents[node_offset + j] = parent_offset + p_j   # the global id of the chosen node of this level
    cum_out[j]               = score_j
    ancestor[node_offset + j, :] = ancestor[parent, :] | {0} | {node_offset + j}

(the ancestor-or-self matrix of the whole draft tree, root = node 0, as
:class:`specdec.fast.glide.DeviceTree` carries it). The root's own entries (token, parent -1, row
``{0}``) are written by the first level's launch.

Shapes: ``cum`` [P] fp32 (or None for the root level: all zero), ``logprobs`` [P, V] fp32 (rows
may be strided), ``k <= P * V``. The tree buffers: ``tokens``/``parents`` [M] int64, ``ancestor``
[M, M] bool (contiguous).

How: every (score, flat index) becomes one int64 key whose integer order is the total order (score
desc, index asc): the score's fp32 bits mapped to an order-preserving signed integer in the high half,
``2**31 - 1 - index`` in the low half. The P * V keys are cut into blocks; each program keeps its
block's best ``K_PAD`` (= next power of two >= k) by repeated selection -- the next pick is the
largest key below the previous pick, one max-reduction per pick -- and writes them as candidates;
passes over the candidates repeat until one block holds them all, whose program decodes the keys and
writes the result. Every pass keeps each
block's best in the same total order, so the result is the exact top ``k``: ties go to the lower
flat index however many entries tie (the reference is exact too). A NaN score counts as -inf.

Against PyTorch (``topk`` per row, ``topk`` over the rows' winners, two sorts, gathers and ~8
bookkeeping ops per level) this is one launch for the root level (``P * V <= 8192``) and two for a
16-node level of a 128k vocabulary.

Reference (must match): :func:`specdec.shared.glide.beam_level` for (parent, token, score).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, next_pow2

__all__ = ["beam_select", "beam_topk"]

_BIG = 2**31 - 1  # "no entry" index (sorts after every real flat index)
_MAX_FINAL = 8192  # a block the single final program selects from
_MAX_ITEMS = 2**31 - 2


@triton.jit
def _to_key(val, idx):
    """(score, flat index) -> one int64 whose order is (score descending, index ascending) as ``>``.

    High 32 bits: the fp32 bits mapped to a signed integer with the float's order (negative floats get
    their magnitude bits flipped; -0.0 is first made +0.0 so equal scores tie). Low 32 bits: 2**31 - 1 -
    index (a lower index is a larger key). Invalid entries get the smallest int64."""
    bits = (val + 0.0).to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = (mono.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)
    return tl.where(idx != 2147483647, key, _min_key())


@triton.jit
def _min_key():
    return tl.full([], -2147483648, tl.int32).to(tl.int64) << 32


@triton.jit(do_not_specialize=["lp_stride", "n_items", "V", "k", "m_total", "node_off", "parent_off"])
def _beam_pass_kernel(
    in_key_ptr,  # candidates of the previous pass (FROM_SCORES = False): int64 keys
    cum_ptr, lp_ptr, lp_stride,  # scores (FROM_SCORES = True)
    n_items, V,
    out_key_ptr,  # this pass's candidates (FINAL = False): [programs, K_PAD] int64 keys
    k, tok_ptr, par_ptr, cum_out_ptr, anc_ptr, m_total, node_off, parent_off, root_ptr,  # FINAL outputs
    FROM_SCORES: tl.constexpr, HAS_CUM: tl.constexpr, FINAL: tl.constexpr, WRITE_ANC: tl.constexpr,
    WRITE_ROOT: tl.constexpr, BLOCK: tl.constexpr, K_PAD: tl.constexpr, M_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < n_items
    if FROM_SCORES:
        row = offs // V
        col = offs - row * V
        val = tl.load(lp_ptr + row.to(tl.int64) * lp_stride + col, mask=live, other=float("-inf")).to(tl.float32)
        if HAS_CUM:
            val = tl.load(cum_ptr + row, mask=live, other=0.0).to(tl.float32) + val
        val = tl.where(val != val, float("-inf"), val)  # NaN counts as -inf
        key = _to_key(val, tl.where(live, offs, 2147483647))
    else:
        key = tl.load(in_key_ptr + offs, mask=live, other=_min_key())
    if FINAL:
        if WRITE_ROOT:  # the root: node 0, parent -1, ancestor row {0}, token = the last emitted one
            one = tl.arange(0, 1)
            tl.store(tok_ptr + one, tl.load(root_ptr + one).to(tl.int64))
            tl.store(par_ptr + one, tl.full([1], -1, tl.int64))
            if WRITE_ANC:
                cols0 = tl.arange(0, M_PAD)
                tl.store(anc_ptr + cols0, (cols0 == 0).to(tl.int8), mask=cols0 < m_total)
    prev = tl.full([], 9223372036854775807, tl.int64)
    for j in range(K_PAD):
        # the next entry in the order (score desc, index asc): the largest key below the previous pick
        best = tl.max(tl.where(key < prev, key, _min_key()), axis=0)
        prev = best
        if FINAL:
            if j < k:
                best_i = 2147483647 - (best & 0xFFFFFFFF).to(tl.int32)
                mono = (best >> 32).to(tl.int32)
                best_v = (mono ^ ((mono >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
                p = best_i // V
                node = node_off + j
                tl.store(tok_ptr + node, (best_i - p * V).to(tl.int64))
                tl.store(par_ptr + node, (parent_off + p).to(tl.int64))
                tl.store(cum_out_ptr + j, best_v)
                if WRITE_ANC:
                    cols = tl.arange(0, M_PAD)
                    parent = parent_off + p
                    # the parent's row was written by an earlier launch (or is the root's {0})
                    prow = tl.load(anc_ptr + parent * m_total + cols, mask=(cols < m_total) & ((cols * 0 + parent) > 0), other=0)
                    r = (prow != 0) | (cols == 0) | (cols == node)
                    tl.store(anc_ptr + node * m_total + cols, r.to(tl.int8), mask=cols < m_total)
        else:
            tl.store(out_key_ptr + pid * K_PAD + j, best)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def beam_select(
    cum: torch.Tensor | None,
    logprobs: torch.Tensor,
    k: int,
    tokens: torch.Tensor,
    parents: torch.Tensor,
    cum_out: torch.Tensor,
    node_offset: int,
    parent_offset: int,
    ancestor: torch.Tensor | None = None,
    root_token: torch.Tensor | None = None,
) -> None:
    """Select one beam level into the tree buffers (see the module docstring); graph-capturable.

    Args:
        cum: [P] fp32 cumulative log-probability of the current level's nodes, or None (root: zeros).
        logprobs: [P, V] fp32 draft log-probabilities (unit stride along V).
        k: nodes to keep, 1 <= k <= P * V.
        tokens, parents: [M] int64 tree buffers; entries ``node_offset .. node_offset + k - 1`` are written.
        cum_out: [>= k] fp32, receives the kept scores (best first).
        node_offset: global id of the first new node; ``node_offset + k <= M``.
        parent_offset: global id of the current level's node 0 (``cum``'s index 0).
        ancestor: optional [M, M] bool ancestor-or-self matrix; the new rows are written.
        root_token: optional 1-element integer tensor: also write the root (node 0) entries.
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs must be a [P, V] tensor, got {getattr(logprobs, 'shape', type(logprobs).__name__)}")
    if logprobs.dtype != torch.float32 or logprobs.stride(1) != 1:
        raise ValueError(f"logprobs must be float32 with unit stride along V, got {logprobs.dtype}, strides {logprobs.stride()}")
    n, v = logprobs.shape
    if n * v > _MAX_ITEMS:
        raise ValueError(f"P * V must be < 2**31, got {n} * {v}")
    if cum is not None and (cum.shape != (n,) or cum.dtype != torch.float32):
        raise ValueError(f"cum must be float32 of shape [{n}], got {cum.dtype} {tuple(cum.shape)}")
    if not 1 <= k <= n * v:
        raise ValueError(f"k must be in [1, P * V = {n * v}], got {k}")
    m = tokens.shape[0]
    for name, t in (("tokens", tokens), ("parents", parents)):
        if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != m or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 [M] tensor, got {t.dtype} {tuple(t.shape)}")
    if not (0 <= parent_offset and parent_offset + n <= node_offset and node_offset + k <= m):
        raise ValueError(f"need 0 <= parent_offset ({parent_offset}), parent_offset + P ({n}) <= node_offset ({node_offset}) "
                         f"and node_offset + k ({k}) <= M ({m})")
    if cum_out.dtype != torch.float32 or cum_out.numel() < k or not cum_out.is_contiguous():
        raise ValueError(f"cum_out must be a contiguous float32 tensor of >= {k} entries")
    if ancestor is not None and (ancestor.dtype != torch.bool or tuple(ancestor.shape) != (m, m) or not ancestor.is_contiguous()):
        raise ValueError(f"ancestor must be a contiguous bool [{m}, {m}] tensor, got {ancestor.dtype} {tuple(ancestor.shape)}")
    if root_token is not None and root_token.numel() < 1:
        raise ValueError("root_token must hold one token id")
    named = [("logprobs", logprobs), ("tokens", tokens), ("parents", parents), ("cum_out", cum_out)]
    named += [(nm, t) for nm, t in (("cum", cum), ("ancestor", ancestor), ("root_token", root_token)) if t is not None]
    dev = check_device(*named)
    del dev
    k_pad = max(next_pow2(k), 2)
    items = n * v
    anc = ancestor.view(torch.int8) if ancestor is not None else tokens  # (dummy pointer when unused)
    flags = dict(HAS_CUM=cum is not None, WRITE_ANC=ancestor is not None, K_PAD=k_pad,
                 M_PAD=max(next_pow2(m), 128))  # one variant for every tree of <= 128 nodes (no compile per size)
    final_args = (k, tokens, parents, cum_out, anc, m, node_offset, parent_offset,
                  root_token if root_token is not None else tokens)
    cum_arg = cum if cum is not None else logprobs
    if items <= _MAX_FINAL:
        block = max(next_pow2(items), 16)
        _beam_pass_kernel[(1,)](tokens, cum_arg, logprobs, logprobs.stride(0), items, v, tokens,
                                *final_args, FROM_SCORES=True, FINAL=True, WRITE_ROOT=root_token is not None,
                                BLOCK=block, num_warps=_warps(block), **flags)
        return
    # pass 1: per-block best K_PAD of the scores; blocks sized so the candidates fit one final block
    block = min(max(1024, next_pow2(-(-items * k_pad // _MAX_FINAL))), 16384)
    grid = -(-items // block)
    keys = torch.empty(grid * k_pad, dtype=torch.int64, device=logprobs.device)
    _beam_pass_kernel[(grid,)](tokens, cum_arg, logprobs, logprobs.stride(0), items, v, keys,
                               *final_args, FROM_SCORES=True, FINAL=False, WRITE_ROOT=False,
                               BLOCK=block, num_warps=_warps(block), **flags)
    items = grid * k_pad
    while items > _MAX_FINAL:  # only for very wide levels: reduce the candidates further
        block = _MAX_FINAL
        grid = -(-items // block)
        nkeys = torch.empty(grid * k_pad, dtype=torch.int64, device=logprobs.device)
        _beam_pass_kernel[(grid,)](keys, cum_arg, logprobs, 0, items, v, nkeys, *final_args,
                                   FROM_SCORES=False, FINAL=False, WRITE_ROOT=False, BLOCK=block,
                                   num_warps=_warps(block), **flags)
        keys, items = nkeys, grid * k_pad
    block = max(next_pow2(items), 16)
    _beam_pass_kernel[(1,)](keys, cum_arg, logprobs, 0, items, v, keys, *final_args,
                            FROM_SCORES=False, FINAL=True, WRITE_ROOT=root_token is not None,
                            BLOCK=block, num_warps=_warps(block), **flags)


def beam_topk(cum: torch.Tensor, logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`specdec.shared.glide.beam_level` on the kernel: (parent [k] long, token [k] long, score [k] fp32).

    ``k`` is clamped to ``P * V`` as in the reference.
    """
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs must be a [P, V] tensor, got {getattr(logprobs, 'shape', type(logprobs).__name__)}")
    n, v = logprobs.shape
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    k = min(k, n * v)
    dev = logprobs.device
    tokens = torch.empty(n + k, dtype=torch.long, device=dev)
    parents = torch.empty(n + k, dtype=torch.long, device=dev)
    score = torch.empty(k, dtype=torch.float32, device=dev)
    beam_select(cum.float().contiguous(), logprobs.float().contiguous(), k, tokens, parents, score, node_offset=n, parent_offset=0)
    return parents[n:], tokens[n:], score
