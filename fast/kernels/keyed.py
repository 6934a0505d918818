"""Keyed Gumbel noise in one launch (issue 22): what :func:`specdec.shared.keyed.keyed_noise` computes with ~40
PyTorch operations over the vocabulary per row.

* :func:`keyed_noise` ``(key, positions [...] int, vocab_size, token_ids [N] | None) -> [..., V or N] float32``
  -- one program per (row, block of columns). For row r at absolute position ``t = positions[r]`` and token
  id ``i`` (column i, or ``token_ids[i]``), with ``H`` the 32-bit "lowbias32" finaliser
  (xor-shift-multiply, every operation mod 2^32)::

      p = H(t ^ key);   h = H(H(i ^ p) ^ (key ^ 0x9E3779B9))
      u = (h + 0.5) / 2^32            (float64, in (0, 1))
      noise = float32(-log(-log(u)))  (float64 logarithms)

  ``key``: the sequence's :func:`specdec.shared.keyed.sequence_key`, a Python int in [0, 2^32) or a 0-d integer
  tensor on the device (read by the kernel: graph-capturable). Positions and token ids enter through their low
  32 bits, as the reference's masks do.

Must match :func:`specdec.shared.keyed.keyed_noise` bit for bit (``tests/fast/test_keyed_kernel.py``: the
integer hash always; the float64 logarithms are the device's libm -- the same one torch uses on CUDA). Not yet
wired into the decoders: that waits for its GPU test, memcheck run and a measurement (BENCHMARKS "Keyed vs
rejection sampling": the keyed choice costs more than the embedded model's step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_int_tensor

__all__ = ["keyed_noise"]

_MASK32 = 0xFFFFFFFF
_SALT = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
BLOCK_V = 1024


@triton.jit
def _hash32(x, m1, m2):
    """lowbias32 on uint32 lanes (multiplications wrap mod 2^32)."""
    x = x ^ (x >> 16)
    x = x * m1
    x = x ^ (x >> 15)
    x = x * m2
    return x ^ (x >> 16)


@triton.jit
def _keyed_noise_kernel(key_ptr, pos_ptr, tok_ptr, out_ptr, n_cols, m1_arg, m2_arg, salt_arg,
                        HAS_TOK: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    m1 = m1_arg.to(tl.uint32)
    m2 = m2_arg.to(tl.uint32)
    key = tl.load(key_ptr).to(tl.uint32)
    pos = tl.load(pos_ptr + row).to(tl.uint32)
    p = _hash32(pos ^ key, m1, m2)
    if HAS_TOK:
        tok = tl.load(tok_ptr + cols, mask=inside, other=0).to(tl.uint32)
    else:
        tok = cols.to(tl.uint32)
    h = _hash32(_hash32(tok ^ p, m1, m2) ^ (key ^ salt_arg.to(tl.uint32)), m1, m2)
    u = (h.to(tl.float64) + 0.5) / 4294967296.0
    noise = -tl.log(-tl.log(u))
    tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, noise.to(tl.float32), mask=inside)


def keyed_noise(key: int | torch.Tensor, positions: torch.Tensor, vocab_size: int,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Standard Gumbel noise ``[..., V]`` (or ``[..., N]`` with ``token_ids`` [N]) float32 on ``positions``'
    device: :func:`specdec.shared.keyed.keyed_noise` in one launch (module docstring)."""
    check_int_tensor("positions", positions, tuple(positions.shape) if isinstance(positions, torch.Tensor) else ())
    dev = check_device(("positions", positions))
    if isinstance(key, torch.Tensor):
        if key.dim() != 0 or key.is_floating_point() or key.dtype == torch.bool or key.device != dev:
            raise TypeError(f"key must be an int or a 0-d integer tensor on {dev}, got {key.dtype} "
                            f"{tuple(key.shape)} on {key.device}")
        key_t = (key.long() & _MASK32).reshape(1)
    elif isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _MASK32:
        raise TypeError(f"key must be an int in [0, 2**32) (sequence_key) or a 0-d integer tensor, got {key!r}")
    else:
        key_t = torch.tensor([key], dtype=torch.int64, device=dev)
    if token_ids is not None:
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.dim() != 1:
            raise TypeError(f"token_ids must be a 1-D integer tensor, got {getattr(token_ids, 'dtype', type(token_ids).__name__)}")
        tok = token_ids.to(dev, torch.int64).contiguous()
        n_cols = tok.numel()
    else:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        tok, n_cols = key_t, vocab_size             # unused pointer
    pos = positions.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(pos.numel(), n_cols, dtype=torch.float32, device=dev)
    if pos.numel() and n_cols:
        grid = (pos.numel(), triton.cdiv(n_cols, BLOCK_V))
        _keyed_noise_kernel[grid](key_t, pos, tok, out, n_cols, _M1, _M2, _SALT,
                                  HAS_TOK=token_ids is not None, BLOCK=BLOCK_V)
    return out.reshape(*positions.shape, n_cols)
