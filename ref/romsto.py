"""romsto-compatible entry points (romsto's Speculative-Decoding): ``speculative_generate(inputs, drafter, target, ...)``.

romsto's usage example runs unchanged except for the import line::

    from specdec.ref.romsto import speculative_generate, GreedyProcessor, NucleusProcessor

    output_ids, accept_rate = speculative_generate(inputs, drafter, target, tokenizer=tokenizer, gamma=5,
                                                   logits_processor=GreedyProcessor(), max_gen_len=100,
                                                   eos_tokens_id=[tokenizer.eos_token_id])

``drafter`` and ``target`` may be :class:`~specdec.ref.model.Model` objects or ``transformers``
Llama/Qwen2 causal LMs; the latter are converted once (cached per object, so repeated calls are
cheap; convert again by passing a new object if you change its weights). Everything runs on the draft-model
drafter of :mod:`specdec.ref.speculative` in the one engine (:mod:`specdec.ref.engine`), with romsto's bugs
fixed: greedy is an exact argmax match (identical to greedy decoding), the KV cache is always
used and rolled back properly, several EOS ids stop at the first one *by position*,
``max_gen_len`` 1 and 2 work, and logits are never modified in place.

Differences from romsto worth knowing: ``use_cache`` and ``pad_token_id`` are accepted and
ignored (the KV cache is always on; nothing is padded); ``max_gen_len`` counts new tokens; the
acceptance rate is accepted drafts / drafted tokens over all rounds (0.0 when nothing was drafted).

Additions, keywords after romsto's arguments, passed to the decoders unchanged (so bad values raise
their errors): ``generator`` (a ``torch.Generator`` the sampling draws from), ``sampling`` and
``seed`` as in :func:`specdec.ref.vanilla.vanilla_generate` -- ``sampling="keyed"`` with a ``seed``
makes :func:`speculative_generate` emit exactly :func:`autoregressive_generate`'s tokens for the same
seed and processor (position-keyed sampling, docs/design.md §8).
"""

from __future__ import annotations

import weakref

import torch

from specdec.ref.engine import run_speculative
from specdec.ref.model import Model, as_model
from specdec.ref.speculative import DraftModelDrafter
from specdec.ref.vanilla import vanilla_generate
from specdec.shared.sampling import (  # noqa: F401  (re-exported for romsto's imports)
    GreedyProcessor,
    LogitsProcessor,
    MultinomialProcessor,
    NucleusProcessor,
    TopKNucleusProcessor,
    TopKProcessor,
)
from specdec.shared.round import RoundRecord
from specdec.shared.validate import check_batch_one, check_positive_int, check_same_vocab

__all__ = [
    "speculative_generate",
    "autoregressive_generate",
    "GreedyProcessor",
    "LogitsProcessor",
    "MultinomialProcessor",
    "NucleusProcessor",
    "TopKNucleusProcessor",
    "TopKProcessor",
]

GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"

# id(transformers model) -> (weak reference to it, converted Model)
_CONVERTED: dict[int, tuple[weakref.ref, Model]] = {}


def _to_model(obj) -> Model:
    """A Model as is; a transformers model converted once per object."""
    if isinstance(obj, Model):
        return obj
    hit = _CONVERTED.get(id(obj))
    if hit is not None and hit[0]() is obj:
        return hit[1]
    model = as_model(obj)
    key = id(obj)
    try:
        ref = weakref.ref(obj, lambda _r, key=key: _CONVERTED.pop(key, None))
    except TypeError:  # not weak-referenceable: do not cache
        return model
    _CONVERTED[key] = (ref, model)
    return model


def _params(logits_processor):
    params = getattr(logits_processor, "params", None)
    if params is None:
        raise TypeError(
            f"logits_processor must be one of GreedyProcessor, MultinomialProcessor, TopKProcessor, NucleusProcessor, "
            f"TopKNucleusProcessor (from specdec.ref.romsto), got {type(logits_processor).__name__}"
        )
    return params


def _eos_list(eos_tokens_id) -> list[int]:
    if eos_tokens_id is None:
        return []
    if isinstance(eos_tokens_id, int):
        return [eos_tokens_id]
    return [int(t) for t in eos_tokens_id]


_INPUTS = "a list of token ids (ints) or a 1-D integer tensor"


