"""Input checks shared by every public entry point (ref and fast): clear ValueErrors, early."""

from __future__ import annotations

import operator

import torch

from specdec.shared.batch import normalize_prompts
from specdec.shared.config import ModelConfig

__all__ = ["check_prompt", "check_prompt_length", "check_generator", "check_positive_int", "check_batch_one", "check_same_vocab",
           "check_draft_window"]


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_draft_window(draft_window) -> int | None:
    """``draft_window`` of the draft-model decoders: None (the draft reads the whole prompt) or an int >= 1
    (the last prompt tokens it reads); a bool or any other type is a TypeError, an int < 1 a ValueError."""
    accepted = "None (the whole prompt) or an int >= 1 (the last prompt tokens the draft model reads)"
    if draft_window is None:
        return None
    if isinstance(draft_window, bool) or not isinstance(draft_window, int):
        raise TypeError(f"draft_window must be {accepted}, got {type(draft_window).__name__} {draft_window!r}")
    if draft_window < 1:
        raise ValueError(f"draft_window must be {accepted}, got {draft_window}")
    return draft_window


def check_prompt_length(prompt_length) -> int:
    """``prompt_length`` as a Python int: an int (or numpy int), or a 0-d / one-element integer tensor
    (LongSpec's scripts pass ``attention_mask.sum(-1)`` of a batch of one). The range is checked by
    :func:`check_prompt`."""
    accepted = "an int or a 0-d / one-element integer tensor"
    if isinstance(prompt_length, torch.Tensor):
        t = prompt_length
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"prompt_length must be {accepted}, got a {t.dtype} tensor")
        if t.numel() != 1:
            raise ValueError(f"prompt_length must be {accepted}, got a tensor of shape {tuple(t.shape)} "
                             f"({t.numel()} elements); pass one length (batch size 1) or an int")
        return int(t.reshape(()).item())
    if isinstance(prompt_length, bool):
        raise TypeError(f"prompt_length must be {accepted}, got bool")
    try:
        return operator.index(prompt_length)  # ints, numpy ints; not floats
    except TypeError:
        raise TypeError(f"prompt_length must be {accepted}, got {type(prompt_length).__name__}") from None


def check_generator(generator) -> None:
    """``generator`` must be a ``torch.Generator`` or None. Any device is fine: every draw happens where
    the generator lives (a CPU generator drives CUDA decoding reproducibly, see ``sample_from_probs``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        hint = " (to seed, pass torch.Generator().manual_seed(n))" if isinstance(generator, int) else ""
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}{hint}")


def check_prompt(input_ids, prompt_length, max_gen_len: int, config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Validate and return the prompt tokens as a [B, T] long tensor (``input_ids[:, :prompt_length]``).

    Every input form of :mod:`specdec.shared.batch` is accepted and checked by
    :func:`specdec.shared.batch.normalize_prompts` (non-empty, integer tokens inside the vocabulary,
    ``1 <= prompt_length <= T`` per row, ``max_gen_len >= 1``, longest prompt + ``max_gen_len`` within
    ``max_position_embeddings``). Prompts of different lengths come back right-padded with 0 to the
    longest: a caller that batches ragged prompts uses :func:`~specdec.shared.batch.normalize_prompts`
    itself to keep the lengths.
    """
    return normalize_prompts(input_ids, prompt_length, max_gen_len, config, device).padded(0)


def check_batch_one(prompt: torch.Tensor, method: str) -> None:
    """The decoders that do not batch yet (the fast path's speculative decoders, romsto's layer) call this."""
    if prompt.shape[0] != 1:
        raise ValueError(f"{method} supports batch size 1, got batch size {prompt.shape[0]}: batching of this method "
                         "is in the reference path only for now (specdec.ref, issue 19); call it once per prompt "
                         "or use specdec.ref")


def check_same_vocab(target_cfg: ModelConfig, draft_cfg: ModelConfig, what: str = "draft model") -> None:
    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the target has {target_cfg.vocab_size} tokens, the {what} {draft_cfg.vocab_size}; "
            "speculative decoding needs the same tokenizer"
        )
