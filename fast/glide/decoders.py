"""The GLIDE decoders of the fast path: :func:`tree_spec_generate` (beam trees) and
:func:`spec_generate` (chains), same contracts as :mod:`specdec.ref.glide`'s."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from specdec.fast.engine import check_drafts_fit, run_speculative_fast
from specdec.fast.glide.drafter import FastGlideDrafter
from specdec.fast.glide.weights import as_fast_glide
from specdec.fast.model import as_fast_model
from specdec.shared.result import GenerationResult
from specdec.shared.round import RoundRecord
from specdec.shared.tree import tree_shape_num_nodes, validate_tree_shape
from specdec.shared.validate import check_positive_int

__all__ = ["spec_generate", "tree_spec_generate"]


def tree_spec_generate(
    target,
    glide,
    input_ids: torch.Tensor,
    prompt_length: int,
    tree_shape: Sequence[int] | None = (4, 16, 16, 16, 16),
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.tree_spec_generate` (at most 127 draft nodes on the fast path).

    ``sampling="keyed"``: the output is exactly vanilla keyed sampling's (keyed verification), but the
    fast drafter's beam is NOT yet ranked by the keyed noise (the reference's is), so its drafts --
    and acceptance -- differ from the reference's in that mode."""
    shape = validate_tree_shape((4, 16, 16, 16, 16) if tree_shape is None else tree_shape)
    size = tree_shape_num_nodes(shape)
    check_drafts_fit(f"the number of draft nodes of tree_shape {list(shape)}", size - 1)
    fm = as_fast_model(target)
    drafter = FastGlideDrafter(fm, as_fast_glide(glide), shape)
    return run_speculative_fast(fm, drafter, input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="tree_spec_generate", tree_size=size, on_round=on_round,
                                sampling=sampling, seed=seed)


def spec_generate(
    target,
    glide,
    input_ids: torch.Tensor,
    prompt_length: int,
    gamma: int = 4,
    max_gen_len: int = 64,
    eos_id: int | list[int] | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    sampling: str = "rejection",
    seed: int | None = None,
) -> GenerationResult:
    """Same contract as :func:`specdec.ref.spec_generate` (``gamma`` <= 127 on the fast path); keyed
    sampling as in :func:`tree_spec_generate` (exact output, drafts not yet coupled to the noise)."""
    check_positive_int("gamma", gamma)
    check_drafts_fit("gamma", gamma)
    fm = as_fast_model(target)
    drafter = FastGlideDrafter(fm, as_fast_glide(glide), (1,) * gamma)
    return run_speculative_fast(fm, drafter, input_ids, prompt_length, max_gen_len, eos_id, temperature, top_k, top_p,
                                generator, method="spec_generate", tree_size=gamma + 1, on_round=on_round,
                                sampling=sampling, seed=seed)
