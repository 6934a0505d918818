"""Position-keyed sampling: the token at a position is a function of the logits and a key, never of
how many random numbers were drawn before (docs/design.md §8).

Gumbel-max sampling: with ``g_i`` independent standard Gumbel noise,

    argmax_i ( process_logits(logits)_i + g_i )

is an exact sample from ``softmax(process_logits(logits))`` -- the processed distribution of
:mod:`specdec.shared.sampling` (temperature, then top-k, then top-p; filtered tokens are ``-inf``
and can never win). Here ``g`` comes from a counter-based hash of ``(seed, sequence id, absolute
position, token id)``, so the choice at position ``t`` is the same whichever decoder asks for it:
vanilla decoding, a speculative verification that scores position ``t`` among many, or a drafter
that guesses it. Verifying drafts is then *greedy on the perturbed target logits*: a draft token is
accepted iff it equals the target's keyed choice at its position, and the output equals vanilla
keyed sampling with the same seed by construction.

The hash is 32-bit integer arithmetic carried in int64 tensors (every intermediate stays below
2^63, so it is exact and identical on every device); the uniform is ``(h + 0.5) / 2^32`` and the
noise ``-log(-log(u))`` in float64, rounded once to float32. Ties in the argmax go to the lowest
index (``torch.argmax``).
"""

from __future__ import annotations

import torch

from specdec.shared.sampling import process_logits

__all__ = ["check_seed", "gumbel_noise", "keyed_choice", "perturbed_logits"]

_MASK32 = 0xFFFFFFFF


def check_seed(seed) -> int:
    """``seed`` validated: a Python int (or a 0-d integer tensor) in [0, 2^63)."""
    if isinstance(seed, torch.Tensor) and seed.dim() == 0 and not seed.is_floating_point() and seed.dtype != torch.bool:
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for x in [0, 2^32) without leaving int64's exact range: the constant is
    split in 16-bit halves so no product exceeds 2^48."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply, "lowbias32"): every input bit affects every output bit."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key32(seed: int, seq_id: int) -> int:
    """The (seed, sequence id) part of the key, folded to 32 bits on the host."""
    k = torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32, seq_id & _MASK32, (seq_id >> 32) & _MASK32], dtype=torch.int64)
    h = torch.zeros((), dtype=torch.int64)
    for part in k:
        h = _hash32(h ^ part)
    return int(h)


def gumbel_noise(seed: int, seq_id: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise ``[..., V]`` (float32) for the absolute ``positions`` [...] (int tensor)
    of sequence ``seq_id`` under ``seed``, on ``positions``' device. A function of its arguments only."""
    seed = check_seed(seed)
    if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
        raise ValueError(f"seq_id must be an int >= 0, got {seq_id!r}")
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point():
        raise TypeError("positions must be an integer tensor")
    dev = positions.device
    base = _key32(seed, seq_id)
    pos = _hash32(positions.long() ^ base)                                  # [...]
    tok = torch.arange(vocab_size, device=dev, dtype=torch.int64)          # [V]
    h = _hash32(_hash32(tok ^ pos[..., None]) ^ (base ^ 0x9E3779B9))        # [..., V]
    u = (h.double() + 0.5) / 2.0**32                                       # (0, 1), never 0 or 1
    return (-torch.log(-torch.log(u))).float()


def perturbed_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, seq_id: int,
                     positions: torch.Tensor) -> torch.Tensor:
    """``process_logits(logits) + g`` [..., V] (fp32): filtered tokens stay ``-inf``. ``logits`` [..., V]
    are the scores FOR the tokens at ``positions`` [...] (the row that predicts position t is keyed by t)."""
    if temperature <= 0:
        raise ValueError(f"keyed sampling needs temperature > 0 (temperature 0 is greedy), got {temperature}")
    proc = process_logits(logits.float(), temperature, top_k, top_p)
    return proc + gumbel_noise(seed, seq_id, positions.to(logits.device), logits.shape[-1])


def keyed_choice(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, seq_id: int,
                 positions: torch.Tensor) -> torch.Tensor:
    """The keyed sample [...] (long) of each row of ``logits`` [..., V] for the token at ``positions`` [...].
    ``temperature == 0`` is greedy (the argmax of the raw logits); ties go to the lowest index."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    return torch.argmax(perturbed_logits(logits, temperature, top_k, top_p, seed, seq_id, positions), dim=-1)
