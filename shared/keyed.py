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

The decoders (``sampling="keyed"``, :class:`specdec.shared.sampling.SamplingParams`) use it like this:

* the key is resolved once per call (:func:`resolve_seed`): an explicit ``seed``, else the
  generator's ``initial_seed()``, else one draw from torch's global RNG;
* vanilla decoding takes the token at position t of batch row b as :func:`keyed_choice` with
  ``seq_id=b``, ``positions=t`` (:func:`sample_next`); every decoder numbers the rows of a batch the
  same way (row b is sequence b; the reference engine also takes explicit ``seq_ids``), so a row's
  output depends on its prompt, the seed and its sequence id only, never on its batch-mates;
* verification perturbs the target's row of node u with position ``L + depth(u) + 1`` and applies
  the greedy rule (:func:`specdec.shared.round.accept_draft`);
* drafters that have logits of their own (draft model, MagicDec, the GLIDE beam of both paths)
  propose the keyed choice of their own logits at the same positions, so they guess right whenever
  their processed distribution ranks like the target's under the same noise. A drafter running
  inside a captured CUDA graph carries the key (:func:`sequence_key`) and the positions in device
  tensors (:func:`keyed_noise`, :func:`keyed_logprobs`), so the graph serves every seed.
"""

from __future__ import annotations

import torch

from dataclasses import replace

from specdec.shared.sampling import SamplingParams, check_seed, process_logits, sample

__all__ = ["check_seed", "gumbel_noise", "keyed_choice", "keyed_logprobs", "keyed_noise", "perturbed_logits",
           "perturbed_logprobs", "resolve_seed", "resolve_sampling", "sample_next", "sequence_key"]

_MASK32 = 0xFFFFFFFF


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


def _hash32_int(x: int) -> int:
    """:func:`_hash32` on one Python int (host arithmetic, the same bits; no tensor launches)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _key32(seed: int, seq_id: int) -> int:
    """The (seed, sequence id) part of the key, folded to 32 bits on the host."""
    h = 0
    for part in (seed & _MASK32, (seed >> 32) & _MASK32, seq_id & _MASK32, (seq_id >> 32) & _MASK32):
        h = _hash32_int(h ^ part)
    return h


def sequence_key(seed: int, seq_id: int) -> int:
    """The 32-bit key of sequence ``seq_id`` under ``seed`` (validated): with a position and a token id it
    is all :func:`keyed_noise` hashes. A device-side decoder may carry it in a tensor (:func:`keyed_noise`
    accepts either), so a captured CUDA graph can be replayed for another seed."""
    seed = check_seed(seed)
    if isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
        raise ValueError(f"seq_id must be an int >= 0, got {seq_id!r}")
    return _key32(seed, seq_id)


