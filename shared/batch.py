"""Batched prompts: the one input rule of every decoder, ref and fast (docs/design.md §11).

A decoder call takes ``input_ids`` and ``prompt_length`` in one of these forms:

* ``input_ids`` a [B, T] (or [T]) integer tensor, right-padded, with ``prompt_length``

  - an int (or a 0-d / one-element integer tensor, e.g. LongSpec's ``attention_mask.sum(-1)`` of
    a batch of one): every row's prompt is ``input_ids[b, :prompt_length]``;
  - a length-B sequence or 1-D tensor of per-row lengths: row b's prompt is
    ``input_ids[b, :prompt_length[b]]`` (what lies after it is padding and never read);
  - None: every row is a whole prompt of T tokens;

* ``input_ids`` a list of ints: one prompt (as the [T] tensor);
* ``input_ids`` a list of 1-D prompts (lists of ints or 1-D tensors, any lengths), with
  ``prompt_length`` None (each prompt whole), per-row lengths, or an int that no prompt is shorter
  than.

Every length must lie in ``[1, T_b]`` (T_b = the tokens row b has), the longest prompt plus
``max_gen_len`` must fit the model's context, and every prompt token must be in the vocabulary
(padding is not checked: it is never read).

:func:`normalize_prompts` turns any of them into a :class:`PromptBatch`: one 1-D long tensor per
row. A batch of B rows is decoded as B independent sequences: row b is *sequence* b of keyed
sampling (:mod:`specdec.shared.keyed`) unless the engine is given explicit ``seq_ids``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from specdec.shared.config import ModelConfig

__all__ = ["PromptBatch", "normalize_prompts", "prompt_lengths", "longest_prompt", "check_seq_ids"]

_ONE = "an int or a 0-d / one-element integer tensor"


@dataclass(frozen=True)
class PromptBatch:
    """B prompts of possibly different lengths: ``rows[b]`` is row b's prompt, a 1-D long tensor."""

    rows: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        return [int(r.shape[0]) for r in self.rows]

    @property
    def uniform(self) -> bool:
        """All rows have the same length."""
        return len(set(self.lengths)) == 1

    def padded(self, pad_id: int = 0) -> torch.Tensor:
        """[B, max length] long: the rows right-padded with ``pad_id``."""
        n = max(self.lengths)
        out = torch.full((self.size, n), pad_id, dtype=torch.long, device=self.rows[0].device)
        for b, r in enumerate(self.rows):
            out[b, : r.shape[0]] = r
        return out

    def tolists(self) -> list[list[int]]:
        return [r.tolist() for r in self.rows]


def _token_rows(input_ids) -> tuple[list[torch.Tensor], bool]:
    """``input_ids`` as a list of 1-D integer tensors (not yet cut), and whether it was a [B, T] tensor."""
    if isinstance(input_ids, (list, tuple)):
        if len(input_ids) > 0 and all(isinstance(r, (list, tuple, torch.Tensor)) for r in input_ids):
            rows = []
            for b, r in enumerate(input_ids):  # a list of prompts, each its own length
                t = torch.tensor(r, dtype=torch.long) if isinstance(r, (list, tuple)) else r
                if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                    raise TypeError(f"input_ids must hold integer token ids, got dtype {t.dtype} in row {b}")
                if t.dim() != 1:
                    raise ValueError(f"input_ids given as a list of prompts needs 1-D prompts, row {b} has shape {tuple(t.shape)}")
                rows.append(t)
            return rows, False
        input_ids = torch.tensor(input_ids, dtype=torch.long)  # one prompt (a list of ints), or []
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor [B, T], a list of ints or a list of 1-D prompts, "
                        f"got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    return list(input_ids.unbind(0)), True


def longest_prompt(input_ids) -> int:
    """Tokens in the longest row of ``input_ids`` (any accepted form, before the lengths are applied):
    what a drafter's own cache must hold for the prompt. Bad input raises as :func:`normalize_prompts`."""
    rows, _ = _token_rows(input_ids)
    return max((int(r.shape[0]) for r in rows), default=0)


