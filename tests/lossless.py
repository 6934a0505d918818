"""Statistical losslessness test for speculative decoders, plus a tiny in-memory model factory.

A sampling decoder is *lossless* when its output has exactly the distribution of plain
sampling from the target. On a model with a tiny vocabulary (8-12 tokens) the exact
distribution of the first ``n_tokens`` sampled tokens can be enumerated (V ** n sequences,
one batched ``forward`` per level), so we can run the decoder many times with a seeded
generator and compare the empirical counts to the exact probabilities with a chi-square
goodness-of-fit test.

Usage::

    from lossless import tiny_model, lossless_check      # tests/ is on sys.path under pytest, like helpers

    target = tiny_model("llama", vocab=10, seed=0)
    draft = tiny_model("llama", vocab=10, seed=1)
    prompt = torch.tensor([[1, 2, 3]])
    decode = lambda **kw: speculative_generate(target, draft, gamma=3, **kw)
    lossless_check(decode, target, prompt, n_samples=2000, temperature=1.0, top_k=5)   # raises AssertionError if not

``decode_fn`` is called as ``decode_fn(input_ids=..., prompt_length=..., max_gen_len=...,
eos_id=[], temperature=..., top_k=..., top_p=..., generator=...)`` and must return something
whose ``output_ids[0]`` (or ``[0]``) holds the generated tokens (a
:class:`~specdec.shared.result.GenerationResult`). One ``torch.Generator`` seeded with ``seed``
drives all ``n_samples`` runs, so a test is deterministic.

Pieces:

* :func:`tiny_model` -- a tiny ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` built in memory with a
  larger init (``init_std``) so its distributions are neither near-uniform nor one-hot, converted
  with :func:`specdec.shared.weights.model_from_hf` (nothing written to disk).
* :func:`exact_sequence_distribution` -- ``{(t1, ..., tn): probability}`` of plain sampling.
* :func:`chi_square_test` / :func:`assert_matches` -- the goodness-of-fit test. Cells whose
  expected count is below ``min_expected`` (5) are pooled into one cell; a sample outside the
  support of the exact distribution fails at once (p-value 0). The chi-square survival function
  is ``torch.special.gammaincc(df / 2, stat / 2)`` (no scipy needed).
* :func:`lossless_check` -- run, collect, test; returns the :class:`ChiSquare` result.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from specdec.ref.model import Model, forward
from specdec.shared.sampling import logits_to_probs

__all__ = [
    "tiny_model",
    "exact_sequence_distribution",
    "ChiSquare",
    "chi_square_sf",
    "chi_square_test",
    "assert_matches",
    "collect_samples",
    "lossless_check",
]


# ---------------------------------------------------------------------------------------------
# Tiny model factory
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def tiny_hf_model(
    family: str = "llama",
    vocab: int = 10,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    init_std: float = 0.5,
    max_pos: int = 256,
    eos: int | list[int] | None = None,
    intermediate: int | None = None,
):
    """The ``transformers`` model behind :func:`tiny_model` (fp32, eval mode, re-initialised)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if family not in ("llama", "qwen2"):
        raise ValueError(f"family must be 'llama' or 'qwen2', got {family!r}")
    kw = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=max_pos, tie_word_embeddings=False,
        eos_token_id=eos, bos_token_id=None, pad_token_id=None,
    )
    cfg = LlamaConfig(**kw) if family == "llama" else Qwen2Config(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(cfg).float().eval()
    # Redraw every parameter with a larger spread: tiny default inits give near-uniform logits.
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(init_std * noise)
    return model


def tiny_model(
    family: str = "llama",
    vocab: int = 10,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    init_std: float = 0.5,
    max_pos: int = 256,
    eos: int | list[int] | None = None,
    intermediate: int | None = None,
) -> Model:
    """A tiny random Llama/Qwen2 as a :class:`Model` (in memory, fp32, CPU, deterministic in ``seed``).

    ``eos`` None means the model has no EOS id (decoders then only stop at ``max_gen_len``).
    """
    from specdec.shared.weights import model_from_hf

    hf = tiny_hf_model(family, vocab, layers, hidden, heads, kv_heads, seed, init_std, max_pos, eos, intermediate)
    return model_from_hf(hf)


# ---------------------------------------------------------------------------------------------
# Exact distribution of the first n sampled tokens
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def exact_sequence_distribution(
    model: Model,
    prompt_ids,
    n_tokens: int = 3,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_prob: float = 0.0,
) -> dict[tuple[int, ...], float]:
    """Exact probability of every sequence of the first ``n_tokens`` tokens sampled after the prompt.

    Level by level: all surviving prefixes (prompt + sequence so far, same length) go through one
    batched :func:`~specdec.ref.model.forward`; their last-position processed distributions
    extend every prefix by every token of nonzero probability. Sequences with probability
    ``<= min_prob`` are dropped (0 keeps the exact support). No EOS handling: run the decoder
    with ``eos_id=[]``.
    """
    if temperature <= 0:
        raise ValueError("exact_sequence_distribution is for sampling (temperature > 0)")
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() == 2:
        if prompt.shape[0] != 1:
            raise ValueError("one prompt at a time")
        prompt = prompt[0]
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n_tokens):
        seqs = list(dist)
        batch = torch.stack([torch.cat([prompt, torch.tensor(s, dtype=torch.long)]) for s in seqs]).to(model.device)
        logits = forward(model, batch)[:, -1].double()
        probs = logits_to_probs(logits, temperature, top_k, top_p).double().cpu()
        probs = probs / probs.sum(-1, keepdim=True)
        new: dict[tuple[int, ...], float] = {}
        for s, row in zip(seqs, probs):
            base = dist[s]
            for t in torch.nonzero(row > 0).flatten().tolist():
                pr = base * float(row[t])
                if pr > min_prob:
                    new[s + (t,)] = pr
        dist = new
    return dist


