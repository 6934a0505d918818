"""The result every decoder returns (ref and fast alike).

``GenerationResult`` unpacks exactly like LongSpec's tuple::

    output_ids, count, num, elapsed_time, spec_mask = res

* ``output_ids`` [B, n] long: generated tokens only, each row cut after its first EOS and at
  max_gen_len. Rows shorter than the longest are right-padded with their own last token, which is
  their EOS (a row stops early only at an EOS), so the pad id of row b is the EOS it emitted;
  ``row_lengths[b]`` is its real length;
* ``count``: accepted draft tokens over all rows (== ``spec_mask.sum()``);
* ``num``: target forward passes that produced output (the prefill counts as one); with B > 1 a
  pass verifies every unfinished row at once and counts once;
* ``elapsed_time``: seconds of decoding, excluding the prefill;
* ``spec_mask`` [B, n] bool: True where the token is a draft token the target accepted (False on
  padding).

Extra fields: ``prefill_time`` (time to first token), ``accept_lengths`` (tokens emitted by each
target pass, the prefill's 1 first; with B > 1 summed over the rows the pass served), ``tree_shape``
(the GLIDE decoders: the beam shape the rounds used -- what ``tree_shape="auto"`` / ``gamma="auto"``
chose; None for the other decoders), ``draft_tree_capacity`` (LogitSpec: the capacity that ran -- what
``draft_tree_capacity="auto"`` chose; None for the other decoders), and :attr:`tau` = tokens emitted / target passes per row.

Per row b (docs/design.md §11): ``row_lengths[b]`` tokens emitted, ``row_counts[b]`` accepted
drafts, ``row_nums[b]`` target passes that served the row, ``row_accept_lengths[b]`` tokens each of
them emitted, :attr:`row_taus`; :meth:`row` is row b alone as a batch-of-one result. For B = 1 the
totals are the row's numbers.
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
    row_lengths: list[int] | None = None
    row_counts: list[int] | None = None
    row_nums: list[int] | None = None
    row_accept_lengths: list[list[int]] | None = None
    draft_tree_capacity: int | None = None

    def __post_init__(self) -> None:
        # A result built directly (one row, the old constructor): its per-row fields follow from the totals.
        b, n = self.output_ids.shape[0], int(self.output_ids.shape[-1])
        if self.row_lengths is None:
            self.row_lengths = [n] * b
        if self.row_counts is None:
            self.row_counts = [int(m.sum()) for m in self.spec_mask.reshape(b, -1)] if b > 1 else [int(self.count)]
        if self.row_nums is None:
            self.row_nums = [int(self.num)] * b
        if self.row_accept_lengths is None:
            self.row_accept_lengths = [list(self.accept_lengths) for _ in range(b)]

    def __iter__(self):
        return iter((self.output_ids, self.count, self.num, self.elapsed_time, self.spec_mask))

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i):
        return (self.output_ids, self.count, self.num, self.elapsed_time, self.spec_mask)[i]

    @property
    def batch_size(self) -> int:
        return int(self.output_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens emitted, all rows together (padding not counted)."""
        return int(sum(self.row_lengths))

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens emitted per target forward pass and row (B = 1: tokens / ``num``)."""
        passes = sum(self.row_nums)
        return self.num_tokens / passes if passes else 0.0

    @property
    def row_taus(self) -> list[float]:
        """:attr:`tau` of each row: ``row_lengths[b] / row_nums[b]``."""
        return [n / k if k else 0.0 for n, k in zip(self.row_lengths, self.row_nums)]

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput excluding the prefill (tokens after each row's first, all rows / elapsed)."""
        after_first = self.num_tokens - self.batch_size
        return after_first / self.elapsed_time if self.elapsed_time > 0 and after_first > 0 else 0.0

    def tolist(self) -> list[int]:
        """Row 0's tokens (without padding)."""
        return self.output_ids[0, : self.row_lengths[0]].tolist()

    def row(self, b: int) -> "GenerationResult":
        """Row ``b`` as a batch-of-one result (its tokens without padding, its own count, num and
        accept lengths; the batch's timings)."""
        n = self.row_lengths[b]
        out, mask = self.output_ids[b : b + 1, :n].clone(), self.spec_mask[b : b + 1, :n].clone()
        return GenerationResult(out, self.row_counts[b], self.row_nums[b], self.elapsed_time, mask, self.prefill_time,
                                list(self.row_accept_lengths[b]), self.tree_shape, draft_tree_capacity=self.draft_tree_capacity)

    @classmethod
    def from_batch(cls, emitted: list[list[int]], spec: list[list[bool]], eos_ids, max_gen_len: int, num: int,
                   elapsed: float, prefill_time: float, accept_lengths: list[list[int]], row_nums: list[int] | None = None,
                   pass_lengths: list[int] | None = None) -> "GenerationResult":
        """B rows decoded together: cut each row (:func:`finalize_output`), pad to a rectangle with the
        row's last token (its EOS) and count per row and in total.

        ``accept_lengths[b]``: tokens row b got from each target pass that served it, as the passes
        emitted them (before the cut; ``row_nums`` defaults to their counts); ``pass_lengths``: the
        batch's tokens per pass (default: the per-pass sums over the rows, passes aligned from the
        first: every row is served from the first pass until it finishes)."""
        rows, masks = [], []
        for toks, sp in zip(emitted, spec):
            out, mask = finalize_output(toks, sp, sorted(eos_ids), max_gen_len)
            rows.append(out)
            masks.append(mask)
        n = max(len(r) for r in rows)
        out_t = torch.tensor([r + [r[-1]] * (n - len(r)) for r in rows], dtype=torch.long)
        mask_t = torch.tensor([m + [False] * (n - len(m)) for m in masks], dtype=torch.bool)
        if row_nums is None:
            row_nums = [len(a) for a in accept_lengths]
        if pass_lengths is None:
            width = max(len(a) for a in accept_lengths)
            pass_lengths = [sum(a[i] for a in accept_lengths if i < len(a)) for i in range(width)]
        return cls(out_t, int(mask_t.sum()), num, elapsed, mask_t, prefill_time, pass_lengths, None,
                   [len(r) for r in rows], [int(sum(m)) for m in masks], list(row_nums), [list(a) for a in accept_lengths])

    @classmethod
    def from_rounds(cls, emitted: list[int], spec: list[bool], eos_ids, max_gen_len: int, num: int, elapsed: float,
                    prefill_time: float, accept_lengths: list[int]) -> "GenerationResult":
        """A speculative run of one row: cut the emitted tokens (:func:`finalize_output`) and count accepted drafts."""
        return cls.from_batch([emitted], [spec], eos_ids, max_gen_len, num, elapsed, prefill_time, [accept_lengths],
                              row_nums=[num], pass_lengths=list(accept_lengths))

    @classmethod
    def from_steps(cls, steps: list[torch.Tensor], eos_ids, max_gen_len: int, elapsed: float, prefill_time: float) -> "GenerationResult":
        """Plain decoding: ``steps`` are [B] token tensors, one per target pass. Each row is cut after its
        first EOS; finished rows are padded with that EOS to a rectangle. Every pass emits one token per
        row it serves."""
        seqs = torch.stack(steps, dim=1).tolist()
        rows = [finalize_output(s, [False] * len(s), eos_ids, max_gen_len)[0] for s in seqs]
        return cls.from_batch(rows, [[False] * len(r) for r in rows], eos_ids, max_gen_len, len(steps), elapsed,
                              prefill_time, [[1] * len(r) for r in rows])


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
