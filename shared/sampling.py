"""Sampling rules (pure functions, never mutate their inputs) and romsto-style processors.

The processed distribution used everywhere (target p and draft q alike) is::

    probs = softmax(top_p(top_k(logits / temperature)))

with top-k and top-p defined exactly as ``transformers``' ``TopKLogitsWarper`` and
``TopPLogitsWarper``. ``temperature == 0`` means greedy: argmax of the *raw* logits (the lowest
index wins ties, as ``torch.argmax``).

How a sample is drawn (:attr:`SamplingParams.sampling`): ``"rejection"`` (the default) draws with
``torch.multinomial`` from a ``torch.Generator`` and verifies drafts with the rejection rules of
:mod:`specdec.shared.acceptance`; ``"keyed"`` takes the token at absolute position t as the
Gumbel-max choice keyed by (seed, sequence, t) (:mod:`specdec.shared.keyed`), so every decoder
emits exactly vanilla's tokens for the same seed (docs/design.md §8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SamplingParams",
    "SAMPLING_MODES",
    "check_sampling_args",
    "check_sampling_mode",
    "check_seed",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "process_logits",
    "logits_to_probs",
    "sample_from_probs",
    "sample",
    "greedy",
    "stable_topk",
    "TIE_SLACK",
    "LogitsProcessor",
    "GreedyProcessor",
    "MultinomialProcessor",
    "TopKProcessor",
    "NucleusProcessor",
    "TopKNucleusProcessor",
]


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise TypeError / ValueError for bad sampling parameters: temperature finite and >= 0, top_k an
    int >= 0, top_p in (0, 1] (nan and inf rejected everywhere)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature):  # inf would sample uniformly, nan garbage
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
        raise TypeError(f"top_p must be a number, got {type(top_p).__name__}")
    if not 0.0 < top_p <= 1.0:  # also rejects nan
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


SAMPLING_MODES = ("rejection", "keyed")
"""The values of ``sampling``: ``"rejection"`` (multinomial draws + rejection-sampling verification, the
default) and ``"keyed"`` (position-keyed Gumbel-max sampling, :mod:`specdec.shared.keyed`)."""


def check_seed(seed) -> int:
    """``seed`` validated: a Python int (or a 0-d integer tensor) in [0, 2^63)."""
    if isinstance(seed, torch.Tensor) and seed.dim() == 0 and not seed.is_floating_point() and seed.dtype != torch.bool:
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def check_sampling_mode(sampling, seed) -> int | None:
    """Raise TypeError / ValueError for a bad ``sampling`` mode (one of :data:`SAMPLING_MODES`) or ``seed``
    (None, or an int in [0, 2^63)); returns the seed as a Python int (or None)."""
    if not isinstance(sampling, str):
        raise TypeError(f"sampling must be a str, one of {list(SAMPLING_MODES)}, got {type(sampling).__name__}")
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {list(SAMPLING_MODES)}, got {sampling!r}")
    return None if seed is None else check_seed(seed)


@dataclass(frozen=True)
class SamplingParams:
    """temperature (0 = greedy), top_k (0 = off), top_p (1 = off), how to sample and the seed.

    ``sampling``: ``"rejection"`` (default; today's multinomial draws from the ``generator`` and
    rejection-sampling verification) or ``"keyed"`` (position-keyed Gumbel-max: the same seed gives
    exactly vanilla decoding's tokens in every decoder). With temperature 0 both are plain greedy
    decoding (:attr:`keyed` is False). ``seed``: the key of keyed sampling (None: derived once per
    call, see :func:`specdec.shared.keyed.resolve_seed`); in rejection mode a given seed seeds a
    fresh generator for the call (:func:`specdec.shared.keyed.resolve_sampling`).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    sampling: str = "rejection"
    seed: int | None = None

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        object.__setattr__(self, "seed", check_sampling_mode(self.sampling, self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def keyed(self) -> bool:
        """Position-keyed sampling is on: ``sampling == "keyed"`` and temperature > 0 (keyed at
        temperature 0 is greedy decoding, exactly as ``"rejection"`` at temperature 0)."""
        return self.sampling == "keyed" and self.temperature > 0


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError("apply_temperature needs temperature > 0; temperature 0 is greedy (use greedy())")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (ties with the k-th kept), set the rest to -inf. 0 = off."""
    if top_k <= 0:
        return logits
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop the lowest-probability tokens whose total mass is <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """temperature -> top-k -> top-p, in fp32, returning new processed logits (input untouched)."""
    x = apply_temperature(logits.float(), temperature)
    return top_p_filter(top_k_filter(x, top_k), top_p)


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The processed distribution (fp32). For temperature 0: one-hot at the argmax of raw logits."""
    if temperature == 0:
        return torch.nn.functional.one_hot(greedy(logits), logits.shape[-1]).float()
    return torch.softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax of the raw logits over the last dim (lowest index wins ties)."""
    return torch.argmax(logits, dim=-1)


TIE_SLACK = 16
"""Extra candidates :func:`stable_topk` ranks beyond ``k`` before it checks for a tie at the cut."""


def stable_topk(scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The indices of the ``k`` largest entries of ``scores`` [N] (fewer if N < k), best first, in EXACTLY the
    order of a stable descending sort -- equal scores keep the lower index first, however many tie --
    without sorting all N (``torch.sort`` of a 128k vocabulary costs milliseconds on a CPU).

    How: the ``k + TIE_SLACK`` largest by ``torch.topk`` (which breaks ties arbitrarily), ordered by a
    stable sort over ascending index; if the k-th score also ends those candidates, entries tied with it
    may have been cut, so every entry is ranked instead (only with many exactly equal scores).
    ``candidates``: the indices of ``min(k + TIE_SLACK, N)`` largest entries, if the caller found them
    another way (in any order). ``scores`` must hold no NaN (callers map NaN to -inf)."""
    n = scores.shape[0]
    k = min(int(k), n)
    kk = min(k + TIE_SLACK, n)
    cand = torch.topk(scores, kk).indices if candidates is None else candidates
    cand = torch.sort(cand).values
    order = cand[torch.sort(-scores[cand], stable=True).indices[:k]]
    if kk < n and k > 0 and bool(scores[cand].min() == scores[order[-1]]):
        order = torch.sort(-scores, stable=True).indices[:k]
    return order


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` [..., V] -> [...] (long)."""
    flat = probs.reshape(-1, probs.shape[-1]).float()
    if generator is not None and generator.device != flat.device:
        # draw where the generator lives so a CPU generator can drive CUDA decoding reproducibly
        out = torch.multinomial(flat.to(generator.device), 1, generator=generator).squeeze(-1).to(probs.device)
    else:
        out = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return out.reshape(probs.shape[:-1])


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token(s) from ``logits`` [..., V]: greedy when temperature == 0, else a draw from the processed p."""
    if temperature == 0:
        return greedy(logits)
    return sample_from_probs(logits_to_probs(logits, temperature, top_k, top_p), generator)


# ---------------------------------------------------------------------------------------------
# romsto-style processors (romsto's Speculative-Decoding): __call__(logits) -> probs, .sample(probs) -> token [..., 1]
# ---------------------------------------------------------------------------------------------


class LogitsProcessor:
    """Base class: a sampling rule as an object, ``probs = proc(logits)``, ``tok = proc.sample(probs)``.

    Each processor exposes :attr:`params` (a :class:`SamplingParams`) so decoders apply exactly
    the same rule. Unlike the seed, processing never modifies ``logits`` in place.
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
        self.params = SamplingParams(temperature, top_k, top_p)

    @property
    def temperature(self) -> float:
        return self.params.temperature

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        return logits_to_probs(logits, p.temperature, p.top_k, p.top_p)

    def sample(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_from_probs(probs, generator).unsqueeze(-1)

    def __repr__(self) -> str:
        p = self.params
        return f"{type(self).__name__}(temperature={p.temperature}, top_k={p.top_k}, top_p={p.top_p})"


class GreedyProcessor(LogitsProcessor):
    """Argmax of the raw logits (``temperature`` is accepted for seed compatibility and ignored)."""

    def __init__(self, temperature: float = 1.0) -> None:
        check_sampling_args(temperature, 0, 1.0)
        self.params = SamplingParams(0.0, 0, 1.0)

    def sample(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.argmax(probs, dim=-1, keepdim=True)


class MultinomialProcessor(LogitsProcessor):
    """Plain sampling at ``temperature``."""

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"MultinomialProcessor needs temperature > 0, got {temperature}")
        super().__init__(temperature)


class TopKProcessor(MultinomialProcessor):
    def __init__(self, temperature: float = 1.0, top_k: int = 20) -> None:
        if top_k < 1:
            raise ValueError(f"TopKProcessor needs top_k >= 1, got {top_k}")
        LogitsProcessor.__init__(self, temperature, top_k=top_k)
        if not temperature > 0:
            raise ValueError(f"TopKProcessor needs temperature > 0, got {temperature}")


class NucleusProcessor(MultinomialProcessor):
    def __init__(self, temperature: float = 1.0, top_p: float = 0.9) -> None:
        LogitsProcessor.__init__(self, temperature, top_p=top_p)
        if not temperature > 0:
            raise ValueError(f"NucleusProcessor needs temperature > 0, got {temperature}")


class TopKNucleusProcessor(MultinomialProcessor):
    def __init__(self, temperature: float = 1.0, top_k: int = 20, top_p: float = 0.9) -> None:
        if top_k < 1:
            raise ValueError(f"TopKNucleusProcessor needs top_k >= 1, got {top_k}")
        LogitsProcessor.__init__(self, temperature, top_k=top_k, top_p=top_p)
        if not temperature > 0:
            raise ValueError(f"TopKNucleusProcessor needs temperature > 0, got {temperature}")