def keyed_noise(key: int | torch.Tensor, positions: torch.Tensor, vocab_size: int,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Standard Gumbel noise ``[..., V]`` (float32) for the absolute ``positions`` [...] (int tensor) of the
    sequence whose :func:`sequence_key` is ``key`` -- a Python int, or a 0-d integer tensor on ``positions``'
    device holding it (then nothing here reads a value on the host: graph-capturable). A function of its
    arguments only; :func:`gumbel_noise` is ``keyed_noise(sequence_key(seed, seq_id), positions, V)``.

    ``token_ids`` [N] (integer tensor on ``positions``' device; ``vocab_size`` is then ignored): the noise of
    those token ids only, ``[..., N]`` -- bit for bit ``keyed_noise(key, positions, V)[..., token_ids]``
    (a truncated draft vocabulary's noise, docs/design.md §12)."""
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point():
        raise TypeError("positions must be an integer tensor")
    if isinstance(key, torch.Tensor):
        if key.dim() != 0 or key.is_floating_point() or key.dtype == torch.bool or key.device != positions.device:
            raise TypeError(f"key must be an int or a 0-d integer tensor on {positions.device}, got {key.dtype} "
                            f"{tuple(key.shape)} on {key.device}")
        key = key.long() & _MASK32
    elif isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _MASK32:
        raise TypeError(f"key must be an int in [0, 2**32) (sequence_key) or a 0-d integer tensor, got {key!r}")
    dev = positions.device
    pos = _hash32(positions.long() ^ key)                                   # [...]
    if token_ids is None:
        tok = torch.arange(vocab_size, device=dev, dtype=torch.int64)      # [V]
    else:
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.dim() != 1:
            raise TypeError(f"token_ids must be a 1-D integer tensor, got {getattr(token_ids, 'dtype', type(token_ids).__name__)}")
        tok = token_ids.to(dev, torch.int64)                               # [N]
    h = _hash32(_hash32(tok ^ pos[..., None]) ^ (key ^ 0x9E3779B9))         # [..., V]
    u = (h.double() + 0.5) / 2.0**32                                       # (0, 1), never 0 or 1
    return (-torch.log(-torch.log(u))).float()


def gumbel_noise(seed: int, seq_id: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise ``[..., V]`` (float32) for the absolute ``positions`` [...] (int tensor)
    of sequence ``seq_id`` under ``seed``, on ``positions``' device. A function of its arguments only."""
    key = sequence_key(seed, seq_id)
    return keyed_noise(key, positions, vocab_size)


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


def perturbed_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int, seq_id: int,
                       positions: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``log_softmax(process_logits(logits)) + g`` [..., V] (fp32): a drafter's processed log-probabilities
    plus the keyed noise of ``positions`` [...]. Its argmax is :func:`keyed_choice` (up to fp32 round-off of
    the shift); a beam ranked by cumulative sums of it is the GLIDE keyed beam (ref/glide.py).
    ``token_ids`` [N]: column i of ``logits`` [..., N] scores target token ``token_ids[i]`` (a truncated
    draft vocabulary) and gets that token's noise (:func:`keyed_noise`)."""
    return keyed_logprobs(logits, temperature, top_k, top_p, sequence_key(seed, seq_id), positions, token_ids=token_ids)


def keyed_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, key: int | torch.Tensor,
                   positions: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`perturbed_logprobs` with the sequence's :func:`sequence_key` given instead of (seed, seq_id):
    an int, or a 0-d integer tensor on the logits' device (graph-capturable: no host reads, see
    :func:`keyed_noise`). The same arithmetic, so the same bits. ``token_ids`` as in :func:`perturbed_logprobs`."""
    if temperature <= 0:
        raise ValueError(f"keyed sampling needs temperature > 0 (temperature 0 is greedy), got {temperature}")
    if token_ids is not None and token_ids.numel() != logits.shape[-1]:
        raise ValueError(f"token_ids holds {token_ids.numel()} ids for logits over {logits.shape[-1]} tokens")
    logp = torch.log_softmax(process_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    return logp + keyed_noise(key, positions.to(logits.device), logits.shape[-1], token_ids=token_ids)


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The key of one keyed decoding call: ``seed`` when given (validated); else the generator's
    ``initial_seed()`` (folded into [0, 2^63)); else ONE draw from torch's global RNG, so
    ``torch.manual_seed(n)`` makes the call reproducible.

    The generator's *initial* seed does not change as the generator is used: passing the same
    generator to several keyed calls gives the same key (the same output) each time. Pass
    ``seed=`` explicitly to vary it.
    """
    if seed is not None:
        return check_seed(seed)
    if generator is not None:
        return int(generator.initial_seed()) & (2**63 - 1)
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def resolve_sampling(params: SamplingParams, generator: torch.Generator | None,
                     device: torch.device | str | None = None) -> tuple[SamplingParams, torch.Generator | None]:
    """Once per decoding call, before anything is drawn: the parameters and generator the call uses.

    * keyed (``params.keyed``): ``params`` with the resolved seed (:func:`resolve_seed`); the
      generator is returned unchanged and never drawn from.
    * rejection with temperature > 0 and an explicit ``seed``: a fresh generator on ``device``
      seeded with it (the seed wins over ``generator``), so ``seed=`` is reproducible in both modes.
    * otherwise (greedy, or no seed): exactly what was passed -- nothing is drawn, nothing changes.
    """
    if params.keyed:
        return replace(params, seed=resolve_seed(params.seed, generator)), generator
    if params.seed is not None and not params.greedy:
        return params, torch.Generator(device=device if device is not None else "cpu").manual_seed(params.seed)
    return params, generator


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, position,
                seq_ids=None) -> torch.Tensor:
    """The next token from ``logits`` [B, V] -> [B], or [V] (one sequence) -> 0-d: the keyed choice when
    ``params.keyed`` (``params.seed`` resolved), else :func:`specdec.shared.sampling.sample` with
    ``generator`` (greedy at temperature 0).

    Keyed: row b is sequence ``seq_ids[b]`` (default: b; a [V] row is sequence ``seq_ids[0]``, default 0)
    and its token sits at absolute ``position`` -- an int for every row, or one int per row (a batch of
    prompts of different lengths)."""
    if not params.keyed:
        return sample(logits, params.temperature, params.top_k, params.top_p, generator)
    if params.seed is None:
        raise ValueError("keyed sampling needs a resolved seed (resolve_sampling first)")
    p = params
    rows = logits.reshape(-1, logits.shape[-1])
    n = rows.shape[0]
    ids = list(range(n)) if seq_ids is None else [int(s) for s in seq_ids]
    where = [int(position)] * n if isinstance(position, int) or not hasattr(position, "__len__") else [int(t) for t in position]
    if len(ids) != n or len(where) != n:
        raise ValueError(f"sample_next: {n} rows need {n} seq_ids and positions, got {len(ids)} and {len(where)}")
    out = torch.stack([keyed_choice(row, p.temperature, p.top_k, p.top_p, p.seed, sid,
                                    torch.tensor(t, dtype=torch.long, device=logits.device))
                       for row, sid, t in zip(rows, ids, where)])
    return out.reshape(logits.shape[:-1])
