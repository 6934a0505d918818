"""The fast target model: fused weights, a static preallocated KV cache, Triton attention, CUDA graphs.

Same math as :mod:`specdec.ref.model` (which it must match token for token in fp32), organised
for speed the way gpt-fast is:

* weights are fused once at load: ``wqkv`` [(Hq + 2 Hkv) D, H] and ``w13`` [2 F, H];
* the KV cache is ONE preallocated tensor per K and V, ``[n_layers, B, Hkv, capacity, D]``;
  new rows are written in place at ``prefix_len + i`` (no concatenation, no reallocation), and
  the accepted tree rows of every layer are compacted in one launch
  (:func:`specdec.fast.kernels.compact_kv`);
* every step that scores ``M <= 128`` new tokens against the cache -- a decode step (M = 1), a
  chain or tree verification (M = gamma + 1, 69, a padded LogitSpec tree) -- runs attention
  through the Triton :func:`~specdec.fast.kernels.tree_attention` kernel, and on CUDA is
  captured once per (model, M) as a CUDA graph and replayed with new inputs;
* long prompts prefill in chunks (SDPA over the cache so far), so peak activation memory is
  bounded by the chunk, and only the last position goes through ``lm_head`` (opt-in alternative:
  :func:`_prefill_by_layer`, layer-major with one whole-prompt cuDNN attention per layer).

RoPE comes from :mod:`specdec.shared.rope` (one source of truth): a cos/sin table is built once
for the whole capacity (``dynamic`` scaling, whose frequencies depend on the call's length, is
computed per call and runs without graphs).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from specdec.fast.graphs import capture
from specdec.fast.tp import TensorParallel, TPShard, check_divisible, shard_canonical, shard_weights
from specdec.shared.config import ModelConfig
from specdec.shared.rope import apply_rope, rope_cos_sin
from specdec.shared.weights import Model, load_checkpoint, model_from_hf, model_summary, one_line_repr, resolve_dtype

__all__ = ["FastModel", "StaticKVCache", "alloc_cache", "check_cache_fits", "free_gpu_bytes", "load_model", "as_fast_model", "step_forward", "prefill", "run_step", "commit", "MAX_TREE_NODES"]

MAX_TREE_NODES = 128  # the Triton tree kernel is validated up to M = 128


def _kernels():
    from specdec.fast import kernels  # imported lazily: the package sets up the interpreter first

    return kernels


@dataclass
class StaticKVCache:
    """Preallocated K/V for every layer: ``k``, ``v`` [n_layers, B, Hkv, capacity, D].

    ``length`` is the number of verified rows (host int, the only length the host tracks);
    ``length_t`` mirrors it on the device ([B] int32) for kernels and CUDA graphs.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    length_t: torch.Tensor | None = None
    views: dict = field(default_factory=dict, repr=False, compare=False)
    """The :meth:`leading` views made so far (kept, so CUDA graphs keyed by a view's ``id`` stay valid)."""

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def set_length(self, n: int) -> None:
        self.length = n
        self.length_t.fill_(n)

    def row(self, b: int, length: int | None = None) -> "StaticKVCache":
        """Row ``b`` as a batch-of-one cache of ``length`` verified rows (default: this cache's): views, so
        writes land in this cache's memory (its ``length_t[b]`` included; its host ``length`` is not touched)."""
        return StaticKVCache(self.k[:, b:b + 1], self.v[:, b:b + 1], self.length if length is None else length,
                             self.length_t[b:b + 1])

    def leading(self, n: int) -> "StaticKVCache":
        """Rows ``[0, n)`` of the batch as a batch-of-``n`` cache: views of this cache's memory (``length_t``
        included), made once per ``n`` and kept, so the CUDA graphs captured on one (keyed by its ``id``) are
        reused by every later round of that width and dropped with this cache (:meth:`FastModel.drop_caches`).
        ``leading(B)`` of a B-row cache is the cache itself."""
        b = self.k.shape[1]
        if not 1 <= n <= b:
            raise ValueError(f"leading(n): n must be in [1, {b}] (this cache's batch), got {n}")
        if n == b:
            return self
        view = self.views.get(n)
        if view is None:
            view = self.views[n] = StaticKVCache(self.k[:, :n], self.v[:, :n], self.length, self.length_t[:n])
        view.length = self.length
        return view

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @contextlib.contextmanager
    def restored_tree_rows(self, m: int):
        """Run the block, then put back ``length_t`` and the rows ``[length, length + m)`` of every layer.

        For warm-ups and CUDA graph captures of a verification + acceptance: they write the tree rows,
        compact them and advance ``length_t``, which must not count as a real round.
        """
        L = self.length
        snap = (self.length_t.clone(), self.k[:, :, :, L : L + m].clone(), self.v[:, :, :, L : L + m].clone())
        try:
            yield
        finally:
            self.length_t.copy_(snap[0])
            self.k[:, :, :, L : L + m] = snap[1]
            self.v[:, :, :, L : L + m] = snap[2]


@dataclass
class FastModel(TPShard):
    """A target (or draft) LM prepared for the fast path. Build with :func:`load_model` or :func:`as_fast_model`."""

    config: ModelConfig
    w: dict[str, torch.Tensor] = field(repr=False)
    source: str = ""
    graphs: dict = field(default_factory=dict, repr=False)
    caches: dict = field(default_factory=dict, repr=False)
    rope_table: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # (cos, sin) [rows, D]: views of rope_cs
    rope_cs: torch.Tensor | None = field(default=None, repr=False)  # [rows, 2, D]: cos and sin side by side (one gather per step)
    use_graphs: bool = True
    tp: TensorParallel | None = None  # tensor parallelism: this rank's slice of every layer (fast/tp.py)

    @property
    def device(self) -> torch.device:
        return self.w["embed"].device

    @property
    def dtype(self) -> torch.dtype:
        return self.w["embed"].dtype

    def __repr__(self) -> str:  # one line: never print tensors
        return one_line_repr(self, "FastModel", model_summary(self.config))

    # -----------------------------------------------------------------------------------------
    # Cache management
    # -----------------------------------------------------------------------------------------

    def ensure_cache(self, batch: int, capacity: int, name: str = "main") -> StaticKVCache:
        """The model's cache called ``name``, with room for ``capacity`` rows x ``batch``, emptied.

        Reuses the existing one (and the CUDA graphs captured on it) when it is big enough. A model
        used as its own draft keeps separate caches under separate names ("main", "draft", ...).
        """
        cache = self.caches.get(name)
        if cache is not None and cache.k.shape[1] == batch and cache.capacity >= capacity:
            cache.set_length(0)
            return cache
        if cache is not None:
            del cache
            self.drop_caches(name)
        cache = self.caches[name] = alloc_cache(self, batch, capacity)
        rows = cache.capacity + MAX_TREE_NODES + 1
        if self.config.rope_type != "dynamic" and (self.rope_table is None or self.rope_table[0].shape[0] < rows):
            self.rope_cs = torch.stack(rope_cos_sin(self.config, torch.arange(rows, device=self.device), dtype=self.dtype), dim=1)
            self.rope_table = (self.rope_cs[:, 0], self.rope_cs[:, 1])
            self.graphs.clear()  # captured graphs read the old table
        return cache

    def ensure_rows(self, batch: int, capacity: int, name: str) -> StaticKVCache:
        """A batch-of-``batch`` cache called ``name``, emptied: the leading rows (:meth:`StaticKVCache.leading`) of
        the existing one when it has at least ``batch`` rows and ``capacity`` room, else :meth:`ensure_cache`. For a
        per-round scratch cache whose batch narrows within a call (MagicDec's views once finished rows leave the
        batch): no reallocation, and the graphs of each width are captured once."""
        cache = self.caches.get(name)
        if cache is not None and cache.k.shape[1] >= batch and cache.capacity >= capacity:
            view = cache.leading(batch)
            view.set_length(0)
            return view
        return self.ensure_cache(batch, capacity, name)

    @property
    def cache(self) -> StaticKVCache | None:
        return self.caches.get("main")

    def drop_caches(self, name: str | None = None) -> None:
        """Forget the cache called ``name`` (every cache when None) and the CUDA graphs captured on it, and hand
        the freed blocks back to the driver. The memory is free only once the caller holds no reference to the
        cache either: a benchmark that keeps one sees the next allocation's memory check refuse a batch that fits."""
        if name is None:
            self.caches.clear()
            self.graphs.clear()
        elif name in self.caches:
            cache = self.caches.pop(name)
            gone = {id(cache)} | {id(view) for view in cache.views.values()}   # graphs of its leading views too
            self.graphs = {k: g for k, g in self.graphs.items() if k[0] not in gone}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()



