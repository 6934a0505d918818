"""Training a GLIDE draft for a frozen target (the LongSpec recipe, docs/design.md §4).

Per step, for a batch of token sequences x [B, T]:

1. **Positions (anchor-offset).** For short sequences (T <= ``anchor_max_seq_len``, ~1200) each
   sequence draws ``k`` in 0..``max_anchor_tokens`` and an offset in 0..``max_pos - T``: its first
   ``k`` tokens keep positions 0..k-1, the rest sit at ``i + offset``. A short training sequence so
   teaches long-context RoPE positions while the first tokens stay "attention sinks".
2. **Frozen target.** The target runs the sequences at those positions (no grad); we keep its
   LAST layer's keys/values (post-RoPE, exactly what its KV cache would hold). Only the layers up to
   the last layer's K/V projection are computed.
3. **Draft forward with a random lag.** Each sequence draws ``lag`` in 1..``max_lag``: draft query
   t sees target keys at t' <= t - lag (at decoding time the target is up to a few tokens behind the
   draft: drafts inside a round see only the verified prefix). Self-attention is causal with the
   sliding window.
4. **Loss.** Cross-entropy of the draft's logits (through the target's frozen lm_head) at t against
   token t + 1. With ``distill = w > 0`` (self-distillation) the loss is
   ``(1 - w) * CE + w * KL(p_target || p_draft)``, where ``p_target`` is the frozen target's own
   next-token distribution at t (same positions): a draft is accepted when it predicts what the
   TARGET says, not what the text says, so matching the target's distribution raises acceptance
   even where the target is wrong. AdamW on the draft layer only; linear warm-up, cosine decay to 10 %.

**Truncated draft vocabulary** (``draft_vocab=`` or a draft that has a ``vocab_map``; docs/design.md §12):
the draft's logits cover only the N mapped target tokens (the lm_head rows of those tokens), so the
cross-entropy is over those N classes; a position whose next token lies OUTSIDE the N is skipped in the
cross-entropy (the draft could never propose it; the loss is the mean over the positions that count,
0 when none does). The distillation term compares the draft with the target's distribution restricted to
the N tokens and renormalised over them. The saved draft keeps the map (``draft_vocab`` in its files).

Held-out metrics are measured in the decoding condition (lag 1, natural positions 0..T-1): the
cross-entropy against the text (``eval_loss``) and the top-1 agreement with the target's greedy
token (``eval_agree``, the fraction of positions where both argmaxes match -- what greedy
acceptance of a chain's first token rewards).

API::

    from specdec.ref import load_model, train_glide
    target = load_model("path/to/target", dtype="bf16", device="cuda")
    res = train_glide(target, texts, tokenizer=tok, seq_len=1024, batch_size=4, steps=2000,
                      save_dir="out/glide", log_path="out/glide/log.jsonl")
    res.glide          # the trained draft (fp32 weights); load_glide("out/glide", target) reloads it
    res.history        # [{step, loss, lr, ...}], res.eval_history [{step, eval_loss}]

``data``: a list of strings (with ``tokenizer``: a Hugging Face tokenizer or any callable
text -> list of ids), a list of 1-D token tensors / lists, or one 1-D tensor. Documents are joined
into one stream (separated by the target's first EOS id, if any) and cut into ``seq_len`` chunks.
Works on CPU (fp32) and CUDA; bf16/fp16 targets are fine (the draft keeps fp32 master weights; set
``amp=True`` to run the draft's matmuls in bf16 autocast on CUDA).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from specdec.ref.glide import glide_full_forward
from specdec.ref.model import Model, attention_layer, causal_mask, embed, forward_step, linear, new_cache, rms_norm, swiglu_mlp
from specdec.shared.glide import GLIDE_WINDOW, Glide, init_glide_weights, load_glide_weights, save_glide, with_draft_vocab
from specdec.shared.rope import apply_rope, rope_cos_sin

__all__ = ["TrainGlideResult", "train_glide", "tokenize_corpus", "make_chunks", "anchor_offset_positions", "target_last_layer_kv", "target_kv_and_logits", "glide_loss",
           "evaluate_glide", "glide_agreement", "to_draft_ids"]


@dataclass
class TrainGlideResult:
    """What :func:`train_glide` returns."""

    glide: Glide
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    initial_eval_loss: float | None = None
    final_eval_loss: float | None = None
    save_dir: str | None = None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    if callable(tokenizer):
        out = tokenizer(text)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(t) for t in out]
    raise TypeError("tokenizer must have .encode(text) or be callable text -> ids")


def tokenize_corpus(data, tokenizer=None) -> list[torch.Tensor]:
    """Normalise ``data`` to a list of 1-D long tensors (one per document)."""
    if isinstance(data, torch.Tensor):
        data = [data] if data.dim() == 1 else list(data)
    docs = []
    for d in data:
        if isinstance(d, str):
            if tokenizer is None:
                raise ValueError("text data needs a tokenizer (or pass pre-tokenized token tensors)")
            d = _encode(tokenizer, d)
        t = torch.as_tensor(d, dtype=torch.long).reshape(-1)
        if t.numel() > 0:
            docs.append(t)
    if not docs:
        raise ValueError("no training data: every document is empty")
    return docs


def make_chunks(docs: Sequence[torch.Tensor], seq_len: int, sep_id: int | None = None) -> torch.Tensor:
    """Join documents into one stream (``sep_id`` between them) and cut it into [N, seq_len] chunks."""
    parts = []
    for i, d in enumerate(docs):
        if i and sep_id is not None:
            parts.append(torch.tensor([sep_id], dtype=torch.long))
        parts.append(d)
    stream = torch.cat(parts)
    if stream.numel() < 2:
        raise ValueError("need at least 2 tokens of data")
    if stream.numel() < seq_len:
        return stream[None]
    n = stream.numel() // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def anchor_offset_positions(batch: int, seq_len: int, max_pos: int, max_anchor_tokens: int = 4, generator=None, device=None) -> torch.Tensor:
    """[B, T] positions: first k (0..max_anchor_tokens) tokens at 0..k-1, the rest at i + offset,
    offset uniform in 0..max_pos - T (one per sequence)."""
    idx = torch.arange(seq_len)
    k = torch.randint(0, max_anchor_tokens + 1, (batch, 1), generator=generator)
    offset = torch.randint(0, max(max_pos - seq_len, 0) + 1, (batch, 1), generator=generator)
    return torch.where(idx[None] < k, idx[None], idx[None] + offset).to(device)


# ---------------------------------------------------------------------------------------------
# Target side: the last layer's K/V
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def target_last_layer_kv(target: Model, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's last-layer keys (post-RoPE) and values [B, Hkv, T, D] for whole sequences, exactly
    what its KV cache would hold after a causal prefill at ``positions``. Skips everything after them."""
    c, w = target.config, target.weights
    b, t = input_ids.shape
    if positions is None:
        positions = torch.arange(t, device=input_ids.device)
    cos, sin = rope_cos_sin(c, positions, dtype=target.dtype)
    mask = causal_mask(0, t, device=input_ids.device)
    x = embed(target, input_ids)
    for i in range(c.num_layers - 1):
        p = f"layers.{i}."
        x = x + attention_layer(target, i, rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps), cos, sin, None, mask,
                                fused=True)   # as the prefill computes it
        x = x + swiglu_mlp(rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps), w, p + "mlp.")
    p = f"layers.{c.num_layers - 1}."
    h = rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
    k = rearrange(linear(h, w, p + "self_attn.k_proj"), "b t (h d) -> b h t d", d=c.head_dim)
    v = rearrange(linear(h, w, p + "self_attn.v_proj"), "b t (h d) -> b h t d", d=c.head_dim)
    return apply_rope(k, cos, sin), v


