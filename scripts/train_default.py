#!/usr/bin/env python3
"""Train the embedded default model of specdec: a small Python-code LLM, its draft LM and its GLIDE draft.

The corpus is Python source (``scripts/default_corpus.py``: sources ``stdlib`` -- the standard library --
and ``packages`` -- the installed distributions' own ``.py`` files -- with their fixed held-out rules).
Stages, each a subcommand (the defaults reproduce the first, 2048-position stdlib model, shipped until session 22;
the shipped one is scripts/retrain_default.sh's)::

    # 1. byte-level BPE tokenizer (CPU, ~1 min) -> tokenizer.json + tokenizer_config.json
    python scripts/train_default.py tokenizer --vocab 4096 --out shared/assets/default/target
    # 2. tokenize the corpus into int16 token streams (CPU, ~20 s) -> runs/default_data/{train,heldout}.pt
    python scripts/train_default.py pack --tokenizer shared/assets/default/target --out runs/default_data
    #    (--sources stdlib,packages adds the installed packages; --stdlib-root a copied stdlib)
    # 3. target (14 layers) then draft LM (2 layers, distilled from the target) on the GPU
    python scripts/train_default.py lm --data runs/default_data --tokenizer shared/assets/default/target \
        --out runs/default_lm --target-minutes 5 --draft-minutes 1.5
    #    (--seq 8192 --max-positions 8192 trains on 8192-token windows and saves an 8192-position config)
    # 4. GLIDE draft with the project's LongSpec recipe (specdec.ref.train_glide.train_glide)
    python scripts/train_default.py glide --target shared/assets/default/target --data runs/default_data --out runs/default_glide
    # held-out loss of any saved HF-format LM (CPU or GPU), per source when the data has per-source streams
    python scripts/train_default.py eval --model shared/assets/default/target --data runs/default_data

``pack`` writes ``train.pt`` and ``heldout.pt`` (every selected source, stdlib first), one held-out stream
per source (``heldout_stdlib.pt``, ``heldout_packages.pt``), ``meta.json`` (token counts) and
``manifest.json`` (the interpreter, and every distribution used by name and version with its file, byte and
held-out counts). With ``--sources stdlib`` (the default) ``train.pt``/``heldout.pt`` are exactly what they
were before the packages source existed.

``lm`` and ``glide`` write ``*.jsonl`` logs (held-out loss over training; one loss per source and their
unweighted mean when the data has several sources) next to the weights. The weights are saved with
``save_pretrained(safe_serialization=True)`` in bf16, with ``--max-positions`` as the config's
``max_position_embeddings`` (and the copied tokenizer's ``model_max_length``); windows never exceed it
(RoPE is applied at positions 0..seq-1 of each window). ``--steps`` fixes the number of optimizer steps
(exact reproduction); without it, ``--*-minutes`` measures the step time after a warm-up and sets the step
count from the time budget (the count is logged, so a run can be repeated with ``--steps``). The checkpoint
with the best held-out loss is kept (the stdlib alone is small: ~9M tokens). ``--eval-tokens`` caps each
held-out stream during training to evenly spaced windows (the full streams: ``eval``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default_corpus  # noqa: E402

SPECIALS = ["<s>", "</s>", "<pad>"]
SEQ_UL_NGRAM = 4   # the sequence-level unlikelihood's repeats: 4-grams, issue 21's distinct-4-gram measure
SEQ_UL_MARKS = ("all", "entry")   # which tokens of a repeat it pushes down (repeated_ngram_mask's ``marks``)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Architectures (Llama, tied embeddings, head_dim 64 so the fast kernels apply).
TARGET_ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=14, num_attention_heads=4, num_key_value_heads=2)
DRAFT_ARCH = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1)
MAX_POSITIONS = 2048  # the default --max-positions (the shipped model's); --seq may not exceed it
ROPE_THETA = 10000.0


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer(vocab: int, out: str, root: str | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = root or default_corpus.stdlib_root()
    train, _ = default_corpus.split_corpus(root)
    texts = [default_corpus.read_text(os.path.join(root, r)) for r in train]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    t0 = time.time()
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # encode() adds <s> in front (the model was trained on "<s> file </s>"); decode(skip_special_tokens) drops it.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False, model_max_length=MAX_POSITIONS)
    os.makedirs(out, exist_ok=True)
    fast.save_pretrained(out)
    # Name the class every transformers version knows (v5 writes its new alias "TokenizersBackend").
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    log(f"tokenizer: vocab {tok.get_vocab_size()} trained on {len(texts)} files in {time.time() - t0:.1f}s -> {out}")


def load_hf_tokenizer(path: str):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.model_max_length = 10**9  # whole files are tokenized at once; windows are cut later
    return tok


def encode_file(tok, text: str) -> list[int]:
    """``<s>`` + tokens + ``</s>`` (the tokenizer's post-processor adds the ``<s>``)."""
    return tok(text)["input_ids"] + [tok.eos_token_id]


# ---------------------------------------------------------------------------------------------
# 2. pack
# ---------------------------------------------------------------------------------------------


ENCODE_CHUNK_FILES = 256


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    """``<s>`` + tokens + ``</s>`` for every text, concatenated in order, as int16 (tokenized in chunks
    of files, which gives the same ids as one call over all of them: each file is encoded alone)."""
    if len(tok) > 2**15:
        raise ValueError(f"vocabulary of {len(tok)} tokens does not fit the int16 streams")
    parts = []
    for i in range(0, len(texts), ENCODE_CHUNK_FILES):
        enc = tok(texts[i:i + ENCODE_CHUNK_FILES])["input_ids"]
        parts.append(torch.tensor([t for e in enc for t in e + [tok.eos_token_id]], dtype=torch.int16))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int16)


def _cap_package_train(files: list, max_train_mb: float) -> list:
    """At most ``max_train_mb`` MB of packages training files: the files whose sha256(key) comes first
    (a deterministic sample that does not depend on what else is installed), kept in corpus order."""
    if max_train_mb <= 0:
        return files
    import hashlib

    budget, keep = max_train_mb * 1e6, set()
    for c in sorted(files, key=lambda c: hashlib.sha256(c.key.encode("utf-8")).hexdigest()):
        if budget - c.nbytes < 0:
            continue
        budget -= c.nbytes
        keep.add(c.key)
    return [c for c in files if c.key in keep]


