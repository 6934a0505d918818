"""Tiny-model and tiny-tokenizer factories the tests share.

Everything here is local and fast (well under a second per model): tiny random
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` models saved with ``save_pretrained``, and a tiny
BPE tokenizer trained on a few strings. Nothing touches the network.

Random init of tiny HF models is nearly degenerate (zero biases, unit norms, small weights give
flat logits and greedy loops of one token), so :func:`reinit_` redraws every parameter with a
larger spread: weights N(0, std), biases N(0, 0.1), norm weights 1 + N(0, 0.1). That makes
logits vary, exercises biases and norm weights, and gives greedy sequences with many tokens.

Usage::

    from helpers import make_tiny_model_dir, make_hf_model   # tests/ is on sys.path under pytest
    path = make_tiny_model_dir(tmp_path, family="qwen2", kv_heads=1)
    model = specdec.ref.load_model(path)
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

__all__ = [
    "run_generate",
    "kernel_device",
    "FAMILIES",
    "make_hf_config",
    "make_hf_model",
    "reinit_",
    "save_hf_model",
    "make_tiny_model_dir",
    "write_bin_checkpoint",
    "make_tiny_tokenizer_dir",
    "TOKENIZER_CORPUS",
    "CHAT_SPECIAL_TOKENS",
]

FAMILIES = ("llama", "qwen2")


def make_hf_config(
    family: str = "llama",
    vocab: int = 96,
    hidden: int | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    intermediate: int = 64,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    tie: bool = False,
    bias: bool | None = None,
    max_pos: int = 256,
    eos: int | list[int] | None = None,
    bos: int | None = None,
    rms_norm_eps: float = 1e-6,
    **extra: Any,
):
    """A transformers ``LlamaConfig`` / ``Qwen2Config`` for a tiny model.

    ``hidden`` defaults to ``heads * head_dim``; ``head_dim`` is written explicitly so a
    ``head_dim != hidden // heads`` config is possible. ``bias`` sets Llama's ``attention_bias``
    (Qwen2 always has q/k/v bias; passing ``bias`` there is ignored).
    """
    from transformers import LlamaConfig, Qwen2Config

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    hidden = heads * head_dim if hidden is None else hidden
    kw: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=tie,
        rope_theta=rope_theta,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
        eos_token_id=eos,
        bos_token_id=bos,
        initializer_range=0.2,
    )
    if family == "llama":
        kw["attention_bias"] = bool(bias)
        cfg = LlamaConfig(**kw, **extra)
    else:
        cfg = Qwen2Config(**kw, **extra)
    cfg._attn_implementation = "eager"
    return cfg


@torch.no_grad()
def reinit_(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Redraw every parameter (in place, deterministic in ``seed``) so tiny models are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith(".bias"):
            p.copy_(0.1 * noise)
        else:
            p.copy_(std * noise)
    return model


def make_hf_model(family: str = "llama", seed: int = 0, std: float = 0.3, **config_kw: Any):
    """A tiny random transformers causal LM in fp32, eval mode, with :func:`reinit_` weights."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cfg = make_hf_config(family, **config_kw)
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM
    model = cls(cfg).float().eval()
    return reinit_(model, seed=seed, std=std)