# ---------------------------------------------------------------------------------------------
# Chi-square goodness of fit
# ---------------------------------------------------------------------------------------------


@dataclass
class ChiSquare:
    """Result of :func:`chi_square_test`."""

    stat: float
    df: int
    pvalue: float
    n: int
    cells: int
    outside_support: int = 0

    def __str__(self) -> str:
        extra = f", {self.outside_support} sample(s) outside the exact support" if self.outside_support else ""
        return f"chi2={self.stat:.2f}, df={self.df}, p={self.pvalue:.3g}, n={self.n}, cells={self.cells}{extra}"


def chi_square_sf(stat: float, df: int) -> float:
    """P(X >= stat) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, stat/2)."""
    if df < 1:
        return 1.0
    if stat <= 0:
        return 1.0
    a = torch.tensor(df / 2.0, dtype=torch.float64)
    x = torch.tensor(stat / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(a, x))


def chi_square_test(samples: Iterable[tuple], exact: dict[tuple, float], min_expected: float = 5.0) -> ChiSquare:
    """Pearson chi-square of ``samples`` against the ``exact`` distribution.

    Cells with expected count < ``min_expected`` are pooled into one cell (if that pooled cell is
    itself still below ``min_expected`` it is merged into the smallest remaining cell). Samples
    outside the support of ``exact`` give p-value 0.
    """
    samples = [tuple(int(t) for t in s) for s in samples]
    n = len(samples)
    if n == 0:
        raise ValueError("no samples")
    total = sum(exact.values())
    counts = Counter(samples)
    outside = sum(c for s, c in counts.items() if s not in exact)
    if outside:
        return ChiSquare(float("inf"), 0, 0.0, n, 0, outside)
    big: list[tuple[float, int]] = []
    small_e, small_o = 0.0, 0
    for s, pr in exact.items():
        e = n * pr / total
        if e >= min_expected:
            big.append((e, counts.get(s, 0)))
        else:
            small_e += e
            small_o += counts.get(s, 0)
    if small_e > 0:
        if small_e >= min_expected or not big:
            big.append((small_e, small_o))
        else:
            i = min(range(len(big)), key=lambda j: big[j][0])
            e, o = big[i]
            big[i] = (e + small_e, o + small_o)
    stat = sum((o - e) ** 2 / e for e, o in big)
    df = len(big) - 1
    return ChiSquare(stat, df, chi_square_sf(stat, df), n, len(big))


