"""KV-cache compaction after verification: move the accepted tree rows into place, all layers at once.

After a tree is verified its M nodes sit in cache rows ``[L, L + M)`` but only one root-to-leaf
path was accepted. :func:`compact_kv` copies, for every layer ``l``, batch ``b``, KV head ``h`` and
``j < n_accept[b]``::

    cache[l, b, h, dst_start[b] + j, :] = cache[l, b, h, src_index[b, j], :]

with gather-then-scatter semantics (every source row is read before any row is written), for
``k_cache`` and ``v_cache`` alike, in ONE launch with grid ``(B * Hkv, n_layers)``.

Shapes: ``k_cache, v_cache`` [n_layers, B, Hkv, capacity, D] (any strides; or a list of
``n_layers`` tensors [B, Hkv, capacity, D], see below); ``src_index`` [B, J] integer;
``dst_start`` int or [B] integer; ``n_accept`` [B] integer in [0, J] (default: all J).

Overlap: a program owns all rows of one (layer, batch, head). It loads every accepted source row
into registers, passes a CTA barrier, and only then stores, so overlapping source and destination
ranges (accepted rows sit at ``src >= dst``; rows may also move onto each other) are safe. The
head dim is processed in column chunks to bound registers; chunks touch disjoint columns.

A list of per-layer tensors is used as one strided 5-D view when the layers are equally spaced in
one storage (the usual preallocated cache); otherwise it costs one launch per layer.

Reference: :func:`compact_kv_ref` (torch gather + scatter); the kernel must match it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, check_device, check_int_tensor, graph_capturing, next_pow2

__all__ = ["compact_kv", "compact_kv_ref"]


@triton.jit(do_not_specialize=["stride_sb", "J"])
def _compact_kv_kernel(
    K, V, Src, DstStart, NAccept,
    stride_kl, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vl, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sj,
    H_KV, J,
    HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, CHUNK_D: tl.constexpr,
):
    # -- which (layer, batch, kv head) this program compacts -----------------------------------------
    pid_z = tl.program_id(0)
    layer = tl.program_id(1)
    b = pid_z // H_KV
    h = pid_z % H_KV
    b64 = b.to(tl.int64)

    # -- the accepted rows of this batch entry: j < n_accept[b] ---------------------------------------
    offs_j = tl.arange(0, BLOCK_J)
    n_acc = tl.load(NAccept + b)
    j_ok = (offs_j < J) & (offs_j < n_acc)
    src = tl.load(Src + b64 * stride_sb + offs_j * stride_sj, mask=j_ok, other=0)
    dst = tl.load(DstStart + b) + offs_j

    k_base = K + layer.to(tl.int64) * stride_kl + b64 * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + layer.to(tl.int64) * stride_vl + b64 * stride_vb + h.to(tl.int64) * stride_vh

    # -- per column chunk: load ALL source rows, barrier, then store (safe under overlap) -------------
    for d0 in tl.static_range(0, HEAD_DIM, CHUNK_D):
        offs_d = d0 + tl.arange(0, CHUNK_D)
        mask = j_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        k_rows = tl.load(k_base + src[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd, mask=mask)
        v_rows = tl.load(v_base + src[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd, mask=mask)
        tl.debug_barrier()   # every thread has read its source rows before anyone writes
        tl.store(k_base + dst[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd, k_rows, mask=mask)
        tl.store(v_base + dst[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd, v_rows, mask=mask)
        tl.debug_barrier()


def _as_5d(name: str, cache) -> torch.Tensor | list[torch.Tensor]:
    """A 5-D cache tensor, or a list of 4-D layers turned into one strided 5-D view when possible."""
    if isinstance(cache, torch.Tensor):
        if cache.dim() != 5:
            raise ValueError(f"{name} must be [n_layers, B, Hkv, capacity, D] (5 dims), got shape {tuple(cache.shape)}")
        return cache
    if not isinstance(cache, (list, tuple)) or not cache or not all(isinstance(t, torch.Tensor) for t in cache):
        raise TypeError(f"{name} must be a 5-D tensor or a non-empty list of 4-D tensors")
    first = cache[0]
    for i, t in enumerate(cache):
        if t.dim() != 4 or t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{name}[{i}] must be [B, Hkv, capacity, D] like {name}[0] {tuple(first.shape)} "
                             f"(same shape, strides, dtype, device); got {tuple(t.shape)}")
    if len(cache) == 1:
        return first.unsqueeze(0)
    es = first.element_size()
    gap = cache[1].data_ptr() - first.data_ptr()
    same_storage = all(t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for t in cache)
    if same_storage and gap > 0 and gap % es == 0 and all(
        cache[i].data_ptr() - first.data_ptr() == i * gap for i in range(len(cache))
    ):
        return first.as_strided((len(cache),) + tuple(first.shape), (gap // es,) + tuple(first.stride()),
                                first.storage_offset())
    return [t.unsqueeze(0) for t in cache]   # scattered layers: one launch each


def compact_kv(k_cache, v_cache, src_index: torch.Tensor, dst_start, n_accept: torch.Tensor | None = None) -> None:
    """In place, for every layer: ``cache[l, b, :, dst_start[b] + j] = cache[l, b, :, src_index[b, j]]``, j < n_accept[b].

    Args:
        k_cache, v_cache: [n_layers, B, Hkv, capacity, D] (fp16/bf16/fp32, same shape/dtype/device),
            or lists of n_layers [B, Hkv, capacity, D] tensors.
        src_index: [B, J] integer source rows, each in [0, capacity) for j < n_accept[b].
        dst_start: int or [B] integer; rows dst_start[b] + j must lie in [0, capacity).
        n_accept: [B] integer in [0, J]; default J for every batch entry.
    Matches :func:`compact_kv_ref`. Value ranges are not checked under CUDA graph capture.
    """
    k5 = _as_5d("k_cache", k_cache)
    v5 = _as_5d("v_cache", v_cache)
    if isinstance(k5, list) != isinstance(v5, list):
        v5 = v5 if isinstance(v5, list) else [v5[i : i + 1] for i in range(v5.shape[0])]
        k5 = k5 if isinstance(k5, list) else [k5[i : i + 1] for i in range(k5.shape[0])]
    k_ref = k5[0] if isinstance(k5, list) else k5
    v_ref = v5[0] if isinstance(v5, list) else v5
    n_layers = len(k5) if isinstance(k5, list) else k5.shape[0]
    v_layers = len(v5) if isinstance(v5, list) else v5.shape[0]
    if k_ref.shape[1:] != v_ref.shape[1:] or n_layers != v_layers:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_ref.shape[1:])} x {n_layers} "
                         f"and {tuple(v_ref.shape[1:])} x {v_layers}")
    if k_ref.dtype not in SUPPORTED_DTYPES or v_ref.dtype != k_ref.dtype:
        raise TypeError(f"caches must share one dtype of float16/bfloat16/float32, got {k_ref.dtype}, {v_ref.dtype}")
    _, b, hkv, cap, d = k_ref.shape
    if not isinstance(src_index, torch.Tensor) or src_index.dim() != 2:
        raise ValueError(f"src_index must be a [B, J] integer tensor, got {getattr(src_index, 'shape', type(src_index))}")
    check_int_tensor("src_index", src_index, (b, src_index.shape[1]))
    j = src_index.shape[1]
    dev = check_device(("k_cache", k_ref), ("v_cache", v_ref), ("src_index", src_index))
    if isinstance(dst_start, bool) or not isinstance(dst_start, (int, torch.Tensor)):
        raise TypeError(f"dst_start must be an int or a [B] integer tensor, got {type(dst_start).__name__}")
    if isinstance(dst_start, int):
        dst = torch.full((b,), dst_start, dtype=torch.int32, device=dev)
    else:
        check_int_tensor("dst_start", dst_start, (b,))
        dst = dst_start.to(device=dev, dtype=torch.int32)
    if n_accept is None:
        nacc = torch.full((b,), j, dtype=torch.int32, device=dev)
    else:
        check_int_tensor("n_accept", n_accept, (b,))
        nacc = n_accept.to(device=dev, dtype=torch.int32)
    src = src_index.to(device=dev, dtype=torch.int32)
    if b == 0 or j == 0 or n_layers == 0:
        return
    if not graph_capturing(dev):
        valid = torch.arange(j, device=dev)[None, :] < nacc[:, None]
        big = torch.iinfo(torch.int32).max
        stats = torch.stack([
            nacc.min(), nacc.max(), dst.min(), (dst + nacc).max(),
            torch.where(valid, src, big).min(), torch.where(valid, src, -1).max(),
        ]).long().tolist()
        if stats[0] < 0 or stats[1] > j:
            raise ValueError(f"n_accept must be in [0, J] = [0, {j}]; got range [{stats[0]}, {stats[1]}]")
        if stats[2] < 0 or stats[3] > cap:
            raise ValueError(f"destination rows dst_start + j must lie in [0, capacity) = [0, {cap}); "
                             f"got dst_start min {stats[2]}, max end {stats[3]}")
        if stats[1] > 0 and (stats[4] < 0 or stats[5] >= cap):
            raise ValueError(f"src_index (for j < n_accept) must be in [0, capacity) = [0, {cap}); "
                             f"got range [{stats[4]}, {stats[5]}]")
    block_j = max(16, next_pow2(j))
    block_d = next_pow2(d)
    chunk_d = min(block_d, max(16, 4096 // block_j))   # at most 4096 elements per tile
    launches = list(zip(k5, v5)) if isinstance(k5, list) else [(k5, v5)]
    for kt, vt in launches:
        _compact_kv_kernel[(b * hkv, kt.shape[0])](
            kt, vt, src, dst, nacc,
            *kt.stride(), *vt.stride(),
            src.stride(0), src.stride(1),
            hkv, j,
            HEAD_DIM=d, BLOCK_J=block_j, CHUNK_D=chunk_d,
            num_warps=4,
        )


def compact_kv_ref(k_cache, v_cache, src_index: torch.Tensor, dst_start, n_accept: torch.Tensor | None = None) -> None:
    """Reference for :func:`compact_kv`, in place with torch gather then scatter (per batch entry)."""
    caches = [k_cache, v_cache]
    b, j = src_index.shape
    dst = torch.as_tensor(dst_start).long().expand(b)
    nacc = torch.full((b,), j) if n_accept is None else n_accept.long().cpu()
    for cache in caches:
        layers = cache if isinstance(cache, (list, tuple)) else [cache[i] for i in range(cache.shape[0])]
        for layer in layers:                       # [B, Hkv, capacity, D]
            for bi in range(b):
                n = int(nacc[bi])
                if n == 0:
                    continue
                rows = layer[bi].index_select(1, src_index[bi, :n].to(layer.device).long()).clone()   # gather first
                d0 = int(dst[bi])
                layer[bi, :, d0 : d0 + n] = rows                                                   # then scatter