def alloc_cache(fm: FastModel, batch: int, capacity: int) -> StaticKVCache:
    """A new empty :class:`StaticKVCache` (capacity rounded up to 256 rows).

    Checks free GPU memory first and raises a clear ValueError instead of an allocator failure.
    """
    c = fm.config
    capacity = _round_up(capacity, 256)
    shape = (c.num_layers, batch, fm.local_kv_heads, capacity, c.head_dim)
    need = 2 * torch.Size(shape).numel() * torch.finfo(fm.dtype).bits // 8
    if fm.device.type == "cuda":
        check_cache_fits(need, batch, capacity, free_gpu_bytes(fm.device))
    k = torch.zeros(shape, dtype=fm.dtype, device=fm.device)
    v = torch.zeros(shape, dtype=fm.dtype, device=fm.device)
    return StaticKVCache(k, v, 0, torch.zeros(batch, dtype=torch.int32, device=fm.device))


def free_gpu_bytes(device: torch.device) -> int:
    """Bytes a new allocation on the CUDA ``device`` may use: the driver's free memory plus what PyTorch's caching
    allocator holds reserved but unused (freed tensors, e.g. a cache dropped with ``fm.caches.clear()``). The
    allocator hands those blocks back to the driver before it reports out of memory, so they count as free;
    ``torch.cuda.mem_get_info`` alone does not see them. (Free blocks of a live CUDA graph's private pool count too,
    though only that graph reuses them: the 10 % margin of :func:`check_cache_fits` is for such slack.)"""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def check_cache_fits(need: int, batch: int, capacity: int, free: int) -> None:
    """Raise one ValueError when a KV cache of ``need`` bytes (``batch`` rows x ``capacity`` positions)
    would not fit in 90% of ``free`` bytes, naming the largest batch that fits at this capacity --
    checked before anything is allocated."""
    if need <= free * 0.9:
        return
    per_row = need / max(batch, 1)
    fits = int(free * 0.9 // per_row)
    hint = (f"the largest batch that fits at this length is {fits}" if fits >= 1
            else "not even one row fits at this length: shorten the prompt or max_gen_len")
    raise ValueError(f"the KV cache for {capacity} positions x batch {batch} needs {need / 2**30:.2f} GiB but only "
                     f"{free / 2**30:.2f} GiB of GPU memory is free; {hint}")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _fuse(model: Model) -> dict[str, torch.Tensor]:
    """Canonical weights -> fused fast-path weights (copies; the source Model is untouched)."""
    c, w = model.config, model.weights
    out = {"embed": w["embed_tokens.weight"], "norm": w["norm.weight"], "lm_head": w["lm_head.weight"]}
    for i in range(c.num_layers):
        out.update(_fuse_layer(w, i))
    return out


def _fuse_layer(w: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Layer ``i``'s fused weights (``layers.i.wqkv`` ...) from the canonical ``w`` (q/k/v and gate/up concatenated)."""
    out: dict[str, torch.Tensor] = {}
    p = f"layers.{i}."
    a = p + "self_attn."
    out[p + "wqkv"] = torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]], dim=0)
    if a + "q_proj.bias" in w:
        out[p + "bqkv"] = torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]], dim=0)
    out[p + "wo"] = w[a + "o_proj.weight"]
    if a + "o_proj.bias" in w:
        out[p + "bo"] = w[a + "o_proj.bias"]
    out[p + "w13"] = torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]], dim=0)
    out[p + "w2"] = w[p + "mlp.down_proj.weight"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        if p + f"mlp.{name}.bias" in w:
            raise ValueError("MLP biases are not supported by the fast path")
    out[p + "attn_norm"] = w[p + "input_layernorm.weight"]
    out[p + "mlp_norm"] = w[p + "post_attention_layernorm.weight"]
    return out


def _load_sharded(path: str, dtype: torch.dtype, device: torch.device | str, tp: TensorParallel) -> FastModel:
    """Rank ``tp.rank``'s slice of a checkpoint as a FastModel, never holding the full model anywhere.

    Each checkpoint tensor is read (memory-mapped safetensors, or an mmap'd ``.bin``), cut to this rank's
    slice (:func:`specdec.fast.tp.shard_canonical`) and only that slice is converted and moved to ``device``;
    then the layers are fused one by one, each layer's canonical slices freed as soon as it is fused. Peak
    device memory: this rank's slices plus one fused layer."""
    from specdec.shared.config import load_config
    from specdec.shared.weights import load_weights

    config = load_config(path)
    _check_supported(config)
    check_divisible(config, tp.world)
    w = load_weights(path, config, dtype, device,
                     transform=lambda key, t: shard_canonical(key, t, config, tp).contiguous())
    if config.tie_word_embeddings:   # the output layer is the embedding's vocabulary slice
        w["lm_head.weight"] = shard_canonical("lm_head.weight", w["embed_tokens.weight"], config, tp).contiguous()
    fused = {"embed": w.pop("embed_tokens.weight"), "norm": w.pop("norm.weight"), "lm_head": w.pop("lm_head.weight")}
    for i in range(config.num_layers):
        fused.update(_fuse_layer(w, i))
        for key in [k for k in w if k.startswith(f"layers.{i}.")]:
            del w[key]
    return _new_fast_model(config, fused, path, tp)


def as_fast_model(obj, dtype=None, device=None, tp: TensorParallel | None = None) -> FastModel:
    """Accept a :class:`FastModel`, a reference :class:`Model`, or a ``transformers`` causal LM.

    ``tp``: keep only this rank's slice of every layer (:mod:`specdec.fast.tp`; a world of 1 is no TP).
    """
    if isinstance(obj, FastModel):
        if tp is not None and tp.world > 1 and obj.world != tp.world:
            raise ValueError(f"this FastModel is split over {obj.world} rank(s), not {tp.world}; build it from the "
                             "reference Model (or the checkpoint) with tp=")
        return obj
    if not isinstance(obj, Model):
        obj = model_from_hf(obj, dtype=dtype, device=device)
    if tp is not None and tp.world == 1:
        tp = None
    # A reference Model is converted once and the result kept on it, so repeated calls reuse the fused
    # weights, caches and captured CUDA graphs (a new weights dict means a new conversion).
    cached = obj.extras.get("fast_model")
    if cached is not None and cached[0] is obj.weights and cached[1].tp == tp:
        return cached[1]
    _check_supported(obj.config)
    fused = _fuse(obj)
    if tp is not None:
        fused = shard_weights(fused, obj.config, tp)
    fm = _new_fast_model(obj.config, fused, obj.source, tp)
    obj.extras["fast_model"] = (obj.weights, fm)
    return fm


def _check_supported(config: ModelConfig) -> None:
    if config.head_dim not in _kernels().SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the fast path supports head dims that are multiples of 16 in [16, 256]; this model has "
                         f"head_dim={config.head_dim} (use specdec.ref for it)")