def assert_matches(samples: list[tuple], exact: dict[tuple, float], alpha: float = 1e-3, min_expected: float = 5.0) -> ChiSquare:
    """Raise AssertionError when the chi-square test rejects ``samples ~ exact`` at level ``alpha``."""
    res = chi_square_test(samples, exact, min_expected)
    if not res.pvalue >= alpha:
        top = Counter(samples).most_common(5)
        raise AssertionError(f"samples do not follow the exact distribution ({res}); most common samples: {top}")
    return res


# ---------------------------------------------------------------------------------------------
# Running a decoder
# ---------------------------------------------------------------------------------------------


def collect_samples(
    decode_fn: Callable,
    prompt,
    n_samples: int,
    n_tokens: int = 3,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    max_gen_len: int | None = None,
) -> list[tuple[int, ...]]:
    """Run ``decode_fn`` ``n_samples`` times with one generator seeded with ``seed``; first ``n_tokens`` of each.

    Runs with one CPU thread (restored afterwards): for tiny models thread start-up dominates, and
    on a shared 2-core machine this is several times faster.
    """
    prompt = torch.as_tensor(prompt, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt[None]
    gen = torch.Generator().manual_seed(seed)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(n_samples):
            res = decode_fn(input_ids=prompt, prompt_length=prompt.shape[1], max_gen_len=max_gen_len or n_tokens,
                            eos_id=[], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            ids = res.output_ids if hasattr(res, "output_ids") else res[0]
            toks = tuple(int(t) for t in torch.as_tensor(ids).reshape(-1)[:n_tokens].tolist())
            if len(toks) != n_tokens:
                raise AssertionError(f"decoder returned {len(toks)} tokens, expected at least {n_tokens}")
            out.append(toks)
    finally:
        torch.set_num_threads(threads)
    return out


def lossless_check(
    decode_fn: Callable,
    model: Model,
    prompt,
    n_samples: int = 2000,
    n_tokens: int = 3,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    alpha: float = 1e-3,
    max_gen_len: int | None = None,
    exact: dict[tuple, float] | None = None,
) -> ChiSquare:
    """Sample ``n_samples`` outputs of ``decode_fn`` and assert their first ``n_tokens`` follow ``model``'s
    exact sampling distribution (chi-square at level ``alpha``). Returns the test result.

    ``max_gen_len`` defaults to ``n_tokens`` (larger values let drafts run past the tested
    window; the marginal of the first tokens is the same). Pass a precomputed ``exact`` to
    reuse it across decoders.
    """
    if exact is None:
        exact = exact_sequence_distribution(model, prompt, n_tokens, temperature, top_k, top_p)
    samples = collect_samples(decode_fn, prompt, n_samples, n_tokens, temperature, top_k, top_p, seed, max_gen_len)
    return assert_matches(samples, exact, alpha)


def glide_sampling_pvalue(kind: str, draft_vocab: list[int] | None = None) -> float:
    """The chi-square p-value of the reference GLIDE decoders' sampled output (``kind`` "chain": gamma 2, "tree":
    shape (3, 2)) against the exact distribution of a tiny Qwen2 target's next 2 tokens (T 0.9, top-k 4), 500
    samples; ``draft_vocab``: the draft restricted to these target ids (a truncated draft vocabulary)."""
    from specdec.ref.glide import spec_generate, tree_spec_generate
    from specdec.shared.glide import init_glide_weights, with_draft_vocab

    target = tiny_model("qwen2", vocab=8, seed=4)
    glide = init_glide_weights(target.config, window=8, seed=5, std=0.5)
    if draft_vocab is not None:
        glide = with_draft_vocab(glide, draft_vocab)
    prompt = torch.tensor([[1, 2, 3, 4]])
    exact = exact_sequence_distribution(target, prompt, 2, temperature=0.9, top_k=4)
    if kind == "chain":
        def decode(**kw):
            return spec_generate(target, glide, gamma=2, **kw)
    else:
        def decode(**kw):
            return tree_spec_generate(target, glide, tree_shape=(3, 2), **kw)
    return lossless_check(decode, target, prompt, n_samples=500, n_tokens=2, temperature=0.9, top_k=4, exact=exact,
                          max_gen_len=3).pvalue
