"""Tokenizers and chat templates (local, offline).

* :func:`load_tokenizer` loads a tokenizer from a local model directory with
  ``transformers.AutoTokenizer`` (``local_files_only``); ``"default"`` is the embedded model.
* :func:`format_prompt` turns a user message (and optional system prompt) into the text the
  model expects: the tokenizer's own chat template when it has one, else one of the built-in
  templates below. ``family=`` picks a built-in template explicitly.
* :func:`encode_prompt` tokenizes that text without doubling the BOS token.

Built-in templates (``family``):

=========  ===================================================================================
vicuna     ``{system} USER: {message} ASSISTANT:`` (Vicuna v1.1 / LongChat, FastChat's format)
llama2     ``[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{message} [/INST]`` (Llama-2-chat, CodeLlama-instruct)
llama3     ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>...``
qwen2      ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{message}<|im_end|>\\n<|im_start|>assistant\\n``
raw        the message itself (system text, if any, above it)
=========  ===================================================================================

Without a chat template and without ``family``, the family is guessed from the tokenizer's special
tokens (``<|im_start|>`` -> qwen2, ``<|start_header_id|>`` -> llama3) or its name (vicuna/longchat,
llama-2/codellama chat); anything else is ``raw`` (a base model: the text is used as it is).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "FAMILIES",
    "VICUNA_SYSTEM",
    "QWEN2_SYSTEM",
    "load_tokenizer",
    "format_prompt",
    "encode_prompt",
    "builtin_template",
    "guess_family",
]

FAMILIES = ("vicuna", "llama2", "llama3", "qwen2", "raw")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QWEN2_SYSTEM = "You are a helpful assistant."

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str | os.PathLike = "default", **kwargs: Any):
    """Load the tokenizer of a local HF-format model directory (never touches the network).

    ``path`` may be an embedded model name (``"default"``). Raises ValueError if the directory or
    its tokenizer files are missing, or if transformers cannot read them.
    """
    from specdec.shared.assets import resolve_model_path

    p = resolve_model_path(path)
    if not os.path.isdir(p):
        raise ValueError(f"tokenizer directory {p!r} does not exist: pass a local model directory (or 'default')")
    if not any(os.path.isfile(os.path.join(p, f)) for f in _TOKENIZER_FILES):
        raise ValueError(f"no tokenizer files in {p!r}: expected one of {list(_TOKENIZER_FILES)}")
    from transformers import AutoTokenizer

    kwargs.setdefault("local_files_only", True)
    try:
        return AutoTokenizer.from_pretrained(p, **kwargs)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is wrong
        raise ValueError(f"could not load the tokenizer in {p!r}: {type(e).__name__}: {e}") from e


def _check_family(family: str) -> str:
    if not isinstance(family, str) or family.lower() not in FAMILIES:
        raise ValueError(f"unknown prompt family {family!r}: use one of {list(FAMILIES)} (or None for the tokenizer's chat template)")
    return family.lower()


def builtin_template(family: str, user_message: str, system: str | None = None) -> str:
    """Format one user turn with a built-in template, ready for the assistant's reply."""
    family = _check_family(family)
    if family == "vicuna":
        sys_text = VICUNA_SYSTEM if system is None else system
        return f"{sys_text} USER: {user_message} ASSISTANT:" if sys_text else f"USER: {user_message} ASSISTANT:"
    if family == "llama2":
        if system:
            return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user_message} [/INST]"
        return f"[INST] {user_message} [/INST]"
    if family == "llama3":
        out = "<|begin_of_text|>"
        if system:
            out += f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        out += f"<|start_header_id|>user<|end_header_id|>\n\n{user_message}<|eot_id|>"
        return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if family == "qwen2":
        sys_text = QWEN2_SYSTEM if system is None else system
        out = f"<|im_start|>system\n{sys_text}<|im_end|>\n" if sys_text else ""
        return out + f"<|im_start|>user\n{user_message}<|im_end|>\n<|im_start|>assistant\n"
    # raw
    return f"{system}\n\n{user_message}" if system else user_message


def guess_family(tokenizer) -> str:
    """Best guess of the built-in template for a tokenizer without a chat template (see module doc)."""
    vocab: Any = {}
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        pass
    if "<|im_start|>" in vocab:
        return "qwen2"
    if "<|start_header_id|>" in vocab:
        return "llama3"
    name = str(getattr(tokenizer, "name_or_path", "") or "").lower()
    if "vicuna" in name or "longchat" in name:
        return "vicuna"
    if ("llama-2" in name or "llama2" in name or "codellama" in name) and ("chat" in name or "instruct" in name):
        return "llama2"
    return "raw"


def format_prompt(tokenizer, user_message: str, system: str | None = None, family: str | None = None) -> str:
    """The prompt text for one user turn, ending where the assistant's answer starts.

    ``family=None``: the tokenizer's chat template if it has one, else a built-in template chosen by
    :func:`guess_family`. ``family`` in :data:`FAMILIES`: that built-in template (``tokenizer`` may
    then be None).
    """
    if not isinstance(user_message, str):
        raise TypeError(f"user_message must be a str, got {type(user_message).__name__}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a str or None, got {type(system).__name__}")
    if family is not None:
        return builtin_template(family, user_message, system)
    if tokenizer is None:
        raise ValueError("format_prompt needs a tokenizer or an explicit family (one of " + ", ".join(FAMILIES) + ")")
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user_message}]
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            if system is None:
                raise ValueError(f"the tokenizer's chat template failed: {e}") from e
            # some templates reject a system turn: fold it into the user message
            merged = [{"role": "user", "content": f"{system}\n\n{user_message}"}]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    return builtin_template(guess_family(tokenizer), user_message, system)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``. The tokenizer's BOS is added unless the text already starts with it
    (chat templates usually write it), so it is never doubled."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    bos = getattr(tokenizer, "bos_token", None)
    has_bos = bool(bos) and text.startswith(bos)
    ids = tokenizer(text, add_special_tokens=not has_bos)["input_ids"]
    return [int(t) for t in ids]
