"""Input checks shared by every public entry point (ref and fast): clear ValueErrors, early."""

from __future__ import annotations

import operator

import torch

from specdec.shared.config import ModelConfig

__all__ = ["check_prompt", "check_prompt_length", "check_generator", "check_positive_int", "check_batch_one", "check_same_vocab"]


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


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


def check_prompt(input_ids, prompt_length: int, max_gen_len: int, config: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Validate and return the prompt tokens ``input_ids[:, :prompt_length]`` as a [B, T] long tensor.

    Accepts a [B, T] or [T] tensor (or a list of ints). Checks: non-empty, integer tokens inside the
    vocabulary, ``prompt_length`` an int (or a one-element integer tensor) with ``1 <= prompt_length <= T``, ``max_gen_len >= 1`` and
    ``prompt_length + max_gen_len <= max_position_embeddings``.
    """
    if isinstance(input_ids, (list, tuple)):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor [B, T] (or a list of ints), got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}; need at least one token")
    prompt_length = check_prompt_length(prompt_length)
    if not 1 <= prompt_length <= input_ids.shape[1]:
        raise ValueError(f"prompt_length must be in [1, {input_ids.shape[1]}] (the length of input_ids), got {prompt_length}")
    check_positive_int("max_gen_len", max_gen_len)
    if prompt_length + max_gen_len > config.max_position_embeddings:
        raise ValueError(
            f"prompt_length + max_gen_len = {prompt_length} + {max_gen_len} exceeds the model's context of "
            f"{config.max_position_embeddings} positions; shorten the prompt or lower max_gen_len"
        )
    prompt = input_ids[:, :prompt_length].long()
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"token ids must be in [0, {config.vocab_size - 1}], got range [{lo}, {hi}]")
    return prompt.to(device) if device is not None else prompt


def check_batch_one(prompt: torch.Tensor, method: str) -> None:
    if prompt.shape[0] != 1:
        raise ValueError(f"{method} supports batch size 1, got batch size {prompt.shape[0]}; call it once per prompt")


def check_same_vocab(target_cfg: ModelConfig, draft_cfg: ModelConfig, what: str = "draft model") -> None:
    if target_cfg.vocab_size != draft_cfg.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: the target has {target_cfg.vocab_size} tokens, the {what} {draft_cfg.vocab_size}; "
            "speculative decoding needs the same tokenizer"
        )