def _new_fast_model(config: ModelConfig, fused: dict[str, torch.Tensor], source: str, tp: TensorParallel | None) -> FastModel:
    """A FastModel over fused weights, CUDA graphs on where they can run (``SPECDEC_NO_GRAPHS=1`` turns them off)."""
    fm = FastModel(config, fused, source=source, tp=tp)
    fm.use_graphs = fm.device.type == "cuda" and os.environ.get("SPECDEC_NO_GRAPHS", "0") != "1"
    return fm


def load_model(path, dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str | None = None,
               tp: TensorParallel | None = None) -> FastModel:
    """Load a local HF-format model directory (or ``"default"``) for the fast path.

    Defaults: bf16 on CUDA when available, fp32 on CPU (kernels under the Triton interpreter).
    ``tp`` (:func:`specdec.fast.tp.init_tensor_parallel`): the checkpoint is read tensor by tensor and
    only this rank's slice of each goes to ``device`` -- the full model is never held, on a GPU or on the host.
    """
    from specdec.shared.assets import resolve_model_path

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = resolve_dtype(dtype)
    if torch.device(device).type == "cpu" and dt != torch.float32:
        dt = torch.float32  # CPU matmuls in half precision are slow and not what the reference runs
    if tp is None or tp.world == 1:
        return as_fast_model(load_checkpoint(resolve_model_path(path), dtype=dt, device=device))
    return _load_sharded(resolve_model_path(path), dt, device, tp)


# ---------------------------------------------------------------------------------------------
# Forward passes
# ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same arithmetic as :func:`specdec.ref.model.rms_norm` (one Triton kernel on CUDA, torch on CPU:
    the norm of the unfused CPU prefill)."""
    if x.is_cuda:
        return _kernels().rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _cos_sin(fm: FastModel, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., D] at ``positions`` [...] (strided views of one gather from the cached table)."""
    if fm.rope_cs is None:
        return rope_cos_sin(fm.config, positions, dtype=fm.dtype)
    cs = fm.rope_cs[positions]  # [..., 2, D]
    return cs[..., 0, :], cs[..., 1, :]


# A layer on the fused path (``fused=True``: CUDA, or CPU under the Triton interpreter) of the
# PREFILL is
#
#   [add_rms_norm] -> wqkv GEMM (+bias) -> rope_qkv_write (q out; k, v into the cache) -> attention
#   -> wo GEMM (+bias) -> add_rms_norm -> w13 GEMM -> silu_mul -> w2 GEMM -> [add_rms_norm of the
#   next layer's input, or the final norm]
#
# i.e. the residual add is folded into the following norm: each layer takes the normed input ``h``
# and the residual stream ``x`` and returns the next (h, x). The unfused path (plain torch, used
# for CPU prefill where the interpreter would be slow) runs the same arithmetic op by op.
#
# The DECODE PHASE (every step after the prefill: a one-token step, a chain or tree verification,
# B >= 1 rows) is :func:`step_forward`, one arithmetic for every row whatever M, the batch or the
# method (docs/design.md §8): every projection is a row-invariant GEMM (:func:`.kernels.row_linear`,
# the RMSNorm before it or the residual add after it folded in) and attention is the
# position-aligned :func:`.kernels.decode_attention`, so a layer is
#
#   norm+wqkv -> rope_qkv_write -> decode_attention -> wo+add -> norm+w13+SwiGLU -> w2+add
#
# and the step ends with the final norm folded into the lm_head: no norm kernel at all.


def _rope_write(fm: FastModel, i: int, qkv: torch.Tensor, cos, sin, cache: StaticKVCache, rows: torch.Tensor, fused: bool,
                q_out: torch.Tensor | None = None) -> torch.Tensor:
    """Layer ``i``'s q [B, Hq, T, D] (rotated) from its qkv projection [B, T, (Hq + 2 Hkv) D]; writes
    k (rotated), v into ``cache`` rows ``rows`` [B, T] of layer i. With ``q_out`` (a [B, Hq, T, D] view, any
    strides) q is written there and returned."""
    c = fm.config
    if fused:
        return _kernels().rope_qkv_write(qkv, cos, sin, cache.k[i], cache.v[i], rows, check_rows=False, q_out=q_out)
    dkv = fm.local_kv_heads * c.head_dim     # this rank's heads (all of them without TP)
    dq = qkv.shape[-1] - 2 * dkv
    q, k, v = qkv.split([dq, dkv, dkv], dim=-1)
    q = rearrange(q, "b t (h d) -> b h t d", d=c.head_dim)
    k = rearrange(k, "b t (h d) -> b h t d", d=c.head_dim)
    v = rearrange(v, "b t (h d) -> b h t d", d=c.head_dim)
    k = apply_rope(k, cos, sin)  # cos/sin [B, T, D]
    for bi in range(qkv.shape[0]):  # cache[i, b, :, rows[b, j]] = k[b, :, j]
        cache.k[i, bi].index_copy_(1, rows[bi].long(), k[bi])
        cache.v[i, bi].index_copy_(1, rows[bi].long(), v[bi])
    q = apply_rope(q, cos, sin)
    return q if q_out is None else q_out.copy_(q)