def write_bin_checkpoint(model, path: str | os.PathLike) -> str:
    """Write ``pytorch_model.bin`` (torch.save of the state dict) + config.json, no safetensors.

    Recent transformers ignore ``safe_serialization=False``, so the ``.bin`` fallback is written
    by hand. Tied ``lm_head.weight`` is dropped, as transformers does.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    return path


def save_hf_model(model, path: str | os.PathLike, shard: bool | str = False, fmt: str = "safetensors", generation_eos: int | list[int] | None = None) -> str:
    """Save ``model`` as an HF-format dir. ``shard=True`` (or a size like ``"20KB"``) gives several
    shards plus the index; ``fmt="bin"`` writes ``pytorch_model.bin``; ``generation_eos`` writes a
    ``generation_config.json`` with that ``eos_token_id``."""
    path = os.fspath(path)
    if fmt == "bin":
        write_bin_checkpoint(model, path)
    elif fmt == "safetensors":
        kw = {}
        if shard:
            kw["max_shard_size"] = shard if isinstance(shard, str) else "20KB"
        model.save_pretrained(path, **kw)
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    gen_file = os.path.join(path, "generation_config.json")
    if generation_eos is not None:
        gen = {}
        if os.path.isfile(gen_file):
            with open(gen_file) as f:
                gen = json.load(f)
        gen["eos_token_id"] = generation_eos
        with open(gen_file, "w") as f:
            json.dump(gen, f)
    return path


def make_tiny_model_dir(
    tmp_path: str | os.PathLike,
    family: str = "llama",
    vocab: int = 96,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    rope_scaling: dict[str, Any] | None = None,
    tie: bool = False,
    bias: bool | None = None,
    shard: bool | str = False,
    seed: int = 0,
    fmt: str = "safetensors",
    name: str | None = None,
    generation_eos: int | list[int] | None = None,
    return_model: bool = False,
    **config_kw: Any,
):
    """Build a tiny random model, save it under ``tmp_path/name`` and return the directory path.

    With ``return_model=True`` returns ``(path, hf_model)`` so the test can compare against it.
    Extra keyword arguments go to :func:`make_hf_config` (``head_dim``, ``max_pos``, ``eos``, ...).
    """
    model = make_hf_model(family, seed=seed, vocab=vocab, layers=layers, heads=heads, kv_heads=kv_heads,
                          rope_scaling=rope_scaling, tie=tie, bias=bias, **config_kw)
    if name is None:
        name = f"{family}-v{vocab}-l{layers}-h{heads}-kv{kv_heads}-s{seed}-{fmt}{'-shard' if shard else ''}{'-tie' if tie else ''}"
        if rope_scaling:
            name += "-" + str(rope_scaling.get("rope_type") or rope_scaling.get("type"))
    path = save_hf_model(model, os.path.join(os.fspath(tmp_path), name), shard=shard, fmt=fmt, generation_eos=generation_eos)
    return (path, model) if return_model else path


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

TOKENIZER_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: write a python function that adds two numbers. ASSISTANT: def add(a, b): return a + b",
    "[INST] <<SYS>> You are helpful. <</SYS>> hello there [/INST]",
    "system user assistant hello world the quick brown fox jumps over the lazy dog",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
]

BASE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
CHAT_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
]


def make_tiny_tokenizer_dir(
    tmp_path: str | os.PathLike,
    name: str = "tok",
    vocab_size: int = 400,
    chat_template: str | None = None,
    specials: list[str] | None = None,
    add_bos: bool = True,
) -> str:
    """Train a tiny byte-level BPE on :data:`TOKENIZER_CORPUS`, wrap it in ``PreTrainedTokenizerFast``,
    save it (optionally with ``chat_template``) and return the directory.

    ``specials``: special tokens besides ``<unk> <s> </s>`` (e.g. :data:`CHAT_SPECIAL_TOKENS`);
    ``add_bos``: the tokenizer prepends ``<s>`` when ``add_special_tokens=True`` (like Llama's).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BASE_SPECIAL_TOKENS + list(specials or []),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    path = os.path.join(os.fspath(tmp_path), name)
    fast.save_pretrained(path)
    return path


def kernel_device() -> str:
    """Where a Triton-kernel test module runs: "cuda", or "cpu" under the Triton interpreter (which
    ``import specdec`` selects on a machine without CUDA); skips the whole module when neither works."""
    import pytest

    import specdec  # noqa: F401 -- picks the interpreter before the kernels are imported
    from specdec.fast import kernels

    if torch.cuda.is_available():
        return "cuda"
    if not kernels.interpreter_active():
        pytest.skip("specdec.fast.kernels was imported without TRITON_INTERPRET=1 and there is no CUDA", allow_module_level=True)
    return "cpu"


def run_generate(capsys, *argv: str) -> tuple[int, str, str]:
    """``specdec generate --backend ref *argv`` in-process: ``(exit code, stdout, stderr)`` (pytest's capsys)."""
    from specdec.cli import main

    rc = main(["generate", "--backend", "ref", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def poisoned_view(shape, dtype, pad: int = 3, permute: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(buffer, view)``: a [B, H, n, D] (or any [B, H, n] / 3-D) view of random values inside a NaN buffer padded
    on every dim, on :func:`kernel_device`; with ``permute`` the buffer is laid out [B, n, H, D] (token-major, cuDNN's
    output layout). A kernel reading or writing past the view meets NaN (see :func:`outside_untouched`)."""
    g = torch.Generator().manual_seed(seed)
    order = (0, 2, 1, 3)[: len(shape)] if permute else tuple(range(len(shape)))
    buf = torch.full([shape[o] + pad for o in order], float("nan"), dtype=dtype)
    view = buf[tuple(slice(1, 1 + shape[o]) for o in order)].permute(*order)   # permute(order) is its own inverse
    view.copy_((torch.randn(shape, generator=g) * 2).to(dtype))
    buf = buf.to(kernel_device())
    return buf, torch.as_strided(buf, view.shape, view.stride(), view.storage_offset())


def outside_untouched(before: torch.Tensor, after: torch.Tensor, view: torch.Tensor) -> bool:
    """Every element of the buffer outside ``view`` kept its bits (NaN stays NaN)."""
    inside = torch.zeros(after.shape, dtype=torch.bool, device=after.device)
    torch.as_strided(inside, view.shape, view.stride(), view.storage_offset()).fill_(True)
    a, b = before[~inside], after[~inside]
    return bool(((a == b) | (a.isnan() & b.isnan())).all())