def prompt_lengths(prompt_length, available: Sequence[int]) -> list[int]:
    """``prompt_length`` as one int per row (range not checked); ``available[b]`` = the tokens row b has.

    Accepted: None (every row whole), an int (numpy ints too; not bool, not float), a 0-d /
    one-element integer tensor (that int), or B ints (a sequence or a 1-D integer tensor)."""
    b = len(available)
    per_row = f"per-row lengths (one int per row of input_ids, B = {b}) are accepted too"
    if prompt_length is None:
        return list(available)
    if isinstance(prompt_length, torch.Tensor):
        t = prompt_length
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"prompt_length must be {_ONE}, got a {t.dtype} tensor; {per_row}")
        if t.numel() == 1:
            return [int(t.reshape(()).item())] * b
        if t.dim() != 1 or t.numel() != b:
            raise ValueError(f"prompt_length must be {_ONE}, got a tensor of shape {tuple(t.shape)} "
                             f"({t.numel()} elements); {per_row}")
        return [int(x) for x in t.tolist()]
    if isinstance(prompt_length, bool):
        raise TypeError(f"prompt_length must be {_ONE}, got bool; {per_row}")
    try:
        return [operator.index(prompt_length)] * b  # ints, numpy ints; not floats
    except TypeError:
        pass
    if isinstance(prompt_length, (list, tuple)) or hasattr(prompt_length, "__array__"):
        items = list(prompt_length)
        if len(items) != b:
            raise ValueError(f"prompt_length must be {_ONE}, got {len(items)} lengths for {b} rows of input_ids; {per_row}")
        out = []
        for i, x in enumerate(items):
            if isinstance(x, bool):
                raise TypeError(f"prompt_length[{i}] must be an int, got bool")
            try:
                out.append(operator.index(x))
            except TypeError:
                raise TypeError(f"prompt_length[{i}] must be an int, got {type(x).__name__}") from None
        return out
    raise TypeError(f"prompt_length must be {_ONE}, got {type(prompt_length).__name__}; {per_row}")


def normalize_prompts(input_ids, prompt_length, max_gen_len: int, config: ModelConfig,
                      device: torch.device | str | None = None) -> PromptBatch:
    """Validate any accepted input form (module docstring) and return the prompts, on ``device``.

    Raises ValueError / TypeError naming ``input_ids``, ``prompt_length`` or ``max_gen_len`` and the
    accepted range: an empty prompt or batch, a length of 0 or above the row's tokens, prompts of
    different lengths with one int ``prompt_length`` longer than a row, a prompt that with
    ``max_gen_len`` exceeds the context, token ids outside the vocabulary.
    """
    from specdec.shared.validate import check_positive_int

    rows, rectangular = _token_rows(input_ids)
    if len(rows) == 0 or any(r.shape[0] == 0 for r in rows):
        what = (f"input_ids has shape ({len(rows)}, {rows[0].shape[0] if rows else 0})" if rectangular
                else f"row {next(b for b, r in enumerate(rows) if r.shape[0] == 0)} of input_ids has no tokens")
        raise ValueError(f"empty prompt: {what}; need at least one token per row")
    available = [int(r.shape[0]) for r in rows]
    lengths = prompt_lengths(prompt_length, available)
    ragged = len(set(available)) > 1
    for b, (n, t) in enumerate(zip(lengths, available)):
        if 1 <= n <= t:
            continue
        if ragged and isinstance(prompt_length, int) and n >= 1:
            raise ValueError(f"prompt_length = {n} is longer than row {b} of input_ids ({t} tokens): prompts of "
                             "different lengths need per-row lengths (prompt_length=None for whole prompts, or one "
                             "int per row)")
        if len(set(lengths)) == 1 and not ragged:
            raise ValueError(f"prompt_length must be in [1, {t}] (the length of input_ids), got {n}")
        raise ValueError(f"prompt_length[{b}] must be in [1, {t}] (row {b} of input_ids has {t} tokens), got {n}")
    check_positive_int("max_gen_len", max_gen_len)
    longest = max(lengths)
    if longest + max_gen_len > config.max_position_embeddings:
        raise ValueError(
            f"prompt_length + max_gen_len = {longest} + {max_gen_len} exceeds the model's context of "
            f"{config.max_position_embeddings} positions; shorten the prompt or lower max_gen_len"
        )
    prompts = [r[:n].long() for r, n in zip(rows, lengths)]
    lo = min(int(p.min()) for p in prompts)
    hi = max(int(p.max()) for p in prompts)
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size - 1}], got range [{lo}, {hi}]")
    if device is not None:
        prompts = [p.to(device) for p in prompts]
    return PromptBatch(tuple(prompts))


def check_seq_ids(seq_ids, batch_size: int) -> list[int]:
    """Keyed sampling's sequence id of each row: None -> the row indices ``0..B-1``; otherwise B distinct
    ints >= 0 (a row's keyed output depends only on its prompt, the seed and its sequence id)."""
    if seq_ids is None:
        return list(range(batch_size))
    if isinstance(seq_ids, torch.Tensor):
        seq_ids = seq_ids.tolist()
    if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__len__"):
        raise TypeError(f"seq_ids must be None or a sequence of {batch_size} ints, got {type(seq_ids).__name__}")
    ids = list(seq_ids)
    if len(ids) != batch_size:
        raise ValueError(f"seq_ids must hold one id per row of input_ids ({batch_size}), got {len(ids)}")
    for i, s in enumerate(ids):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"seq_ids[{i}] must be an int >= 0, got {s!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"seq_ids must be distinct (two rows with one id would draw the same noise), got {ids}")
    return ids