def _stats(n_files: int, nbytes: int, stream: torch.Tensor) -> dict:
    n = stream.numel()
    return {"files": n_files, "tokens": n, "bytes": nbytes, "bytes_per_token": round(nbytes / n, 3) if n else None}


def pack(tokenizer: str, out: str, root: str | None = None, sources: str | list[str] = "stdlib",
         dists=None, max_train_mb: float = 0.0, stdlib_repeat: int = 1) -> dict:
    """Tokenize the selected sources into ``out``: ``train.pt``, ``heldout.pt`` (stdlib first, then
    packages), ``heldout_<source>.pt`` per source, ``meta.json`` and ``manifest.json``. ``root``: the stdlib
    tree (default this interpreter's); ``dists``: the distributions for ``packages`` (default the
    installed ones); ``max_train_mb``: cap on the packages' training bytes (0: none); ``stdlib_repeat``: the
    stdlib's training stream appears that many times in ``train.pt`` (its weight in the random windows of a
    mixture; held-out streams are never repeated). Returns meta."""
    sources = default_corpus.parse_sources(sources)
    if max_train_mb < 0:
        raise ValueError(f"--max-train-mb: got {max_train_mb}; expected 0 (no cap) or a positive number of MB")
    if isinstance(stdlib_repeat, bool) or not isinstance(stdlib_repeat, int) or not 1 <= stdlib_repeat <= 100:
        raise ValueError(f"--stdlib-repeat: got {stdlib_repeat!r}; expected an int in [1, 100]")
    root = root or default_corpus.stdlib_root()
    tok = load_hf_tokenizer(tokenizer)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    # Per source: (train texts, held-out texts, held-out names).
    parts: dict[str, tuple[list[str], list[str], list[str]]] = {}
    manifest: dict = {"python": sys.version.split()[0], "sources": sources, "stdlib_root": root}
    version_file = os.path.join(root, "PYTHON_VERSION")  # written by default_corpus.export_stdlib
    if os.path.isfile(version_file):
        with open(version_file) as f:
            manifest["stdlib_python"] = f.read().strip()
    if "stdlib" in sources:
        train, held = default_corpus.split_corpus(root)
        parts["stdlib"] = ([default_corpus.read_text(os.path.join(root, r)) for r in train],
                           [default_corpus.read_text(os.path.join(root, r)) for r in held], held)
        manifest["stdlib"] = {"train_files": len(train), "heldout_files": len(held), "heldout": held}
    if "packages" in sources:
        corpus = default_corpus.select_packages(dists, stdlib=root)
        n_before = len(corpus.train)
        corpus = corpus._replace(train=_cap_package_train(corpus.train, max_train_mb))
        manifest["packages"] = default_corpus.packages_manifest(corpus, root)
        manifest["packages"]["max_train_mb"] = max_train_mb or None
        manifest["packages"]["train_files_dropped_by_cap"] = n_before - len(corpus.train)
        parts["packages"] = ([default_corpus.read_text(c.path) for c in corpus.train],
                             [default_corpus.read_text(c.path) for c in corpus.heldout], [c.key for c in corpus.heldout])
    meta: dict = {"stdlib": root, "python": sys.version.split()[0], "vocab_size": len(tok)}
    streams: dict[str, list[torch.Tensor]] = {"train": [], "heldout": []}
    totals = {"train": [0, 0], "heldout": [0, 0]}  # files, bytes
    per_source: dict[str, dict] = {}
    for src in sources:
        tr_texts, he_texts, _ = parts[src]
        per_source[src] = {}
        for name, texts in (("train", tr_texts), ("heldout", he_texts)):
            st = encode_stream(tok, texts)
            nbytes = sum(len(t.encode("utf-8")) for t in texts)
            streams[name].append(st.repeat(stdlib_repeat) if (src, name) == ("stdlib", "train") else st)
            totals[name][0] += len(texts)
            totals[name][1] += nbytes
            per_source[src][name] = _stats(len(texts), nbytes, st)
            if name == "heldout":
                torch.save(st, os.path.join(out, f"heldout_{src}.pt"))
            log(f"{src} {name}: {len(texts)} files, {nbytes / 1e6:.2f} MB, {st.numel() / 1e6:.3f}M tokens")
    for name in ("train", "heldout"):
        st = torch.cat(streams[name])
        torch.save(st, os.path.join(out, f"{name}.pt"))
        meta[name] = _stats(totals[name][0], totals[name][1], st)
        if name == "heldout":
            meta["heldout_files"] = [n for src in sources for n in parts[src][2]]
        log(f"{name}: {meta[name]['files']} files, {totals[name][1] / 1e6:.2f} MB, {st.numel() / 1e6:.3f}M tokens "
            f"({meta[name]['bytes_per_token']} bytes/token)")
    meta["sources"] = sources
    meta["stdlib_repeat"] = stdlib_repeat
    meta["per_source"] = per_source
    manifest["tokens"] = per_source
    manifest["stdlib_repeat"] = stdlib_repeat
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    log(f"pack: {', '.join(sources)} -> {out} in {time.time() - t0:.1f}s")
    return meta


def load_streams(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token streams of a ``pack`` directory, as int64."""
    tr = torch.load(os.path.join(data, "train.pt")).long()
    he = torch.load(os.path.join(data, "heldout.pt")).long()
    return tr, he


def source_train_stream(data: str, train_s: torch.Tensor, source: str) -> torch.Tensor:
    """The part of a ``pack`` directory's training stream that ``source`` contributed (one copy of the stdlib's
    when ``--stdlib-repeat`` > 1), located from ``meta.json``'s per-source token counts: ``pack`` concatenates the
    sources in order, the stdlib's stream repeated. ``"all"``: the whole stream."""
    if source == "all":
        return train_s
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    per, order = meta.get("per_source", {}), meta.get("sources", [])
    if source not in per or source not in order:
        raise ValueError(f"--seq-ul-source: {source!r} is not a source of {data} (it has: all, {', '.join(order)})")
    copies = {s: meta.get("stdlib_repeat", 1) if s == "stdlib" else 1 for s in order}
    sizes = [per[s]["train"]["tokens"] * copies[s] for s in order]
    if sum(sizes) != train_s.numel():
        raise ValueError(f"--seq-ul-source: {data}/meta.json counts {sum(sizes)} training tokens, train.pt has {train_s.numel()}")
    start = sum(sizes[: order.index(source)])
    return train_s[start: start + per[source]["train"]["tokens"]]


