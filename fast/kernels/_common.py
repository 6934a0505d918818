"""Helpers shared by the Triton kernels: interpreter detection, input checks, launch heuristics.

Nothing here launches a kernel. The checks run in Python before every launch so that a bad
argument raises ``TypeError``/``ValueError`` naming the problem instead of reaching the GPU as an
illegal memory access.

Running on CPU: Triton kernels run there only under the Triton interpreter, which is chosen when
the ``@triton.jit`` functions are *defined*, i.e. ``TRITON_INTERPRET=1`` must be in the environment
before ``specdec.fast.kernels`` is first imported.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "interpreter_active",
    "check_tensor",
    "check_device",
    "check_int_tensor",
    "graph_capturing",
    "sm_count",
    "next_pow2",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = tuple(range(16, 257, 16))
"""Head dims the kernels take: every multiple of 16 up to 256 (tiles padded to the next power of two)."""


def interpreter_active() -> bool:
    """True when our ``@triton.jit`` kernels were built for the Triton interpreter (CPU tensors).

    This is decided once, when :mod:`specdec.fast.kernels` is imported: set ``TRITON_INTERPRET=1``
    before that import to run the kernels on CPU.
    """
    from .tree_attention import _split_attention_kernel  # local import: avoid a cycle

    return type(_split_attention_kernel).__name__ == "InterpretedFunction"


def make_interpreter_dot_row_invariant() -> bool:
    """Under the Triton interpreter, compute ``tl.dot`` one output row at a time; True if installed.

    The interpreter runs ``tl.dot`` as one ``numpy.matmul`` of the whole tile, i.e. the BLAS library's
    GEMM, whose micro-kernel may compute a tile's rows by different instruction sequences (seen with
    OpenBLAS 0.3.31 on an AMD EPYC: rows 6-15 of a 16-row product differ in the last bit from the same rows
    computed first). On the GPU an MMA gives every row the same arithmetic wherever it sits in the tile,
    which is what the decode phase's row invariance rests on (docs/design.md §8); for the CPU tests to check
    that property, a row's product here must not depend on its place in the tile either. So each row is
    multiplied alone -- the same [1, K] x [K, N] call for every row -- and the rows stacked. Only the
    interpreter changes (a test tool, slow anyway); GPU kernels are untouched. Idempotent."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_row_invariant", False):
        return True
    tile_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = a.data, b.data
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8 or a_data.ndim < 2:
            return tile_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        rows = [np.matmul(a_data[..., i:i + 1, :], b_data, dtype=d.data.dtype) for i in range(a_data.shape[-2])]
        return interpreter.TensorHandle(np.concatenate(rows, axis=-2) + d.data, d.dtype.scalar)

    create_dot._row_invariant = True
    builder.create_dot = create_dot
    return True


def check_tensor(name: str, t, ndim: int) -> None:
    """``t`` is a tensor of rank ``ndim`` with a supported floating dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")


def check_device(*named: tuple[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and that device can run our kernels.

    CUDA tensors need a real GPU run (not the interpreter); CPU tensors need the interpreter.
    """
    dev = named[0][1].device
    for name, t in named[1:]:
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {named[0][0]} is on {dev}; put all inputs on one device")
    interp = interpreter_active()
    if dev.type == "cpu" and not interp:
        raise ValueError(
            "the Triton kernels got CPU tensors but are not running under the Triton interpreter: "
            "move the tensors to CUDA, or set TRITON_INTERPRET=1 before importing specdec.fast.kernels"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {dev}; use CUDA (or CPU with TRITON_INTERPRET=1)")
    if dev.type == "cuda" and interp:
        raise ValueError("specdec.fast.kernels was imported with TRITON_INTERPRET=1; pass CPU tensors or unset it")
    return dev


def check_int_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """``t`` is an integer tensor of exactly ``shape``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def graph_capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured: then value checks (host syncs) are skipped."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=None)
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small stand-in (4) under the interpreter."""
    if device.type != "cuda":
        return 4
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def masked_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         sm_scale: float | None = None) -> torch.Tensor:
    """Test oracle: plain softmax attention with an explicit boolean mask, GQA aware, in fp32.

    q [B, Hq, M, D], k/v [B, Hkv, N, D], mask [B, M, N] or [M, N] (True = attend) -> [B, Hq, M, D]
    in q's dtype. A row that sees no key is zero. The kernels' ``*_ref`` functions build their mask
    by brute force and call this; it computes what :func:`specdec.ref.attention.masked_attention`
    computes (the fast path keeps its own oracle so that it never imports the reference).
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    kf = k.float().repeat_interleave(hq // hkv, dim=1)
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    scores = torch.einsum("bhmd,bhnd->bhmn", q.float(), kf) * scale
    visible = mask.to(q.device).bool()
    visible = visible[None, None] if visible.dim() == 2 else visible[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    vf = vf.masked_fill(~visible.any(dim=-2)[..., None], 0.0)  # keys no query sees: no NaN/inf leaks in as 0 * v
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key: all -inf -> zeros
    return torch.einsum("bhmn,bhnd->bhmd", probs, vf).to(q.dtype)
