"""The result every decoder returns (ref and fast alike).

``GenerationResult`` unpacks exactly like LongSpec's tuple::

    output_ids, count, num, elapsed_time, spec_mask = res

* ``output_ids`` [B, n] long: generated tokens only, cut after the first EOS and at max_gen_len;
* ``count``: accepted draft tokens (== ``spec_mask.sum()``);
* ``num``: target forward passes that produced output (the prefill counts as one);
* ``elapsed_time``: seconds of decoding, excluding the prefill;
* ``spec_mask`` [B, n] bool: True where the token is a draft token the target accepted.

Extra fields: ``prefill_time`` (time to first token), ``accept_lengths`` (tokens emitted by each
target pass, the prefill's 1 first), ``tree_shape`` (the GLIDE decoders: the beam shape the rounds
used -- what ``tree_shape="auto"`` / ``gamma="auto"`` chose; None for the other decoders), and
:attr:`tau` = tokens emitted / ``num``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

__all__ = ["GenerationResult", "finalize_output", "normalize_eos", "sync"]


@dataclass
class GenerationResult:
    output_ids: torch.Tensor
    count: int
    num: int
    elapsed_time: float
    spec_mask: torch.Tensor
    prefill_time: float = 0.0
    accept_lengths: list[int] = field(default_factory=list)
    tree_shape: tuple[int, ...] | None = None

    def __iter__(self):
        return iter((self.output_ids, self.count, self.num, self.elapsed_time, self.spec_mask))

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i):
        return (self.output_ids, self.count, self.num, self.elapsed_time, self.spec_mask)[i]

    @property
    def num_tokens(self) -> int:
        """Tokens emitted (first row)."""
        return int(self.output_ids.shape[-1])

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens emitted per target forward pass."""
        return self.num_tokens / self.num if self.num else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput excluding the prefill (tokens after the first / elapsed)."""
        return (self.num_tokens - 1) / self.elapsed_time if self.elapsed_time > 0 and self.num_tokens > 1 else 0.0

    def tolist(self) -> list[int]:
        return self.output_ids[0].tolist()

    @classmethod
    def from_rounds(cls, emitted: list[int], spec: list[bool], eos_ids, max_gen_len: int, num: int, elapsed: float,
                    prefill_time: float, accept_lengths: list[int]) -> "GenerationResult":
        """A speculative run (batch 1): cut the emitted tokens (:func:`finalize_output`) and count accepted drafts."""
        out, mask = finalize_output(emitted, spec, sorted(eos_ids), max_gen_len)
        out_t = torch.tensor([out], dtype=torch.long)
        mask_t = torch.tensor([mask], dtype=torch.bool)
        return cls(out_t, int(mask_t.sum()), num, elapsed, mask_t, prefill_time, accept_lengths)

    @classmethod
    def from_steps(cls, steps: list[torch.Tensor], eos_ids, max_gen_len: int, elapsed: float, prefill_time: float) -> "GenerationResult":
        """Plain decoding: ``steps`` are [B] token tensors, one per target pass. Each row is cut after its
        first EOS; finished rows are padded with that EOS to a rectangle."""
        seqs = torch.stack(steps, dim=1).tolist()
        rows = [finalize_output(s, [False] * len(s), eos_ids, max_gen_len)[0] for s in seqs]
        n = max(len(r) for r in rows)
        out = torch.tensor([r + [r[-1]] * (n - len(r)) for r in rows], dtype=torch.long)
        num = len(steps)
        return cls(out, 0, num, elapsed, torch.zeros_like(out, dtype=torch.bool), prefill_time, [1] * num)


def sync(device: torch.device) -> None:
    """Wait for the device (so wall-clock timings include the queued GPU work); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def normalize_eos(eos_id, default: list[int], vocab_size: int | None = None) -> list[int]:
    """eos_id: None -> the model's eos ids; an int or a list of ints -> those ([] = never stop).

    With ``vocab_size``, explicit ids must lie in ``[0, vocab_size)``: an id the model can never emit
    would silently never stop generation (use ``[]`` for that).
    """
    if eos_id is None:
        return list(default)
    if isinstance(eos_id, (bool, str, bytes)):
        raise TypeError(f"eos_id must be an int, a list of ints, or None, got {type(eos_id).__name__}")
    ids = None
    if isinstance(eos_id, int) or hasattr(eos_id, "__index__"):  # also numpy ints, 0-d int tensors
        try:
            ids = [operator.index(eos_id)]
        except TypeError:
            pass  # e.g. a 1-d tensor: iterate below
    if ids is None:
        try:
            ids = [operator.index(t) for t in eos_id]  # ints only: 1.5 or "2" must not be converted
        except TypeError:
            raise TypeError(f"eos_id must be an int, a list of ints, or None, got {type(eos_id).__name__}") from None
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"eos_id must be in [0, {vocab_size}) (the model's vocabulary), got {bad[0]}; "
                             "pass eos_id=[] to never stop, or None for the model's own EOS ids")
    return ids


def finalize_output(tokens: list[int], spec: list[bool], eos_ids: list[int], max_gen_len: int) -> tuple[list[int], list[bool]]:
    """Cut a generated token list at ``max_gen_len`` and right after the first EOS (first in *position*)."""
    tokens, spec = tokens[:max_gen_len], spec[:max_gen_len]
    eos = set(eos_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], spec[: i + 1]
    return tokens, spec