def load_heldout_sources(data: str) -> dict[str, torch.Tensor]:
    """The per-source held-out streams of a ``pack`` directory ({source: int64 stream}, non-empty ones,
    in source order); ``{"heldout": heldout.pt}`` for a directory packed before per-source streams existed."""
    out = {}
    for src in default_corpus.SOURCES:
        p = os.path.join(data, f"heldout_{src}.pt")
        if os.path.isfile(p):
            st = torch.load(p).long()
            if st.numel() > 1:
                out[src] = st
    return out or {"heldout": torch.load(os.path.join(data, "heldout.pt")).long()}


def window_starts(stream: torch.Tensor, seq: int, max_tokens: int = 0) -> list[int]:
    """Starts of the non-overlapping ``seq``-token windows of ``stream`` used for evaluation: all of them
    (with the tail) when ``max_tokens`` is 0 or covers the stream, else about ``max_tokens // seq``
    windows spread evenly over it (no tail)."""
    n = (stream.numel() - 1) // seq
    if max_tokens <= 0 or stream.numel() <= max_tokens or n <= max(1, max_tokens // seq):
        return [i * seq for i in range(n)]
    k = max(1, max_tokens // seq)
    return sorted({(j * n // k) * seq for j in range(k)})


# ---------------------------------------------------------------------------------------------
# 3. language models
# ---------------------------------------------------------------------------------------------


def make_config(arch: dict, tok, max_positions: int = MAX_POSITIONS, rope_theta: float = ROPE_THETA):
    """The Llama config of ``arch`` with the tokenizer's specials, ``max_positions`` positions and RoPE base ``rope_theta``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=max_positions, rms_norm_eps=1e-5, rope_theta=rope_theta,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        head_dim=arch["hidden_size"] // arch["num_attention_heads"], hidden_act="silu", attention_bias=False, **arch,
    )


def get_batch(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator, device) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)[None]
    return stream[idx].to(device, non_blocking=True)


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq: int, device, batch: int | None = None, max_tokens: int = 0) -> float:
    """Mean next-token cross-entropy (nats/token) over non-overlapping ``seq``-token windows of a held-out
    stream (``window_starts``: all of them and the tail, or evenly spaced ones up to ``max_tokens``).
    ``batch`` windows per forward (default 16k tokens' worth)."""
    model.eval()
    batch = batch or max(1, 16384 // seq)
    n = (stream.numel() - 1) // seq
    starts = window_starts(stream, seq, max_tokens)
    chunks = [torch.stack([stream[i: i + seq + 1] for i in starts[j:j + batch]]) for j in range(0, len(starts), batch)]
    if len(starts) == n:  # the whole stream: the tail too
        tail = stream[n * seq:]
        if tail.numel() > 1:
            chunks.append(tail[None])
    total, count = 0.0, 0
    use_amp = device.type == "cuda"
    for w in chunks:
        w = w.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=w[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += w[:, 1:].numel()
    model.train()
    return total / count


def heldout_losses(model, streams: dict[str, torch.Tensor], seq: int, device, max_tokens: int = 0) -> dict[str, float]:
    """``heldout_loss`` per held-out stream, plus ``"mean"``: their unweighted mean (each source counts
    the same, however many tokens it has)."""
    out = {k: heldout_loss(model, v, seq, device, max_tokens=max_tokens) for k, v in streams.items()}
    out["mean"] = sum(out.values()) / len(out)
    return out


def _loss_record(losses: dict[str, float]) -> dict[str, float]:
    """Log fields: ``heldout_loss`` (the mean: what picks the best checkpoint) and, with several
    sources, ``heldout_loss_<source>``."""
    rec = {"heldout_loss": losses["mean"]}
    if len(losses) > 2:
        rec.update({f"heldout_loss_{k}": v for k, v in losses.items() if k != "mean"})
    return rec


def unlikelihood_loss(logits: torch.Tensor, inp: torch.Tensor, tgt: torch.Tensor, window: int) -> torch.Tensor:
    """Token-level unlikelihood (Welleck et al., 2019, "Neural text generation with unlikelihood training"),
    restricted to a recent window: at each position t the *negative candidates* are the distinct tokens among
    the last ``window`` context tokens ``inp[:, t - window + 1 : t + 1]`` other than the true next token
    ``tgt[:, t]``; the loss is ``-sum_c log(1 - p(c | context))`` over them, averaged over positions.

    It pushes down the probability of repeating a recent token where the data does not repeat it -- the
    training-time counterpart of the loops greedy decoding falls into; decoding itself stays plain greedy.

    Shapes: ``logits`` [B, T, V], ``inp`` / ``tgt`` [B, T] (``tgt[:, t]`` is the token after ``inp[:, t]``).
    """
    if window < 1:
        raise ValueError(f"window: got {window}; expected an integer >= 1")
    b, t = inp.shape
    logp = torch.log_softmax(logits.float(), -1)                                  # [B, T, V]
    pos = torch.arange(t, device=inp.device)
    k = torch.arange(min(window, t), device=inp.device)
    src = pos[:, None] - k[None, :]                                               # [T, K]: the candidate's position
    cand = inp[:, src.clamp(min=0)]                                               # [B, T, K]
    valid = (src >= 0)[None] & (cand != tgt[..., None])
    # each distinct token once: drop a candidate already seen at a nearer offset
    dup = (cand[..., :, None] == cand[..., None, :]) & (k[:, None] > k[None, :])[None, None]   # [B, T, K, K]
    valid &= ~dup.any(-1)
    p = logp.gather(-1, cand).exp()                                               # [B, T, K]
    nll = -torch.log1p(-p.clamp(max=1 - 1e-6))
    return (nll * valid).sum() / (b * t)


def repeated_ngram_mask(seq: torch.Tensor, start: int, n: int = 4, marks: str = "all") -> torch.Tensor:
    """Where a greedy continuation repeats itself: ``[B, L]`` bool over positions ``t >= start`` of the continuation
    ``seq[:, start:]``. An n-gram of the continuation is a *repeat* when it already occurred earlier in the
    continuation. The prompt ``seq[:, :start]`` is never marked and its n-grams do not count: the same measure as
    issue 21's distinct-4-gram share of a completion.

    ``marks="all"``: every token inside a repeat is marked (Welleck et al.'s sequence-level candidates).
    ``marks="entry"``: only a loop's entry -- for each maximal run of consecutive repeats, the token that completes
    the run's first one (the choice that closed the first repeated n-gram); the loop's later tokens are not pushed."""
    if n < 1:
        raise ValueError(f"n: got {n}; expected an integer >= 1")
    if marks not in SEQ_UL_MARKS:
        raise ValueError(f"marks: got {marks!r}; expected one of {SEQ_UL_MARKS}")
    b, length = seq.shape
    mask = torch.zeros(b, length, dtype=torch.bool, device=seq.device)
    cont = seq[:, start:]
    g = cont.shape[1] - n + 1                                                     # n-grams in the continuation
    if g < 2:
        return mask
    grams = cont.unfold(1, n, 1)                                                  # [B, G, n]
    same = (grams[:, :, None, :] == grams[:, None, :, :]).all(-1)                 # [B, G, G]: gram j == gram i
    earlier = torch.ones(g, g, dtype=torch.bool, device=seq.device).tril(-1)      # [j, i]: i < j
    repeat = (same & earlier).any(-1)                                             # [B, G]: gram j seen before
    if marks == "entry":
        first = repeat.clone()
        first[:, 1:] &= ~repeat[:, :-1]                                           # gram j repeats, gram j-1 did not
        mask[:, start + n - 1: start + n - 1 + g] = first                        # the gram's last token closed it
        return mask
    for k in range(n):
        mask[:, start + k: start + k + g] |= repeat
    return mask


@torch.no_grad()
def greedy_continue(model, prefix: torch.Tensor, n_new: int, use_amp: bool) -> torch.Tensor:
    """``prefix`` [B, P] followed by the model's own greedy continuation of ``n_new`` tokens (KV cache, no EOS
    stop): ``[B, P + n_new]``. The model is put back in training mode."""
    import inspect

    # transformers renamed the cache argument (``past_key_values`` -> ``cache``); use whichever this version has
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model.eval()
    seq = prefix
    past = None
    nxt = prefix
    for _ in range(n_new):
        with torch.autocast(prefix.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(input_ids=nxt, use_cache=True, **({key: past} if past is not None else {}))
        past = out.get("cache", None)
        if past is None:
            past = out.past_key_values
        nxt = out.logits[:, -1].float().argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    model.train()
    return seq


def seq_unlikelihood_loss(model, prefix: torch.Tensor, n_new: int, n: int, use_amp: bool,
                          marks: str = "all") -> tuple[torch.Tensor, float]:
    """Sequence-level unlikelihood (Welleck et al., 2019, section 5.2): continue ``prefix`` greedily for
    ``n_new`` tokens with the model itself, mark the continuation's tokens that lie in a repeated ``n``-gram
    (:func:`repeated_ngram_mask` with ``marks``), and return ``-sum log(1 - p(x_t | x_<t))`` over the marked tokens divided by
    ``B * n_new``, with the share of marked continuation tokens (how much the model loops right now).

    It trains on the model's own loops -- the degeneration greedy decoding shows -- where the token-level term
    only sees the data's contexts; decoding itself stays plain greedy."""
    seq = greedy_continue(model, prefix, n_new, use_amp)
    start = prefix.shape[1]
    mask = repeated_ngram_mask(seq, start, n, marks)[:, 1:]                       # [B, L-1]: is token t+1 a negative
    with torch.autocast(prefix.device.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = model(input_ids=seq[:, :-1]).logits
    logp = torch.log_softmax(logits.float(), -1).gather(-1, seq[:, 1:, None]).squeeze(-1)   # [B, L-1]
    nll = -torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
    share = float(mask.sum()) / (seq.shape[0] * n_new)
    return (nll * mask).sum() / (seq.shape[0] * n_new), share


def kl_to_frozen(frozen, inp: torch.Tensor, logits: torch.Tensor, use_amp: bool) -> torch.Tensor:
    """``KL(frozen || model)`` per token (mean over the ``B * T`` positions): the frozen model's next-token
    distribution on ``inp`` [B, T] against the trained model's ``logits`` [B, T, V] -- the draft's distillation
    toward its teacher and the target's anchor to the model it continues."""
    with torch.no_grad(), torch.autocast(inp.device.type, dtype=torch.bfloat16, enabled=use_amp):
        f_logits = frozen(input_ids=inp).logits
    return torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1).flatten(0, 1),
                                      torch.log_softmax(f_logits.float(), -1).flatten(0, 1), log_target=True, reduction="batchmean")


def train_lm(name: str, arch: dict, tok, train_s, held: dict[str, torch.Tensor], args, device, teacher=None,
             anchor=None, prefix_s=None) -> tuple[object, dict]:
    """Train one LM on random ``args.seq``-token windows of ``train_s`` (module docstring); returns the
    best held-out checkpoint (by the mean over ``held``'s streams) and a summary.

    ``teacher``: the draft's distillation target (``--kd-weight``). ``anchor``: for the target, a frozen copy of
    the model it continues (``--anchor-weight`` w): the data term becomes ``(1 - w) CE + w KL(anchor || model)``,
    so an unlikelihood fine-tune keeps the anchor's distribution where the data does not loop. ``prefix_s``: the
    stream the sequence-level term's prefixes come from (default ``train_s``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = make_config(arch, tok, args.max_positions, args.rope_theta)
    init = args.init if name == "target" else args.draft_init
    if init:  # continue a saved LM (a short-window phase; a draft for a changed target) at this run's windows and positions
        model = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32)
        got = {k: getattr(model.config, k) for k in arch}
        if got != dict(arch) or model.config.vocab_size != cfg.vocab_size:
            flag = "--init" if name == "target" else "--draft-init"
            raise ValueError(f"{flag}: {init} has shape {got} and vocabulary {model.config.vocab_size}; this run trains "
                             f"{dict(arch)} over {cfg.vocab_size} tokens (give the same --{name}-arch)")
        model.config.max_position_embeddings = args.max_positions
        model = model.to(device)
        log(f"[{name}] initialised from {init}")
    else:
        model = LlamaForCausalLM(cfg).to(device)
    model.config.use_cache = False
    nparams = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {nparams / 1e6:.2f}M parameters, arch {arch}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    lr = args.lr if teacher is None else args.draft_lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed + (0 if teacher is None else 1))
    seq_gen = torch.Generator().manual_seed(args.seed + 2)   # the sequence-level prefixes: the CE batches stay as without them
    seq_rep = None
    fixed_steps = args.steps if teacher is None else args.draft_steps
    minutes = args.target_minutes if teacher is None else args.draft_minutes
    total = fixed_steps or 10**9
    warmup = args.warmup
    use_amp = device.type == "cuda"
    logf = open(os.path.join(args.out, f"{name}_log.jsonl"), "w")
    best, best_state, best_losses = float("inf"), None, None
    t_start = time.time()
    step = 0
    tokens_seen = 0
    while step < total:
        if step == 20 and not fixed_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_timer) / 10
            total = max(step + 1, int(minutes * 60 / per_step * 0.93))  # 7% left for evaluations
            log(f"[{name}] {per_step * 1000:.1f} ms/step -> {total} steps in {minutes} min")
        if step == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_timer = time.time()
        # cosine schedule with linear warm-up, down to 10% of the peak
        if step < warmup:
            cur = lr * (step + 1) / warmup
        else:
            frac = (step - warmup) / max(1, (total if total < 10**9 else step + 1) - warmup)
            cur = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = cur
        x = get_batch(train_s, args.batch, args.seq, gen, device)
        inp, tgt = x[:, :-1], x[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=inp).logits
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss = ce
        akl = None
        if anchor is not None:
            akl = kl_to_frozen(anchor, inp, logits, use_amp)
            loss = (1 - args.anchor_weight) * ce + args.anchor_weight * akl
        ul = None
        if teacher is None and args.unlikelihood > 0:   # the target only: the drafts imitate it
            ul = unlikelihood_loss(logits, inp, tgt, args.ul_window)
            loss = loss + args.unlikelihood * ul
        if teacher is None and args.seq_unlikelihood > 0 and step % args.seq_ul_every == 0:
            prefix = get_batch(train_s if prefix_s is None else prefix_s, args.seq_ul_batch, args.seq_ul_prefix - 1, seq_gen, device)
            sul, seq_rep = seq_unlikelihood_loss(model, prefix, args.seq_ul_len, SEQ_UL_NGRAM, use_amp, args.seq_ul_marks)
            loss = loss + args.seq_unlikelihood * sul
        if teacher is not None:
            kd = kl_to_frozen(teacher, inp, logits, use_amp)
            loss = (1 - args.kd_weight) * ce + args.kd_weight * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += inp.numel()
        if step % args.eval_every == 0 or step == total:
            losses = heldout_losses(model, held, args.seq, device, max_tokens=args.eval_tokens)
            hl = losses["mean"]
            rec = {"model": name, "step": step, "total_steps": total, "tokens": tokens_seen, "lr": cur, "train_ce": float(ce.detach()),
                   **({"train_ul": float(ul.detach())} if ul is not None else {}),
                   **({"seq_rep": seq_rep} if seq_rep is not None else {}),
                   **({"train_anchor_kl": float(akl.detach())} if akl is not None else {}),
                   **_loss_record(losses), "elapsed_s": round(time.time() - t_start, 1)}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log(json.dumps(rec))
            if hl < best:
                best, best_losses = hl, losses
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    logf.close()
    if best_state is not None and args.keep == "best":
        model.load_state_dict(best_state)
    summary = {"model": name, "params": nparams, "steps": total, "tokens": tokens_seen, "best_heldout_loss": best, "kept": args.keep,
               **({"last_heldout_loss": hl} if args.keep == "last" else {}),
               "train_minutes": round((time.time() - t_start) / 60, 2), "arch": arch, "batch": args.batch, "seq": args.seq, "lr": lr,
               "max_positions": args.max_positions, "rope_theta": args.rope_theta}
    if teacher is None and args.unlikelihood > 0:
        summary["unlikelihood"] = {"weight": args.unlikelihood, "window": args.ul_window}
    if anchor is not None:
        summary["anchor"] = {"weight": args.anchor_weight, "model": args.init}
    if teacher is None and args.seq_unlikelihood > 0:
        summary["seq_unlikelihood"] = {"weight": args.seq_unlikelihood, "every": args.seq_ul_every, "batch": args.seq_ul_batch,
                                       "prefix": args.seq_ul_prefix, "new_tokens": args.seq_ul_len, "ngram": SEQ_UL_NGRAM,
                                       "source": args.seq_ul_source, "marks": args.seq_ul_marks}
    if best_losses is not None and len(best_losses) > 2:
        summary["best_heldout_loss_by_source"] = {k: v for k, v in best_losses.items() if k != "mean"}
    log(f"[{name}] done: {json.dumps(summary)}")
    return model, summary


def save_lm(model, tok, out: str) -> None:
    """bf16 safetensors + config + generation config + the tokenizer files, whose ``model_max_length``
    follows the model's ``max_position_embeddings`` (the tokenizer itself is unchanged)."""
    from transformers import GenerationConfig

    os.makedirs(out, exist_ok=True)
    m = model.to(torch.bfloat16)
    m.config.use_cache = True
    m.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m.save_pretrained(out, safe_serialization=True)
    for fn in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tok.name_or_path, fn)):
            shutil.copy(os.path.join(tok.name_or_path, fn), os.path.join(out, fn))
    cfg_path = os.path.join(out, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            tcfg = json.load(f)
        if tcfg.get("model_max_length") != m.config.max_position_embeddings:
            tcfg["model_max_length"] = m.config.max_position_embeddings
            with open(cfg_path, "w") as f:
                json.dump(tcfg, f, indent=2)


def frozen(model, device):
    """A teacher or anchor: ``model`` (a LlamaForCausalLM, or the saved LM directory to load it from) in fp32 on
    ``device``, in eval mode, every parameter without gradients."""
    if isinstance(model, str):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32)
    model = model.to(device=device, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cmd_lm(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tok = load_hf_tokenizer(args.tokenizer)
    train_s, _ = load_streams(args.data)
    held = load_heldout_sources(args.data)
    if train_s.numel() <= args.seq + 1:
        raise ValueError(f"--seq: {args.seq} needs a training stream longer than {args.seq + 1} tokens; {args.data} has {train_s.numel()}")
    log(f"device {device}, torch {torch.__version__}, train {train_s.numel() / 1e6:.2f}M tokens, held-out "
        + ", ".join(f"{k} {v.numel() / 1e3:.1f}k" for k, v in held.items()) + " tokens"
        + (f" (evaluated on <= {args.eval_tokens} tokens each during training)" if args.eval_tokens else ""))
    os.makedirs(args.out, exist_ok=True)
    summaries = []
    target = None
    if "target" in args.which:
        anchor = frozen(args.init, device) if args.anchor_weight > 0 else None   # the model the target continues
        prefix_s = source_train_stream(args.data, train_s, args.seq_ul_source) if args.seq_unlikelihood > 0 else None
        target, s = train_lm("target", args.target_arch, tok, train_s, held, args, device, anchor=anchor, prefix_s=prefix_s)
        summaries.append(s)
        save_lm(target, tok, os.path.join(args.out, "target"))
    if "draft" in args.which:
        target = frozen(target if target is not None else args.teacher or os.path.join(args.out, "target"), device)
        if args.seq > target.config.max_position_embeddings:
            raise ValueError(f"--seq: {args.seq} exceeds the teacher's max_position_embeddings ({target.config.max_position_embeddings}); "
                             "train the draft at --seq <= it (or give --teacher a longer-context target)")
        draft, s = train_lm("draft", args.draft_arch, tok, train_s, held, args, device, teacher=target if args.kd_weight > 0 else None)
        summaries.append(s)
        save_lm(draft, tok, os.path.join(args.out, "draft"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=1)


# ---------------------------------------------------------------------------------------------
# 4. GLIDE draft (the project's LongSpec recipe)
# ---------------------------------------------------------------------------------------------


def glide_eval_stream(held: dict[str, torch.Tensor], seq: int, max_tokens: int = 0) -> torch.Tensor:
    """The GLIDE's held-out data: each held-out stream cut to whole ``seq``-token windows (all of them,
    or about ``max_tokens`` worth spread evenly), concatenated so that no window straddles two sources."""
    parts = []
    for st in held.values():
        if max_tokens <= 0 or st.numel() <= max_tokens:
            parts.append(st[: (st.numel() // seq) * seq])
        else:
            parts.extend(st[i: i + seq] for i in window_starts(st, seq, max_tokens))
    return torch.cat(parts)


def cmd_glide(args) -> None:
    """GLIDE draft for a target with ``specdec.ref.train_glide`` (LongSpec recipe: frozen target, its
    last-layer KV with a random lag 1..4, anchor-offset positions up to ``--max-positions`` (default the
    target's ``max_position_embeddings``) when ``--seq`` <= 1200, natural positions 0..seq-1 beyond). Held-out = the
    held-out streams of ``--data`` (per source at the end). With ``--minutes`` (and no ``--steps``) a short
    calibration run measures the step time first."""
    from specdec.ref import load_model
    from specdec.ref.train_glide import evaluate_glide, train_glide
    from specdec.shared.glide import Glide, save_glide

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = load_model(args.target, dtype=dtype, device=device)
    limit = target.config.max_position_embeddings
    if args.seq > limit:
        raise ValueError(f"--seq: {args.seq} exceeds the target's max_position_embeddings ({limit}, {args.target}); use --seq <= it")
    max_pos = args.max_positions or limit
    if not args.seq <= max_pos <= limit:
        raise ValueError(f"--max-positions: got {max_pos}; expected --seq ({args.seq}) <= it <= the target's max_position_embeddings ({limit})")
    train_s, _ = load_streams(args.data)
    held = load_heldout_sources(args.data)
    held_s = glide_eval_stream(held, args.seq, args.eval_tokens)  # whole windows only
    if held_s.numel() < args.seq:
        raise ValueError(f"--seq: {args.seq} is longer than the held-out data of {args.data} ({held_s.numel()} tokens)")
    common = dict(seq_len=args.seq, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup, weight_decay=0.0,
                  amp=device.type == "cuda", seed=args.seed, progress=False, distill=args.distill, glide=args.init,
                  max_offset_pos=max_pos)
    steps = args.steps
    if not steps:
        n_cal = 12
        times = []
        train_glide(target, train_s, steps=n_cal, eval_every=None, eval_data=held_s[: args.seq * args.batch],
                    on_step=lambda r: times.append(r["elapsed_s"]), **common)
        per_step = (times[-1] - times[3]) / (len(times) - 4)
        steps = max(10, int(args.minutes * 60 / per_step * 0.9))
        log(f"[glide] {per_step * 1000:.1f} ms/step -> {steps} steps in {args.minutes} min")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    res = train_glide(target, train_s, eval_data=held_s, steps=steps, eval_every=args.eval_every,
                      log_path=os.path.join(args.out, "glide_log.jsonl"), **common)
    for rec in res.eval_history:
        log(json.dumps({"model": "glide", **rec}))
    train_minutes = round((time.time() - t0) / 60, 2)
    by_source = None
    if len(held) > 1:  # the final draft's held-out loss (decoding condition) on each source separately
        by_source = {}
        for k, st in held.items():
            ch = glide_eval_stream({k: st}, args.seq, args.eval_tokens)
            by_source[k] = evaluate_glide(target, res.glide, ch[: (ch.numel() // args.seq) * args.seq].view(-1, args.seq), args.batch)
    # Ship in bf16 (half the bytes; the decoders cast to the target's dtype anyway).
    glide = Glide(res.glide.config, {k: v.to(torch.bfloat16) for k, v in res.glide.weights.items()}, source="train_default")
    save_glide(glide, os.path.join(args.out, "glide"))
    summary = {"model": "glide", "steps": steps, "tokens": steps * args.batch * args.seq, "batch": args.batch, "seq": args.seq,
               "lr": args.lr, "distill": args.distill, "init": args.init,
               "max_positions": max_pos,
               "final_heldout_agree": (res.eval_history[-1].get("eval_agree") if res.eval_history else None),
               "initial_heldout_loss": res.initial_eval_loss, "final_heldout_loss": res.final_eval_loss,
               "train_minutes": train_minutes}
    if by_source is not None:
        summary["final_heldout_loss_by_source"] = by_source
    with open(os.path.join(args.out, "glide_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"[glide] done: {json.dumps(summary)}")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def cmd_eval(args) -> None:
    """One JSON line per model: held-out loss per source (``heldout_loss_<source>``, with several
    sources), their unweighted mean (``heldout_loss``) and the tokens evaluated, at ``--seq`` windows."""
    from transformers import LlamaForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    held = load_heldout_sources(args.data)
    for path in args.model:
        m = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        losses = heldout_losses(m, held, args.seq, device, max_tokens=args.eval_tokens)
        tokens = {k: (v.numel() if not args.eval_tokens else min(v.numel(), len(window_starts(v, args.seq, args.eval_tokens)) * args.seq))
                  for k, v in held.items()}
        rec = {"model": path, "seq": args.seq, **_loss_record(losses), "heldout_tokens": sum(tokens.values())}
        if len(held) > 1:
            rec["heldout_tokens_by_source"] = tokens
        if args.seq > m.config.max_position_embeddings:
            rec["note"] = f"windows longer than the model's max_position_embeddings ({m.config.max_position_embeddings})"
        log(json.dumps(rec))


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _arch(base: dict, override: str | None, flag: str) -> dict:
    """``base`` updated with the JSON object ``override`` (keys must be ``base``'s, values positive ints)."""
    if not override:
        return dict(base)
    try:
        upd = json.loads(override)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not a JSON object ({e}); e.g. '{{\"num_hidden_layers\": 12}}'") from None
    if not isinstance(upd, dict) or any(k not in base for k in upd) or any(not isinstance(v, int) or v <= 0 for v in upd.values()):
        raise ValueError(f"{flag}: got {override!r}; expected a JSON object with positive integer values for keys among {', '.join(base)}")
    arch = {**base, **upd}
    if arch["hidden_size"] % arch["num_attention_heads"] or arch["num_attention_heads"] % arch["num_key_value_heads"]:
        raise ValueError(f"{flag}: hidden_size must be a multiple of num_attention_heads, and that of num_key_value_heads ({arch})")
    return arch


def check_args(args) -> None:
    """ValueErrors (naming the flag and what it accepts) for bad values of ``lm``, ``glide`` and ``eval``."""
    if getattr(args, "max_positions", None) is not None and args.max_positions < 2 and not (args.cmd == "glide" and args.max_positions == 0):
        raise ValueError(f"--max-positions: got {args.max_positions}; expected an integer >= 2 (e.g. 2048 or 8192)")
    if hasattr(args, "seq"):
        limit = getattr(args, "max_positions", None) or None  # glide's 0: checked against the target later
        if args.seq < 2 or (limit is not None and args.seq > limit):
            raise ValueError(f"--seq: got {args.seq}; expected 2 <= --seq <= --max-positions ({limit})" if limit is not None
                             else f"--seq: got {args.seq}; expected an integer >= 2")
    if getattr(args, "eval_tokens", 0) < 0:
        raise ValueError(f"--eval-tokens: got {args.eval_tokens}; expected 0 (every held-out token) or a positive token count")
    if getattr(args, "rope_theta", 1.0) <= 0:
        raise ValueError(f"--rope-theta: got {args.rope_theta}; expected a positive RoPE base (e.g. 10000)")
    if getattr(args, "batch", 1) < 1:
        raise ValueError(f"--batch: got {args.batch}; expected a positive integer")
    if args.cmd == "lm":
        which = [w.strip() for w in args.which.split(",") if w.strip()]
        if not which or any(w not in ("target", "draft") for w in which):
            raise ValueError(f"--which: got {args.which!r}; expected target, draft or target,draft")
        args.which = which
        if args.init and which != ["target"]:
            raise ValueError(f"--init: continues the target only; got --which {','.join(which)} (use --which target)")
        if args.init and not os.path.isfile(os.path.join(args.init, "config.json")):
            raise ValueError(f"--init: {args.init!r} is not a saved LM directory (no config.json)")
        if args.draft_init and "draft" not in which:
            raise ValueError(f"--draft-init: continues the draft LM; got --which {','.join(which)} (add draft)")
        if args.draft_init and not os.path.isfile(os.path.join(args.draft_init, "config.json")):
            raise ValueError(f"--draft-init: {args.draft_init!r} is not a saved LM directory (no config.json)")
        if not (args.unlikelihood >= 0 and math.isfinite(args.unlikelihood)):
            raise ValueError(f"--unlikelihood: got {args.unlikelihood}; expected a finite weight >= 0 (0: off)")
        if args.ul_window < 1:
            raise ValueError(f"--ul-window: got {args.ul_window}; expected an integer >= 1")
        if not 0 <= args.anchor_weight <= 1:
            raise ValueError(f"--anchor-weight: got {args.anchor_weight}; expected a weight in [0, 1] (0: off)")
        if args.anchor_weight > 0 and not args.init:
            raise ValueError("--anchor-weight: anchors the target to the model it continues; give --init")
        if not (args.seq_unlikelihood >= 0 and math.isfinite(args.seq_unlikelihood)):
            raise ValueError(f"--seq-unlikelihood: got {args.seq_unlikelihood}; expected a finite weight >= 0 (0: off)")
        for flag, v, lo in (("--seq-ul-every", args.seq_ul_every, 1), ("--seq-ul-batch", args.seq_ul_batch, 1),
                            ("--seq-ul-prefix", args.seq_ul_prefix, 1), ("--seq-ul-len", args.seq_ul_len, 5)):
            if v < lo:
                raise ValueError(f"{flag}: got {v}; expected an integer >= {lo}")
        if args.seq_unlikelihood > 0 and args.seq_ul_prefix + args.seq_ul_len > args.max_positions:
            raise ValueError(f"--seq-ul-prefix + --seq-ul-len: got {args.seq_ul_prefix + args.seq_ul_len}; expected "
                             f"<= --max-positions ({args.max_positions})")
        args.target_arch = _arch(TARGET_ARCH, args.target_arch, "--target-arch")
        args.draft_arch = _arch(DRAFT_ARCH, args.draft_arch, "--draft-arch")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    s.add_argument("--vocab", type=int, default=4096)
    s.add_argument("--out", default="shared/assets/default/target")
    s = sub.add_parser("pack", help="tokenize the corpus into train/held-out streams")
    s.add_argument("--tokenizer", default="shared/assets/default/target")
    s.add_argument("--out", default="runs/default_data")
    s.add_argument("--sources", default="stdlib", help="comma-separated: stdlib, packages (default stdlib)")
    s.add_argument("--stdlib-root", default=None, help="the stdlib tree to use (default this interpreter's; "
                   "e.g. a copy from `python scripts/default_corpus.py export DIR`)")
    s.add_argument("--max-train-mb", type=float, default=0.0, help="cap on the packages' training MB (0: none)")
    s.add_argument("--stdlib-repeat", type=int, default=1, help="the stdlib's training stream this many times in the "
                   "mixture (1-100; default 1)")
    s = sub.add_parser("lm", help="train the target and the draft LM")
    s.add_argument("--data", default="runs/default_data")
    s.add_argument("--tokenizer", default="shared/assets/default/target")
    s.add_argument("--out", default="runs/default_lm")
    s.add_argument("--which", default="target,draft")
    s.add_argument("--teacher", default=None, help="target dir for the draft's distillation when --which draft")
    s.add_argument("--device", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--seq", type=int, default=1024, help="training/eval window in tokens (<= --max-positions)")
    s.add_argument("--max-positions", type=int, default=MAX_POSITIONS, help="the saved config's max_position_embeddings")
    s.add_argument("--rope-theta", type=float, default=ROPE_THETA)
    s.add_argument("--target-arch", default=None, help="JSON overrides of the target's shape, e.g. '{\"num_hidden_layers\": 12}'")
    s.add_argument("--draft-arch", default=None, help="JSON overrides of the draft LM's shape")
    s.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens per source evaluated during training (0: all)")
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--draft-lr", type=float, default=3e-3)
    s.add_argument("--weight-decay", type=float, default=0.1)
    s.add_argument("--warmup", type=int, default=100)
    s.add_argument("--steps", type=int, default=0, help="target steps (0: from --target-minutes)")
    s.add_argument("--draft-steps", type=int, default=0, help="draft steps (0: from --draft-minutes)")
    s.add_argument("--target-minutes", type=float, default=5.0)
    s.add_argument("--draft-minutes", type=float, default=1.5)
    s.add_argument("--kd-weight", type=float, default=0.5, help="weight of KL(target || draft) in the draft's loss")
    s.add_argument("--unlikelihood", type=float, default=0.0, help="weight of the token-level unlikelihood loss in the "
                   "target's loss (0: plain cross-entropy; e.g. 1.0): recent context tokens the data does not repeat are "
                   "pushed down, against greedy loops")
    s.add_argument("--ul-window", type=int, default=64, help="the unlikelihood's negative candidates: the distinct tokens "
                   "among this many most recent context tokens")
    s.add_argument("--seq-unlikelihood", type=float, default=0.0, help="weight of the sequence-level unlikelihood "
                   "loss (0: off; e.g. 1.0): every --seq-ul-every steps the target continues --seq-ul-batch prefixes of "
                   "--seq-ul-prefix training tokens greedily for --seq-ul-len tokens and the tokens of its repeated 4-grams are "
                   "pushed down, against greedy loops")
    s.add_argument("--anchor-weight", type=float, default=0.0, help="with --init: the target's data term is (1 - w) CE + "
                   "w KL(init || target), a frozen copy of the --init model as the anchor (0: plain CE; e.g. 1.0 for a "
                   "fine-tune that should change only what the unlikelihood terms push)")
    s.add_argument("--seq-ul-every", type=int, default=4)
    s.add_argument("--seq-ul-batch", type=int, default=16)
    s.add_argument("--seq-ul-prefix", type=int, default=32)
    s.add_argument("--seq-ul-len", type=int, default=96)
    s.add_argument("--seq-ul-marks", choices=SEQ_UL_MARKS, default="all", help="the sequence-level negatives: "
                   "all (every token of a repeated 4-gram) or entry (only the token that closes a loop's first repeat)")
    s.add_argument("--seq-ul-source", default="all", help="where the sequence-level prefixes come from: all (the whole "
                   "training stream) or one source of the pack (e.g. stdlib: the prompts greedy_repetition.py scores are "
                   "stdlib file openings)")
    s.add_argument("--eval-every", type=int, default=200)
    s.add_argument("--keep", choices=("best", "last"), default="best", help="the checkpoint saved: the best held-out "
                   "loss among the evaluations (default) or the last step's (e.g. when an unlikelihood term trades a little "
                   "loss for less repetition)")
    s.add_argument("--draft-init", default=None, help="start the draft LM from this saved LM dir (same shape; e.g. the "
                   "shipped draft, distilled again for a fine-tuned target) instead of a fresh init")
    s.add_argument("--init", default=None, help="start the target from this saved LM dir (same shape; e.g. a phase "
                   "trained at shorter windows) instead of a fresh init; --which target only")
    s = sub.add_parser("glide", help="train the GLIDE draft with specdec.ref.train_glide")
    s.add_argument("--target", default="shared/assets/default/target")
    s.add_argument("--data", default="runs/default_data")
    s.add_argument("--out", default="runs/default_glide")
    s.add_argument("--device", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=0, help="optimizer steps (0: from --minutes)")
    s.add_argument("--minutes", type=float, default=4.0)
    s.add_argument("--seq", type=int, default=1024, help="training window (<= the target's max_position_embeddings)")
    s.add_argument("--max-positions", type=int, default=0,
                   help="anchor-offset positions reach this (windows <= 1200 tokens; 0: the target's max_position_embeddings)")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens per source evaluated (0: all)")
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--warmup", type=int, default=50)
    s.add_argument("--eval-every", type=int, default=200)
    s.add_argument("--distill", type=float, default=0.0,
                   help="weight of KL(target || GLIDE) in the loss (self-distillation; 0 = the plain LongSpec loss)")
    s.add_argument("--init", default=None, help="start from this GLIDE draft dir (e.g. the shipped one) instead of a fresh init")
    s = sub.add_parser("eval", help="held-out loss of saved HF-format LMs")
    s.add_argument("--model", nargs="+", default=["shared/assets/default/target", "shared/assets/default/draft"])
    s.add_argument("--data", default="runs/default_data")
    s.add_argument("--device", default=None)
    s.add_argument("--seq", type=int, default=1024)
    s.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens per source (0: all), evenly spaced windows")
    args = p.parse_args(argv)
    check_args(args)
    if args.cmd == "tokenizer":
        train_tokenizer(args.vocab, args.out)
    elif args.cmd == "pack":
        pack(args.tokenizer, args.out, root=args.stdlib_root, sources=args.sources, max_train_mb=args.max_train_mb,
             stdlib_repeat=args.stdlib_repeat)
    elif args.cmd == "lm":
        cmd_lm(args)
    elif args.cmd == "glide":
        cmd_glide(args)
    elif args.cmd == "eval":
        cmd_eval(args)


if __name__ == "__main__":
    main()