def _inputs_tensor(inputs) -> torch.Tensor:
    """romsto's ``inputs`` (a list of token ids) as a long tensor; a tensor must hold integers.
    Nested lists / [B, T] tensors pass through (the decoders reject batch sizes other than 1)."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError(f"inputs must be {_INPUTS}, got {type(inputs).__name__} (tokenize the text first: "
                        "tokenizer(text).input_ids)")
    if not isinstance(inputs, torch.Tensor):
        if not isinstance(inputs, (list, tuple)) and not hasattr(inputs, "__array__"):  # numpy arrays are fine
            raise TypeError(f"inputs must be {_INPUTS}, got {type(inputs).__name__}")
        if len(inputs) == 0:
            return torch.zeros(0, dtype=torch.long)  # the decoders say "empty prompt"
        try:
            inputs = torch.as_tensor(inputs)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"inputs must be {_INPUTS}, got a {type(inputs).__name__} holding other values") from None
    if inputs.dtype.is_floating_point or inputs.dtype.is_complex or inputs.dtype == torch.bool:
        raise TypeError(f"inputs must be {_INPUTS}, got {inputs.dtype} values")
    if inputs.dim() not in (1, 2):
        raise ValueError(f"inputs must be {_INPUTS}, got shape {tuple(inputs.shape)}")
    return inputs.long()


def _show(tokens: list[int], tokenizer) -> str:
    if tokenizer is None:
        return " ".join(str(t) for t in tokens)
    return tokenizer.decode(tokens)


@torch.no_grad()
def speculative_generate(
    inputs: list[int],
    drafter,
    target,
    tokenizer=None,
    gamma: int = 5,
    logits_processor: LogitsProcessor = GreedyProcessor(),
    max_gen_len: int = 40,
    eos_tokens_id: int | list[int] = 1,
    pad_token_id: int = 0,
    use_cache: bool = False,
    skip_sample_adjustment: bool = False,
    first_target: bool = True,
    debug: bool = False,
    generator: torch.Generator | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> tuple[list[int], float]:
    """Speculative decoding with romsto's signature. Returns (generated ids without the prompt, acceptance rate).

    ``skip_sample_adjustment=True`` is LOSSY (samples a rejected position from p instead of
    norm(max(p - q, 0))); ``debug=True`` prints every round's accepted drafts in green and
    rejected drafts in red, decoded with ``tokenizer`` when given. ``generator``, ``sampling``,
    ``seed``: see the module docstring.
    """
    target_m, drafter_m = _to_model(target), _to_model(drafter)
    params = _params(logits_processor)
    prompt = _inputs_tensor(inputs)
    stats = {"drafted": 0, "accepted": 0, "round": 0}

    def on_round(rec: RoundRecord) -> None:
        drafts = rec.draft.tokens[1:].tolist()
        stats["drafted"] += len(drafts)
        stats["accepted"] += rec.accepted
        stats["round"] += 1
        if debug:
            ok, bad = drafts[: rec.accepted], drafts[rec.accepted:]
            print(f"round {stats['round']}: {GREEN}{_show(ok, tokenizer)}{RESET}"
                  f"{RED}{_show(bad, tokenizer)}{RESET} -> {_show([rec.next_token], tokenizer)}")

    check_same_vocab(target_m.config, drafter_m.config)
    check_positive_int("gamma", gamma)
    res = run_speculative(
        target_m, DraftModelDrafter(drafter_m, gamma), prompt, prompt.shape[-1], max_gen_len, _eos_list(eos_tokens_id),
        params.temperature, params.top_k, params.top_p, generator, method="speculative decoding",
        first_target=first_target, skip_sample_adjustment=skip_sample_adjustment, on_round=on_round,
        sampling=sampling, seed=seed,
    )
    rate = stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0
    return res.tolist(), rate


@torch.no_grad()
def autoregressive_generate(
    inputs: list[int],
    model,
    max_gen_len: int = 40,
    logits_processor: LogitsProcessor = GreedyProcessor(),
    eos_tokens_id: int | list[int] = 1,
    pad_token_id: int = 0,
    use_cache: bool = False,
    debug: bool = False,
    generator: torch.Generator | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> list[int]:
    """Plain decoding with romsto's signature; returns the generated ids (without the prompt).
    ``generator``, ``sampling``, ``seed``: see the module docstring."""
    m = _to_model(model)
    params = _params(logits_processor)
    prompt = _inputs_tensor(inputs)
    if prompt.dim() == 2:
        check_batch_one(prompt, "autoregressive_generate")
    res = vanilla_generate(m, prompt, prompt.shape[-1], max_gen_len, _eos_list(eos_tokens_id),
                           params.temperature, params.top_k, params.top_p, generator, sampling=sampling, seed=seed)
    out = res.tolist()
    if debug:
        print(f"generated {len(out)} tokens: {out}")
    return out