def _project_qkv(fm: FastModel, i: int, h: torch.Tensor, cos, sin, cache: StaticKVCache, rows: torch.Tensor,
                 fused: bool, q_out: torch.Tensor | None = None) -> torch.Tensor:
    """A prefill's attention input for layer ``i``: the q|k|v projection of the normed input h [B, T, H] (+bias),
    RoPE, k/v written into ``cache`` rows ``rows`` [B, T]; returns q [B, Hq, T, D] (:func:`_rope_write`; into
    ``q_out`` when given)."""
    qkv = F.linear(h, fm.w[f"layers.{i}.wqkv"], fm.w.get(f"layers.{i}.bqkv"))
    return _rope_write(fm, i, qkv, cos, sin, cache, rows, fused, q_out)


def _finish_layer(fm: FastModel, i: int, x: torch.Tensor, attn: torch.Tensor, fused: bool,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual stream x [B, T, H] + attention output attn [B, Hq, T, D] through the rest of layer i.

    Returns ``(h, x)``: the new residual stream x and h = its norm for the next layer (the final
    norm after the last layer). With ``out = (h_out, x_out)`` (views of x's shape; ``x_out`` may be ``x``
    itself) the two are written there and returned, with no copy on CUDA.
    """
    c, w, p = fm.config, fm.w, f"layers.{i}."
    eps = c.rms_norm_eps
    next_norm = w[f"layers.{i + 1}.attn_norm"] if i + 1 < c.num_layers else w["norm"]
    o = _reduce(fm, F.linear(rearrange(attn, "b h t d -> b t (h d)"), w[p + "wo"], w.get(p + "bo")))
    if fused:
        kern = _kernels()
        h, x = kern.add_rms_norm(o, x, w[p + "mlp_norm"], eps)
        d = _reduce(fm, F.linear(kern.silu_mul(F.linear(h, w[p + "w13"])), w[p + "w2"]))
        h_out, x_out = (None, None) if out is None else out
        return kern.add_rms_norm(d, x, next_norm, eps, out=h_out, residual_out=x_out)
    x = x + o
    gate, up = F.linear(rms_norm(x, w[p + "mlp_norm"], eps), w[p + "w13"]).chunk(2, dim=-1)
    x = x + _reduce(fm, F.linear(F.silu(gate) * up, w[p + "w2"]))
    h = rms_norm(x, next_norm, eps)
    return (h, x) if out is None else (out[0].copy_(h), out[1].copy_(x))


def _reduce(fm: FastModel, partial: torch.Tensor) -> torch.Tensor:
    """A row-parallel projection's output: summed over the tensor-parallel ranks (as is without TP)."""
    return partial if fm.tp is None else fm.tp.all_reduce(partial)


def _gather_logits(fm: FastModel, logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from this rank's vocabulary slice (as is without TP)."""
    if fm.tp is None:
        return logits
    return fm.tp.all_gather_last(logits)[..., : fm.config.vocab_size]


def _first_norm(fm: FastModel, x: torch.Tensor, fused: bool) -> torch.Tensor:
    norm = _kernels().rms_norm if fused else rms_norm
    return norm(x, fm.w["layers.0.attn_norm"], fm.config.rms_norm_eps)


def _logits(fm: FastModel, h: torch.Tensor) -> torch.Tensor:
    """lm_head over the final-normed hidden states h (the norm is folded into the last layer)."""
    return _gather_logits(fm, F.linear(h, fm.w["lm_head"])).float()


def step_forward(fm: FastModel, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
                 prefix_len: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Score ``M`` new tokens against the cache: the body of every decode/verify step (graph-capturable).

    Args:
        tokens: [B, M] long.
        positions: [B, M] long RoPE positions (``prefix_len + depth`` for trees).
        tree_mask: [B, M, M] bool ancestor-or-self mask among the new tokens, nodes in topological
            order (a parent's index below its children's).
        prefix_len: [B] int32, rows already in the cache; the new K/V go to rows prefix_len + j.

    Returns logits [B, M, V] (fp32). Matches :func:`specdec.ref.model.forward_step` with the mask
    ``[all prefix | tree_mask]`` (what :func:`specdec.ref.engine.verify_tree` builds). Under tensor
    parallelism with ``gather=False``: this rank's vocabulary slice [B, M, V'] instead (for a caller that
    only needs the argmax: :meth:`specdec.fast.tp.TensorParallel.argmax`, no logits gathered).

    The decode-phase contract (docs/design.md §8): row (b, j)'s logits -- and the K/V it writes --
    are a function of its token, its position and the cache rows it may see, bit for bit, whatever
    M, the other rows or the caller. Per layer: norm+wqkv (:func:`.kernels.row_linear`),
    :func:`.kernels.rope_qkv_write`, :func:`.kernels.decode_attention`, wo+residual, norm+w13+SwiGLU,
    w2+residual; then norm+lm_head. Each of these is row-invariant by construction.
    """
    kern, c, w = _kernels(), fm.config, fm.w
    eps = c.rms_norm_eps
    b, m = tokens.shape
    max_prefix = cache.capacity - m   # under graph capture: size the attention splits for the whole cache
    if not (tokens.is_cuda and torch.cuda.is_current_stream_capturing()) and b:
        lo, max_prefix = (int(v) for v in torch.stack([prefix_len.min(), prefix_len.max()]).tolist())
        if lo < 0 or max_prefix + m > cache.capacity:
            raise ValueError(f"prefix_len must be in [0, capacity - M] = [0, {cache.capacity - m}]; got range [{lo}, {max_prefix}]")
    cos, sin = _cos_sin(fm, positions)
    rows = prefix_len.to(torch.int32)[:, None] + torch.arange(m, dtype=torch.int32, device=tokens.device)[None, :]  # [B, M]
    x = F.embedding(tokens, w["embed"])  # [B, M, H] the residual stream
    ancestors = kern.ancestor_table(tree_mask)   # once per step: every layer's attention reads it
    for i in range(c.num_layers):
        p = f"layers.{i}."
        qkv = kern.row_linear(x, w[p + "wqkv"], w.get(p + "bqkv"), norm_weight=w[p + "attn_norm"], eps=eps)
        q = kern.rope_qkv_write(qkv, cos, sin, cache.k[i], cache.v[i], rows, check_rows=False)
        attn = kern.decode_attention(q, cache.k[i], cache.v[i], prefix_len, tree_mask, ancestors=ancestors,
                                     max_prefix=max_prefix)
        attn = rearrange(attn, "b h t d -> b t (h d)")
        if fm.tp is None:
            x = kern.row_linear(attn, w[p + "wo"], w.get(p + "bo"), residual=x)
        else:   # row-parallel: sum the ranks' partial products, then the residual add
            x = x + fm.tp.all_reduce(kern.row_linear(attn, w[p + "wo"], w.get(p + "bo")))
        act = kern.row_linear(x, w[p + "w13"], norm_weight=w[p + "mlp_norm"], eps=eps, silu=True)
        if fm.tp is None:
            x = kern.row_linear(act, w[p + "w2"], residual=x)
        else:
            x = x + fm.tp.all_reduce(kern.row_linear(act, w[p + "w2"]))
    logits = kern.row_linear(x, w["lm_head"], norm_weight=w["norm"], eps=eps)
    return (_gather_logits(fm, logits) if gather else logits).float()


def _prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, contextlib.AbstractContextManager]:
    """How :func:`_prefill_attention` runs SDPA on q [B, Hq, n, D], k/v [B, Hkv, T, D]: ``(flash, backends)``.

    ``flash`` is True when PyTorch's flash kernel takes these tensors as they are -- grouped KV heads
    included (``enable_gqa``): CUDA, fp16/bf16, equal head dims <= 256, unit stride along D, and flash
    not switched off by the caller (``torch.backends.cuda.enable_flash_sdp`` or an enclosing
    ``sdpa_kernel``; checked by ``torch.backends.cuda.can_use_flash_attention`` outside any context set
    here). ``backends`` is then FLASH_ATTENTION alone, so the first chunk's square ``is_causal`` call
    cannot drift to another backend. Otherwise ``backends`` allows EFFICIENT_ATTENTION and MATH on CUDA
    (flash refused these inputs, or the caller switched it off), and is PyTorch's default choice elsewhere.

    Never cuDNN: it builds an execution plan for every new sequence length (about 1 s each on an H100,
    BENCHMARKS.md "GPU, session 3"), and a chunked prefill meets a new key length in every chunk.
    """
    if not q.is_cuda:
        return False, contextlib.nullcontext()
    gqa = q.shape[1] != k.shape[1]
    flash = q.dtype in (torch.float16, torch.bfloat16) and can_use_flash_attention(
        SDPAParams(q, k, v, None, 0.0, False, gqa))
    if flash:
        return True, sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return False, sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


PREFILL_ATTENTION_CHOICES = ("auto", "flash", "cudnn-blocks", "cudnn-prompt")
_CUDNN_UNUSABLE: set[tuple] = set()   # (device index, dtype, head dim) where "auto" saw cuDNN refuse the inputs


def prefill_attention_mode() -> str:
    """How CUDA fp16/bf16 prefills run their attention: ``SPECDEC_PREFILL_ATTENTION`` =

    * ``auto`` (default): on a Hopper-or-newer GPU with cuDNN, ``cudnn-prompt`` onto an empty cache and
      ``cudnn-blocks`` onto a cached prefix; ``flash`` elsewhere, and ``flash`` from then on for inputs cuDNN
      refuses (one warning). Measured on an H100 at 32k: 1.20 s TTFT layer-major, 1.28 s blocked, 1.59 s
      flash (BENCHMARKS "Long-context prefill", sessions 12 and 35);
    * ``flash``: chunk-major, one flash call per chunk, bottom-right causal;
    * ``cudnn-blocks``: chunk-major, :func:`_prefill_attention_blocks` on cuDNN, errors raised as they come;
    * ``cudnn-prompt``: layer-major (:func:`_prefill_by_layer`), one whole-prompt causal cuDNN call per layer
      when the cache is empty (``cudnn-blocks`` otherwise), errors raised as they come. It holds four
      [T, hidden] tensors more than the chunk-major paths (4 GiB at 128k for Llama-3-8B)."""
    mode = os.environ.get("SPECDEC_PREFILL_ATTENTION", "auto")
    if mode not in PREFILL_ATTENTION_CHOICES:
        raise ValueError(f"SPECDEC_PREFILL_ATTENTION must be one of {PREFILL_ATTENTION_CHOICES}, got {mode!r}")
    return mode


def _use_cudnn_blocks(q: torch.Tensor) -> bool:
    """Whether this CUDA fp16/bf16 chunk runs :func:`_prefill_attention_blocks` (:func:`prefill_attention_mode`)."""
    mode = prefill_attention_mode()
    if mode != "auto":
        return mode in ("cudnn-blocks", "cudnn-prompt")
    return _cudnn_auto_usable(q.device, q.dtype, q.shape[-1])


def _cudnn_auto_usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """``auto``'s rule for the cuDNN prefill paths: a Hopper-or-newer GPU, cuDNN present, and these inputs not
    refused before (:func:`_cudnn_auto_fallback`)."""
    return (torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device)[0] >= 9
            and (torch.device(device).index, dtype, head_dim) not in _CUDNN_UNUSABLE)


def _cudnn_auto_fallback(q: torch.Tensor, err: BaseException) -> bool:
    """After cuDNN raised ``err`` on q's inputs: under ``auto``, remember that it refuses q's (device, dtype, head
    dim), say so once (``auto`` uses flash for them from now on) and return True -- the caller falls back; under an
    explicit cuDNN mode return False -- the caller re-raises."""
    if prefill_attention_mode() != "auto":
        return False
    _CUDNN_UNUSABLE.add((q.device.index, q.dtype, q.shape[-1]))
    warnings.warn(f"prefill: cuDNN attention refused {q.dtype} head dim {q.shape[-1]} on {q.device} "
                  f"({str(err).splitlines()[0][:120]}); using flash attention for these from now on")
    return True


def power_of_two_blocks(length: int) -> list[tuple[int, int]]:
    """``[0, length)`` as consecutive ``(lo, hi)`` blocks whose sizes are the powers of two in ``length``'s
    binary digits, largest first (6144 -> [(0, 4096), (4096, 6144)]): over a whole chunked prefill the block
    sizes -- the shapes a kernel plans for -- are at most ``log2(length) + 1`` distinct values."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    blocks, lo = [], 0
    for bit in reversed(range(length.bit_length())):
        if length >> bit & 1:
            blocks.append((lo, lo + (1 << bit)))
            lo += 1 << bit
    return blocks


def _prefill_attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend) -> torch.Tensor:
    """:func:`_prefill_attention` (same shapes and meaning) as few fixed-shape calls merged by log-sum-exp.

    The chunk's n queries see (1) its own n keys ``[p0, T)`` -- a square block, plain causal (for a square
    block top-left and bottom-right alignment agree) -- and (2) every key of the prefix ``[0, p0)``, split
    into :func:`power_of_two_blocks`, each seen whole (no mask). ``attend(q, k, v, causal) -> (out, lse)``
    runs one block; each block is folded into one fp32 running result as soon as it is computed, by the
    Triton kernel :func:`~specdec.fast.kernels.merge_attention` (one launch per merge; the last one writes
    q's dtype), so beyond its inputs the call holds at most the fp32 running result, one block's output and
    one more output-sized tensor (the diagonal block's through the first merge, the result through the
    last) -- four bf16 outputs' worth -- whatever the number of blocks. Why: cuDNN's fused attention is ~1.6-2x faster
    than the flash kernel on Hopper but builds an execution plan per shape and aligns ``is_causal`` top-left
    when n < T; this way a prefill needs only ~log2(T) + 2 shapes, each planned once per process."""
    n, t = q.shape[2], k.shape[2]
    p0 = t - n
    out, lse = attend(q, k[:, :, p0:], v[:, :, p0:], True)
    if p0 == 0:
        return out
    blocks = power_of_two_blocks(p0)
    acc, acc_lse = out, lse                   # the diagonal block's result: the first running result
    del out, lse                              # (freed by the first merge, which writes a new result)
    for i, (lo, hi) in enumerate(blocks):
        block_out, block_lse = attend(q, k[:, :, lo:hi], v[:, :, lo:hi], False)
        # one Triton launch per merge, fp32 arithmetic: the last merge writes q's dtype, the first of several
        # a fresh fp32 running result, the ones between update it in place (the log-sum-exp always in place)
        if i == len(blocks) - 1:
            dst = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        elif i == 0:
            dst = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        else:
            dst = acc
        acc, acc_lse = _kernels().merge_attention(acc, acc_lse, block_out, block_lse, dst, acc_lse)
        del block_out
    return acc


def _try_cudnn_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """:func:`_prefill_attention_blocks` on cuDNN when :func:`_use_cudnn_blocks` says so, else None (the caller
    runs flash). Under ``auto`` a cuDNN refusal (RuntimeError) marks these inputs' (device, dtype, head dim)
    unusable with one warning and returns None; under an explicit ``cudnn-blocks`` it propagates."""
    if not _use_cudnn_blocks(q):
        return None
    try:
        return _prefill_attention_blocks(q, k, v, _cudnn_attend)
    except RuntimeError as err:                    # cuDNN has no kernel for these inputs
        if not _cudnn_auto_fallback(q, err):
            raise
        return None


def _cudnn_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of :func:`_prefill_attention_blocks` on cuDNN: ``(out [B, Hq, n, D], lse [B, Hq, n] fp32)``.
    Grouped KV heads are read as they are (query head h -> KV head h // (Hq / Hkv)); scale 1 / sqrt(D)."""
    b, h, n, d = q.shape
    r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=d ** -0.5)
    return r[0], r[1].reshape(b, h, -1)[..., :n].float()


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one prefill chunk whose n queries are the LAST n of the T positions in k/v.

    Shapes: q [B, Hq, n, D]; k, v [B, Hkv, T, D] with T = p0 + n (rows [0, p0): the cached prefix, rows
    [p0, T): the chunk itself, already written); Hq a multiple of Hkv, query head h reads KV head
    h // (Hq / Hkv) (GQA); scale 1 / sqrt(D). Returns [B, Hq, n, D].

    Query i sits at position p0 + i and sees keys [0, p0 + i]: the causal mask aligned to the bottom
    right of the [n, T] score matrix, ``tril(ones(n, T), diagonal=p0)`` (the reference's
    ``causal_mask(p0, n)``; with p0 = 0 it is plain ``is_causal``). It must match an explicit fp32
    softmax under that mask up to the kernel's rounding (tests/fast/test_prefill_attention.py).

    The mask is never a tensor here: SDPA gets ``torch.nn.attention.bias.causal_lower_right(n, T)``,
    which PyTorch routes by backend (:func:`_prefill_sdpa` picks the backends):

    * **CUDA, fp16/bf16 (the fast path):** the flash kernel, whose causal flag is bottom-right aligned
      when n < T, reads the KV heads in place (it maps query heads to KV heads itself) and skips the
      key tiles above the diagonal -- no mask, no KV copy, O(n) extra memory (output + log-sum-exp).
    * **CUDA otherwise** (fp32, or inputs flash refuses): in torch 2.11 the memory-efficient kernel does
      not take grouped KV heads, and the math kernel would materialise [B, Hq, n, T] fp32 scores (~17 GiB
      for a 2048-row chunk at 32k), so the KV heads are repeated for their query heads first (a
      transient [B, Hq, T, D] copy); the bias then runs as the memory-efficient kernel's built-in
      bottom-right mask, or as a materialised boolean mask if that kernel refuses the inputs too.
    * **CPU:** SDPA with the grouped heads as they are; the bias becomes ``is_causal`` when p0 = 0 and a
      boolean [n, T] mask otherwise (what the fp32 reference comparisons run).

    Where a repeat is needed it is per layer and chunk: it cannot be shared by a chunk's layers, since
    each layer has its own K/V and its chunk rows exist only once that layer has written them.

    By default on a Hopper-or-newer GPU (:func:`prefill_attention_mode`: ``auto``), CUDA fp16/bf16 runs
    :func:`_prefill_attention_blocks` on cuDNN instead -- the same attention within bf16 rounding, measured
    faster (docs/design.md §8); ``SPECDEC_PREFILL_ATTENTION=flash`` keeps the flash call above.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k and v must be 4-D [B, H, T, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, hq, n, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k and v must both be [B={b}, Hkv, T, D={d}] like q [B, Hq, n, D]; "
                         f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    hkv, t = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q's head count ({hq}) must be a multiple of k's ({hkv})")
    if not 1 <= n <= t:
        raise ValueError(f"q must hold 1 <= n <= T query rows, the last n of k's T = {t} positions; got n = {n}")
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _try_cudnn_blocks(q, k, v)
        if out is not None:
            return out
    bias = causal_lower_right(n, t)
    flash, backends = _prefill_sdpa(q, k, v)
    gqa = hq != hkv
    if gqa and q.is_cuda and not flash:
        k = k.repeat_interleave(hq // hkv, dim=1)  # query head h reads KV head h // (Hq / Hkv)
        v = v.repeat_interleave(hq // hkv, dim=1)
        gqa = False
    with backends:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)


PREFILL_CHUNK = 2048
"""The chunk-major prefill's default ``chunk_size``: its largest activation is one chunk's (0.3 GiB at Llama-3-8B)."""

PROMPT_PREFILL_MAX_TOKENS = 65536
"""``auto`` prefills prompts up to this length layer-major (:func:`_use_prompt_attention`), longer ones chunk-major:
the layer-major path holds four [T, hidden] tensors (2 GiB at 64k for Llama-3-8B, growing with T), and at 128k
it was no faster than the blocks (BENCHMARKS "Session 27")."""

PROMPT_PREFILL_CHUNK = 8192
"""The layer-major prefill's default ``chunk_size`` (the rows of each projection GEMM). That path holds four
[T, hidden] tensors anyway, so its chunk buys GEMM speed instead: at 32k on an H100, 1.20 s TTFT with 8192-row
chunks against 1.24 s with 2048 (BENCHMARKS "Session 35"), for ~0.6 GiB more transient memory at Llama-3-8B."""


def prefill(fm: FastModel, cache: StaticKVCache, tokens: torch.Tensor, chunk_size: int | None = None,
            all_logits: bool = False) -> torch.Tensor:
    """Append the prompt ``tokens`` [B, T] to the cache after its ``cache.length`` rows; return the last
    position's logits [B, V] fp32 (or every position's [B, T, V] with ``all_logits``).

    The prompt runs in chunks of ``chunk_size`` positions (None: :data:`PREFILL_CHUNK`, or
    :data:`PROMPT_PREFILL_CHUNK` on the layer-major path), so the largest activation is one chunk, never
    the whole prompt -- except on the layer-major path (:func:`_prefill_by_layer`, the default on Hopper,
    :func:`prefill_attention_mode`), which holds four [T, hidden] tensors to run each layer's
    attention as one whole-prompt call. For the chunk at positions [p0, p0 + n), each layer writes the chunk's K/V into
    cache rows [p0, p0 + n) and its queries attend to that layer's rows [0, p0 + n) -- the prefix
    already cached (by earlier chunks, or by an earlier call: a prompt may be prefilled in pieces) and the
    chunk itself -- through :func:`_prefill_attention` (causal, bottom-right aligned; on CUDA in
    fp16/bf16 the flash kernel with no mask tensor and no KV copy). On CUDA the layers run the fused
    kernels (as :func:`step_forward`); on CPU plain torch (the Triton interpreter would be slow).

    Must match :func:`specdec.ref.model.forward` over the whole sequence (in fp32 up to float rounding:
    chunking changes the order of operations only), and the chunking must not change the logits or the
    cache contents beyond rounding. Raises ValueError for tokens that are not [B, T >= 1], a
    ``chunk_size`` below 1, and a prompt that does not fit the cache.

    A batch (B > 1) is prefilled one row at a time, each row exactly as if it were alone: the prefill's
    GEMMs (cuBLAS) and attention choose their algorithms -- and so their rounding -- by the shapes they
    get, so rows prefilled together would get other bits than the same prompt prefilled alone, and a
    prompt's output would depend on its batch-mates (docs/design.md §11). One row's shapes never depend
    on the batch; the cost is B launches sequences instead of one.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [B, T] with T >= 1; got shape {tuple(tokens.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    b, t = tokens.shape
    start = cache.length
    if start + t > cache.capacity:
        raise ValueError(f"KV cache overflow: {start} + {t} prompt rows > capacity {cache.capacity}")
    if b > 1:
        outs = [_prefill_one(fm, cache.row(i), tokens[i:i + 1], chunk_size, all_logits) for i in range(b)]
        cache.set_length(start + t)
        return torch.cat(outs, dim=0)
    return _prefill_one(fm, cache, tokens, chunk_size, all_logits)


class _PromptAttentionRefused(Exception):
    """Raised out of :func:`_prefill_by_layer` under ``auto`` when cuDNN refuses the whole-prompt call."""


def _prefill_one(fm: FastModel, cache: StaticKVCache, tokens: torch.Tensor, chunk_size: int | None,
                 all_logits: bool) -> torch.Tensor:
    """One row's prefill: layer-major (:func:`_prefill_by_layer`) when :func:`_use_prompt_attention` says so,
    else chunk-major (:func:`_prefill_rows`). Under ``auto`` a cuDNN refusal of the layer-major attention marks
    those inputs unusable (one warning) and the row is prefilled chunk-major from the start: the cache's length
    is still 0, so its rows are simply written again."""
    if _use_prompt_attention(fm, cache, tokens.shape[1]):
        try:
            return _prefill_by_layer(fm, cache, tokens, chunk_size or PROMPT_PREFILL_CHUNK, all_logits,
                                     _guarded_prompt_attend)
        except _PromptAttentionRefused:
            pass
    return _prefill_rows(fm, cache, tokens, chunk_size or PREFILL_CHUNK, all_logits)


def _use_prompt_attention(fm: FastModel, cache: StaticKVCache, t: int) -> bool:
    """Whether a prefill of ``t`` tokens onto ``cache`` runs layer-major with whole-prompt cuDNN attention: CUDA,
    fp16/bf16, an empty cache, and ``SPECDEC_PREFILL_ATTENTION`` = ``cudnn-prompt``, or ``auto`` on a
    Hopper-or-newer GPU with cuDNN (:func:`prefill_attention_mode`) for a (device, dtype, head dim) cuDNN has not
    refused and a prompt of at most :data:`PROMPT_PREFILL_MAX_TOKENS`.

    The choice depends on nothing else -- not on the free memory -- so every decoder prefills a given prompt the
    same way and gets the same bits (the exactness contract: a speculative decoder, which holds more memory than
    vanilla, must see vanilla's prefill)."""
    if fm.device.type != "cuda" or fm.dtype not in (torch.float16, torch.bfloat16) or cache.length != 0:
        return False
    mode = prefill_attention_mode()
    if mode != "auto":
        return mode == "cudnn-prompt"
    return t <= PROMPT_PREFILL_MAX_TOKENS and _cudnn_auto_usable(fm.device, fm.dtype, fm.config.head_dim)


def _guarded_prompt_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`_cudnn_prompt_attend`; under ``auto`` a cuDNN refusal becomes :class:`_PromptAttentionRefused`
    (after :func:`_cudnn_auto_fallback`), under an explicit ``cudnn-prompt`` it propagates."""
    try:
        return _cudnn_prompt_attend(q, k, v)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:                    # cuDNN has no kernel for these inputs
        if not _cudnn_auto_fallback(q, err):
            raise
        raise _PromptAttentionRefused from err


PROMPT_ATTENTION_GRANULE = 1024
""":func:`_prefill_by_layer` pads the prompt's attention to a multiple of this many rows (capped by the cache), so
cuDNN plans one shape per 1024 prompt lengths instead of one per length (a plan build costs ~0.06 s, design §8)."""


def _cudnn_prompt_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whole-prompt causal attention on cuDNN: q [1, Hq, T, D], k/v [1, Hkv, T, D] (square, so cuDNN's top-left
    causal mask is the prompt's own); grouped KV heads read in place; returns [1, Hq, T, D]. No log-sum-exp is
    asked for (nothing merges this result), which lets cuDNN pick its inference kernel."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False,
                                                              scale=q.shape[-1] ** -0.5)[0]


def _prefill_by_layer(fm: FastModel, cache: StaticKVCache, tokens: torch.Tensor, chunk_size: int, all_logits: bool,
                      attend) -> torch.Tensor:
    """:func:`prefill` of one row [1, T] onto an EMPTY cache, layer by layer: each layer's attention is ONE
    causal call over the whole prompt, ``attend(q [1, Hq, Tp, D], k, v [1, Hkv, Tp, D]) -> [1, Hq, Tp, D]``
    (:func:`_cudnn_prompt_attend` on CUDA), instead of one call per chunk against the cache so far.

    Per layer: (1) chunk by chunk, the q|k|v projection of the layer's normed input ``h``, RoPE, k/v written to
    cache rows [s, s + n) and q into a whole-prompt buffer; (2) the attention of all Tp rows at once;
    (3) chunk by chunk, the rest of the layer (:func:`_finish_layer`), which writes the next layer's ``h`` and
    the residual stream ``x`` back in place. The GEMMs and norms see the same chunks as :func:`_prefill_rows`;
    only the attention's order differs (one call per layer, not chunks merged over blocks), so the result equals
    the chunk-major prefill -- and so :func:`specdec.ref.model.forward` -- up to rounding
    (tests/fast/test_prefill_attention.py).

    ``Tp`` = T rounded up to :data:`PROMPT_ATTENTION_GRANULE` (at most the cache's capacity): the extra query
    rows are zeros and the extra key/value rows -- cache rows [T, Tp), beyond the cache's length -- are zeroed
    first, so no stale or non-finite value can reach a real row (a causal row never weighs a later key, but
    0 * NaN would still be NaN); the extra outputs are dropped.

    Memory beyond the chunk-major prefill: h, x, q and the attention output for the whole prompt -- four
    [T, hidden] tensors (4 GiB at 128k for Llama-3-8B in bf16), the price of attention at whole-prompt speed."""
    c = fm.config
    t = tokens.shape[1]
    tp = min(_round_up(t, PROMPT_ATTENTION_GRANULE), cache.capacity)
    dev = tokens.device
    fused = tokens.is_cuda
    positions = torch.arange(t, device=dev)[None]
    rows = torch.arange(t, dtype=torch.int32, device=dev)[None]
    cos, sin = _cos_sin(fm, positions)
    x = F.embedding(tokens, fm.w["embed"])               # [1, T, H] the residual stream
    h = _first_norm(fm, x, fused)                        # [1, T, H] its norm: the next layer's input
    hq = c.num_heads // fm.world                         # this rank's query heads (all of them without TP)
    # q [1, Hq, Tp, D] stored token-major ([1, Tp, Hq, D] in memory): RoPE writes each chunk's rows in place, and
    # cuDNN returns the attention in q's layout, so each chunk of it is already wo's [n, Hq D] input (no copy)
    q_all = rearrange(torch.zeros(1, tp, hq, c.head_dim, device=dev, dtype=fm.dtype), "b t h d -> b h t d")
    chunks = [(s, min(s + chunk_size, t)) for s in range(0, t, chunk_size)]
    for i in range(c.num_layers):
        for s, e in chunks:                              # (1) projections, RoPE, k/v into the cache, q into q_all
            _project_qkv(fm, i, h[:, s:e], cos[:, s:e], sin[:, s:e], cache, rows[:, s:e], fused, q_out=q_all[:, :, s:e])
        if tp > t:                                       # the padding's keys and values: zeros, not stale rows
            cache.k[i, :, :, t:tp].zero_()
            cache.v[i, :, :, t:tp].zero_()
        attn = attend(q_all, cache.k[i, :, :, :tp], cache.v[i, :, :, :tp])   # (2) the whole prompt at once
        for s, e in chunks:                              # (3) the rest of the layer, in place into h and x
            _finish_layer(fm, i, x[:, s:e], attn[:, :, s:e], fused, out=(h[:, s:e], x[:, s:e]))
        del attn
    cache.set_length(t)
    if all_logits:
        return torch.cat([_logits(fm, h[:, s:e]) for s, e in chunks], dim=1)
    return _logits(fm, h[:, -1:])[:, 0]


def _prefill_rows(fm: FastModel, cache: StaticKVCache, tokens: torch.Tensor, chunk_size: int, all_logits: bool) -> torch.Tensor:
    """The chunked prefill of :func:`prefill` for the rows ``tokens`` [B, T] together (arguments checked there)."""
    b, t = tokens.shape
    start = cache.length
    fused = tokens.is_cuda
    h_last, outs = None, []
    for s in range(0, t, chunk_size):
        chunk = tokens[:, s : s + chunk_size]
        n = chunk.shape[1]
        p0 = start + s
        positions = torch.arange(p0, p0 + n, device=tokens.device)[None].expand(b, n)
        rows = torch.arange(p0, p0 + n, dtype=torch.int32, device=tokens.device)[None].expand(b, n)
        cos, sin = _cos_sin(fm, positions)
        x = F.embedding(chunk, fm.w["embed"])
        h = _first_norm(fm, x, fused)
        for i in range(fm.config.num_layers):
            q = _project_qkv(fm, i, h, cos, sin, cache, rows, fused)
            attn = _prefill_attention(q, cache.k[i, :, :, : p0 + n], cache.v[i, :, :, : p0 + n])
            h, x = _finish_layer(fm, i, x, attn, fused)
        h_last = h[:, -1:]
        if all_logits:
            outs.append(_logits(fm, h))
    cache.set_length(start + t)
    return torch.cat(outs, dim=1) if all_logits else _logits(fm, h_last)[:, 0]


def forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [B, T, V] (fp32) through a temporary cache (for tests)."""
    fm = as_fast_model(model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    cache = alloc_cache(fm, input_ids.shape[0], input_ids.shape[1])
    return prefill(fm, cache, input_ids.to(fm.device), all_logits=True)


class _Graph:
    """A CUDA graph of :func:`step_forward` for a fixed (B, M), with static input/output buffers."""

    def __init__(self, fm: FastModel, cache: StaticKVCache, b: int, m: int, gather: bool = True):
        dev = fm.device
        self.tokens = torch.zeros(b, m, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, m, dtype=torch.long, device=dev)
        self.mask = torch.ones(b, m, m, dtype=torch.bool, device=dev).tril_()
        self.prefix = cache.length_t
        # warm up twice on a side stream (compiles the kernels), then capture
        self.graph, self.logits = capture(
            lambda: step_forward(fm, cache, self.tokens, self.positions, self.mask, self.prefix, gather=gather),
            device=dev, warmup=2)

    def __call__(self, tokens, positions, mask) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.logits


def run_step(fm: FastModel, cache: StaticKVCache, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
             gather: bool = True) -> torch.Tensor:
    """One decode/verify step against ``cache`` (new rows from ``cache.length``); CUDA graph when possible.

    Does NOT advance ``cache.length``: the caller decides what to keep (see :func:`commit`).
    ``gather=False`` under tensor parallelism: this rank's vocabulary slice of the logits (see
    :func:`step_forward`), for a caller that reduces it with :meth:`specdec.fast.tp.TensorParallel.argmax`.
    """
    b, m = tokens.shape
    if m > MAX_TREE_NODES:
        raise ValueError(f"a step may score at most {MAX_TREE_NODES} tokens, got {m}")
    if cache.length + m > cache.capacity:
        raise ValueError(f"KV cache overflow: {cache.length} + {m} rows > capacity {cache.capacity}")
    if fm.use_graphs and fm.rope_table is not None:
        gather = gather or fm.tp is None       # one graph per (cache, B, M) without TP
        key = (id(cache), b, m) if gather else (id(cache), b, m, "local")
        g = fm.graphs.get(key)
        if g is None:
            g = fm.graphs[key] = _Graph(fm, cache, b, m, gather)
        return g(tokens, positions, tree_mask)
    return step_forward(fm, cache, tokens, positions, tree_mask, cache.length_t, gather=gather)


def commit(cache: StaticKVCache, path: torch.Tensor | None, n: int) -> None:
    """Keep ``n`` scored rows: the accepted path's rows move to ``[L, L + n)`` in every layer (one launch).

    ``path`` [B, n] holds node indices (0 = root) of the rows to keep; ``None`` keeps rows in place
    (a decode step or a fully accepted chain prefix).
    """
    L = cache.length
    if path is not None:
        src = (path + L).to(torch.int32)
        _kernels().compact_kv(cache.k, cache.v, src, L)
    cache.set_length(L + n)