# ---------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def target_kv_and_logits(target: Model, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A full causal pass of the target at ``positions``: its last layer's keys and values
    [B, Hkv, T, D] (as :func:`target_last_layer_kv`) and its logits [B, T, V] (fp32)."""
    cache = new_cache(target, input_ids.shape[0])
    logits = forward_step(target, input_ids, cache, positions=positions, fused_attention=True)   # a prefill
    return cache.k[-1], cache.v[-1], logits


def to_draft_ids(token_ids: torch.Tensor, vocab_map: torch.Tensor | None) -> torch.Tensor:
    """Target token ids [...] -> draft ids [...] of the truncated vocabulary ``vocab_map`` [N] (sorted),
    -100 (cross-entropy's ``ignore_index``) for tokens outside it; the ids unchanged without a map."""
    if vocab_map is None:
        return token_ids
    vmap = vocab_map.to(token_ids.device)
    pos = torch.searchsorted(vmap, token_ids).clamp(max=vmap.numel() - 1)  # where the id would sit in the sorted map
    return torch.where(vmap[pos] == token_ids, pos, torch.full_like(pos, -100))


def glide_loss(target: Model, glide: Glide, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               lag: int | torch.Tensor = 1, distill: float = 0.0) -> torch.Tensor:
    """The draft's training loss over ``input_ids`` [B, T] (target K/V at ``positions``).

    ``distill = 0``: mean next-token cross-entropy against the text. ``distill = w`` in (0, 1]:
    ``(1 - w) * CE + w * KL(p_target || p_draft)``, the target's distribution taken at the same
    positions (module docstring, step 4). With a truncated draft vocabulary (``glide.vocab_map``) the
    cross-entropy is over the N draft tokens, positions whose next token is outside them skipped, and
    the target's distribution is restricted to the N tokens and renormalised.
    """
    if distill > 0:
        tk, tv, target_logits = target_kv_and_logits(target, input_ids, positions)
    else:
        tk, tv = target_last_layer_kv(target, input_ids, positions)
    logits = glide_full_forward(target, glide, input_ids, tk, tv, positions=positions, lag=lag, fused=True)  # [B, T, V or N]
    # 1. Cross-entropy: the draft's logits at t against the text's token t + 1 (as a draft id; tokens
    #    outside a truncated vocabulary are -100 and skipped).
    draft = rearrange(logits[:, :-1], "b t v -> (b t) v").float()
    labels = to_draft_ids(rearrange(input_ids[:, 1:], "b t -> (b t)"), glide.vocab_map)
    if distill >= 1:
        loss = 0.0
    elif glide.vocab_map is None:
        loss = F.cross_entropy(draft, labels)
    else:  # mean over the positions whose next token the draft can propose (0 if none)
        loss = F.cross_entropy(draft, labels, ignore_index=-100, reduction="sum") / max(int((labels != -100).sum()), 1)
    if distill > 0:
        # 2. KL(p_target || p_draft) per position, averaged over positions (the target restricted to the
        #    draft vocabulary's columns and renormalised over them when there is one).
        teacher_logits = target_logits if glide.vocab_map is None else target_logits[..., glide.vocab_map.to(target_logits.device)]
        teacher = torch.log_softmax(rearrange(teacher_logits[:, :-1], "b t v -> (b t) v").float(), dim=-1)
        kl = F.kl_div(torch.log_softmax(draft, dim=-1), teacher, log_target=True, reduction="batchmean")
        loss = (1 - distill) * loss + distill * kl
    return loss


@torch.no_grad()
def evaluate_glide(target: Model, glide: Glide, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """Held-out loss in the decoding condition: lag 1, natural positions (token-weighted mean)."""
    total, n = 0.0, 0
    for i in range(0, chunks.shape[0], batch_size):
        x = chunks[i : i + batch_size].to(target.device)
        loss = glide_loss(target, glide, x)
        total += float(loss) * x.shape[0] * (x.shape[1] - 1)
        n += x.shape[0] * (x.shape[1] - 1)
    return total / max(n, 1)


@torch.no_grad()
def glide_agreement(target: Model, glide: Glide, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """Top-1 agreement in the decoding condition (lag 1, natural positions): the fraction of positions
    where the draft's argmax (as a target id, through a truncated vocabulary's map) equals the target's
    greedy next token."""
    same, n = 0, 0
    for i in range(0, chunks.shape[0], batch_size):
        x = chunks[i : i + batch_size].to(target.device)
        tk, tv, target_logits = target_kv_and_logits(target, x)
        logits = glide_full_forward(target, glide, x, tk, tv, lag=1)
        guess = logits.argmax(-1) if glide.vocab_map is None else glide.vocab_map.to(logits.device)[logits.argmax(-1)]
        same += int((guess == target_logits.argmax(-1)).sum())
        n += x.numel()
    return same / max(n, 1)


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def train_glide(
    target: Model,
    data,
    *,
    tokenizer=None,
    glide: Glide | str | os.PathLike | None = None,
    eval_data=None,
    eval_fraction: float = 0.05,
    window: int = GLIDE_WINDOW,
    seq_len: int = 1024,
    batch_size: int = 1,
    steps: int = 1000,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    warmup_steps: int = 50,
    grad_clip: float | None = 1.0,
    max_lag: int = 4,
    anchor_offset: bool = True,
    max_anchor_tokens: int = 4,
    anchor_max_seq_len: int = 1200,
    max_offset_pos: int | None = None,
    init_std: float = 0.02,
    eval_every: int | None = 100,
    eval_batches: int | None = None,
    save_dir: str | os.PathLike | None = None,
    save_every: int | None = None,
    log_path: str | os.PathLike | None = None,
    seed: int = 0,
    amp: bool = False,
    distill: float = 0.0,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    draft_vocab: torch.Tensor | Sequence[int] | None = None,
) -> TrainGlideResult:
    """Train a GLIDE draft layer for the frozen ``target`` (see the module docstring for the recipe).

    Args:
        target: the frozen target (any dtype/device; the draft trains on its device).
        data: texts (with ``tokenizer``), token tensors/lists, or one 1-D tensor.
        glide: start from this draft (a :class:`Glide` or a checkpoint path); default a fresh
            init (linear weights N(0, ``init_std``), biases 0, norms 1).
        eval_data: held-out data (same kinds); default: the last ``eval_fraction`` of the chunks.
        window: the draft's self-attention window (kept in the saved config).
        seq_len, batch_size, steps, lr, weight_decay, betas, warmup_steps, grad_clip: optimisation.
        max_lag: target-KV lag drawn uniformly in 1..max_lag per sequence.
        anchor_offset, max_anchor_tokens, anchor_max_seq_len, max_offset_pos: the anchor-offset
            positions (applied when seq_len <= anchor_max_seq_len; offsets up to
            ``max_offset_pos`` (default the target's max_position_embeddings)).
        eval_every: held-out evaluation every so many steps (and at the start and the end).
        eval_batches: cap on held-out batches per evaluation (None = all).
        save_dir: final draft saved here (``config.json`` + ``model.safetensors``, what
            :func:`specdec.ref.load_glide` reads); with ``save_every``, checkpoints in
            ``save_dir/checkpoint-{step}`` (plus ``trainer_state.pt`` with the optimizer).
        log_path: JSONL loss log (one line per step, eval lines carry ``eval_loss``);
            default ``save_dir/train_log.jsonl`` when ``save_dir`` is given.
        amp: bf16 autocast for the draft on CUDA.
        distill: weight in [0, 1] of KL(p_target || p_draft) in the loss (the rest is the text's
            cross-entropy); 0 = the plain LongSpec loss. Evaluations then also log ``eval_agree``.
        draft_vocab: train a draft with a truncated vocabulary: int64 [N] sorted target ids (validated,
            :func:`specdec.shared.glide.validate_draft_vocab`); default: the starting ``glide``'s own map,
            if any, else the full vocabulary. Loss: see the module docstring; the map is saved with the draft.
    """
    if isinstance(distill, bool) or not isinstance(distill, (int, float)) or not 0.0 <= float(distill) <= 1.0:
        raise ValueError(f"distill must be a number in [0, 1] (weight of the target-distillation term), got {distill!r}")
    distill = float(distill)
    dev = target.device
    g = torch.Generator().manual_seed(seed)

    # Data: chunks [N, T]; held-out chunks from eval_data or the tail of the training chunks.
    sep = target.config.eos_token_ids[0] if target.config.eos_token_ids else None
    chunks = make_chunks(tokenize_corpus(data, tokenizer), seq_len, sep)
    if eval_data is not None:
        eval_chunks = make_chunks(tokenize_corpus(eval_data, tokenizer), seq_len, sep)
    elif chunks.shape[0] >= 2 and eval_fraction > 0:
        n_eval = max(1, int(round(chunks.shape[0] * eval_fraction)))
        chunks, eval_chunks = chunks[:-n_eval], chunks[-n_eval:]
    else:
        eval_chunks = None
    if eval_chunks is not None and eval_batches is not None:
        eval_chunks = eval_chunks[: eval_batches * batch_size]
    if int(chunks.max()) >= target.config.vocab_size or int(chunks.min()) < 0:
        raise ValueError(f"token ids must be in [0, {target.config.vocab_size - 1}]")
    t = chunks.shape[1]
    max_pos = max_offset_pos or target.config.max_position_embeddings

    # The draft: fp32 master weights on the target's device, trainable.
    if glide is None:
        glide = init_glide_weights(target.config, window=window, seed=seed, std=init_std, device=dev)
    elif not isinstance(glide, Glide):
        glide = load_glide_weights(glide, target.config, dtype=torch.float32, device=dev, window=window)
    vocab_map = glide.vocab_map if draft_vocab is None else draft_vocab
    weights = {k: v.detach().to(device=dev, dtype=torch.float32).clone().requires_grad_(True) for k, v in glide.weights.items()}
    glide = with_draft_vocab(Glide(glide.config, weights, source="train_glide"), vocab_map)
    decay = [p for k, p in weights.items() if p.dim() >= 2]
    no_decay = [p for k, p in weights.items() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)

    if log_path is None and save_dir is not None:
        log_path = os.path.join(os.fspath(save_dir), "train_log.jsonl")
    log_file = None
    if log_path is not None:
        os.makedirs(os.path.dirname(os.fspath(log_path)) or ".", exist_ok=True)
        log_file = open(log_path, "w")

    def log(rec: dict[str, Any]) -> None:
        if log_file is not None:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    def evaluate(step: int) -> float | None:
        if eval_chunks is None:
            return None
        loss = evaluate_glide(target, glide, eval_chunks, batch_size)
        rec = {"step": step, "eval_loss": loss}
        if distill > 0:
            rec["eval_agree"] = glide_agreement(target, glide, eval_chunks, batch_size)
        result.eval_history.append(rec)
        log(rec)
        return loss

    result = TrainGlideResult(glide=glide, save_dir=os.fspath(save_dir) if save_dir is not None else None)
    result.initial_eval_loss = evaluate(0)

    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc="train_glide", disable=not progress, dynamic_ncols=True)
    use_amp = bool(amp) and dev.type == "cuda"
    t0 = time.perf_counter()
    for step in bar:
        # 1. A batch of chunks, their positions and lags.
        idx = torch.randint(0, chunks.shape[0], (batch_size,), generator=g)
        x = chunks[idx].to(dev)
        if anchor_offset and t <= anchor_max_seq_len and max_pos > t:
            positions = anchor_offset_positions(batch_size, t, max_pos, max_anchor_tokens, g, dev)
        else:
            positions = torch.arange(t, device=dev)[None].expand(batch_size, t)
        lag = torch.randint(1, max_lag + 1, (batch_size,), generator=g).to(dev)
        # 2.-4. Frozen target K/V (and logits when distilling), draft forward, loss, AdamW step.
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup_steps)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = glide_loss(target, glide, x, positions, lag, distill=distill)
        loss_value = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(list(weights.values()), grad_clip)) if grad_clip else None
        opt.step()

        rec = {"step": step + 1, "loss": loss_value, "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm,
               "tokens": (step + 1) * batch_size * t, "elapsed_s": round(time.perf_counter() - t0, 3)}
        result.history.append(rec)
        log(rec)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if on_step is not None:
            on_step(rec)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluate(step + 1)
        if save_dir is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            ckpt = os.path.join(os.fspath(save_dir), f"checkpoint-{step + 1}")
            save_glide(_detached(glide), ckpt)
            torch.save({"step": step + 1, "optimizer": opt.state_dict()}, os.path.join(ckpt, "trainer_state.pt"))
    bar.close()

    result.final_eval_loss = evaluate(steps)
    result.glide = _detached(glide)
    if save_dir is not None:
        save_glide(result.glide, save_dir)
    if log_file is not None:
        log_file.close()
    return result


def _detached(glide: Glide) -> Glide:
    return Glide(glide.config, {k: v.detach().clone() for k, v in glide.weights.items()}, source=glide.source,
                 vocab_map=glide.vocab_map)
