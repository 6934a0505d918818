#!/usr/bin/env python3
"""Train the embedded default model of specdec: a small Python-code LLM, its draft LM and its GLIDE draft.

Everything is trained on the Python standard library's own source (see ``scripts/default_corpus.py``
for the file list and the fixed held-out rule). Stages, each a subcommand::

    # 1. byte-level BPE tokenizer (CPU, ~1 min) -> tokenizer.json + tokenizer_config.json
    python scripts/train_default.py tokenizer --vocab 4096 --out shared/assets/default/target
    # 2. tokenize the corpus into int16 token streams (CPU, ~20 s) -> runs/default_data/{train,heldout}.pt
    python scripts/train_default.py pack --tokenizer shared/assets/default/target --out runs/default_data
    # 3. target (14 layers) then draft LM (2 layers, distilled from the target) on the GPU
    python scripts/train_default.py lm --data runs/default_data --tokenizer shared/assets/default/target \
        --out runs/default_lm --target-minutes 5 --draft-minutes 1.5
    # 4. GLIDE draft with the project's LongSpec recipe (specdec.ref.train_glide.train_glide)
    python scripts/train_default.py glide --target shared/assets/default/target --data runs/default_data --out runs/default_glide
    # held-out loss of any saved HF-format LM (CPU or GPU)
    python scripts/train_default.py eval --model shared/assets/default/target --data runs/default_data

``lm`` and ``glide`` write ``*.jsonl`` logs (held-out loss over training) next to the weights. The
weights are saved with ``save_pretrained(safe_serialization=True)`` in bf16. ``--steps`` fixes the
number of optimizer steps (exact reproduction); without it, ``--*-minutes`` measures the step time
after a warm-up and sets the step count from the time budget (the count is logged, so a run can be
repeated with ``--steps``). The best held-out checkpoint is kept (the corpus is small: ~9M tokens).
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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Architectures (Llama, tied embeddings, head_dim 64 so the fast kernels apply).
TARGET_ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=14, num_attention_heads=4, num_key_value_heads=2)
DRAFT_ARCH = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1)
MAX_POSITIONS = 2048


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


def pack(tokenizer: str, out: str, root: str | None = None) -> None:
    root = root or default_corpus.stdlib_root()
    tok = load_hf_tokenizer(tokenizer)
    train, held = default_corpus.split_corpus(root)
    os.makedirs(out, exist_ok=True)
    meta = {"stdlib": root, "python": sys.version.split()[0], "vocab_size": len(tok)}
    for name, files in (("train", train), ("heldout", held)):
        texts = [default_corpus.read_text(os.path.join(root, r)) for r in files]
        enc = tok(texts)["input_ids"]
        ids = [t for e in enc for t in e + [tok.eos_token_id]]
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        torch.save(torch.tensor(ids, dtype=torch.int16), os.path.join(out, f"{name}.pt"))
        meta[name] = {"files": len(files), "tokens": len(ids), "bytes": nbytes, "bytes_per_token": round(nbytes / len(ids), 3)}
        if name == "heldout":
            meta["heldout_files"] = files
        log(f"{name}: {len(files)} files, {nbytes / 1e6:.2f} MB, {len(ids) / 1e6:.3f}M tokens ({nbytes / len(ids):.2f} bytes/token)")
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_streams(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    tr = torch.load(os.path.join(data, "train.pt")).long()
    he = torch.load(os.path.join(data, "heldout.pt")).long()
    return tr, he


# ---------------------------------------------------------------------------------------------
# 3. language models
# ---------------------------------------------------------------------------------------------


def make_config(arch: dict, tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        head_dim=arch["hidden_size"] // arch["num_attention_heads"], hidden_act="silu", attention_bias=False, **arch,
    )


def get_batch(stream: torch.Tensor, batch: int, seq: int, gen: torch.Generator, device) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=gen)
    idx = starts[:, None] + torch.arange(seq + 1)[None]
    return stream[idx].to(device, non_blocking=True)


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq: int, device, batch: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) over non-overlapping windows of the held-out stream."""
    model.eval()
    n = (stream.numel() - 1) // seq
    windows = torch.stack([stream[i * seq: i * seq + seq + 1] for i in range(n)])
    tail = stream[n * seq:]
    total, count = 0.0, 0
    use_amp = device.type == "cuda"
    chunks = [windows[i:i + batch] for i in range(0, n, batch)] + ([tail[None]] if tail.numel() > 1 else [])
    for w in chunks:
        w = w.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = model(input_ids=w[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += w[:, 1:].numel()
    model.train()
    return total / count


def train_lm(name: str, arch: dict, tok, train_s, held_s, args, device, teacher=None) -> tuple[object, dict]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = make_config(arch, tok)
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
    fixed_steps = args.steps if teacher is None else args.draft_steps
    minutes = args.target_minutes if teacher is None else args.draft_minutes
    total = fixed_steps or 10**9
    warmup = args.warmup
    use_amp = device.type == "cuda"
    logf = open(os.path.join(args.out, f"{name}_log.jsonl"), "w")
    best, best_state = float("inf"), None
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
        if teacher is not None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                t_logits = teacher(input_ids=inp).logits
            kd = torch.nn.functional.kl_div(torch.log_softmax(logits.float(), -1).flatten(0, 1),
                                            torch.log_softmax(t_logits.float(), -1).flatten(0, 1), log_target=True, reduction="batchmean")
            loss = (1 - args.kd_weight) * ce + args.kd_weight * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += inp.numel()
        if step % args.eval_every == 0 or step == total:
            hl = heldout_loss(model, held_s, args.seq, device)
            rec = {"model": name, "step": step, "total_steps": total, "tokens": tokens_seen, "lr": cur, "train_ce": float(ce.detach()),
                   "heldout_loss": hl, "elapsed_s": round(time.time() - t_start, 1)}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            log(json.dumps(rec))
            if hl < best:
                best = hl
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    logf.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    summary = {"model": name, "params": nparams, "steps": total, "tokens": tokens_seen, "best_heldout_loss": best,
               "train_minutes": round((time.time() - t_start) / 60, 2), "arch": arch, "batch": args.batch, "seq": args.seq, "lr": lr}
    log(f"[{name}] done: {json.dumps(summary)}")
    return model, summary


def save_lm(model, tok, out: str) -> None:
    from transformers import GenerationConfig

    os.makedirs(out, exist_ok=True)
    m = model.to(torch.bfloat16)
    m.config.use_cache = True
    m.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m.save_pretrained(out, safe_serialization=True)
    for fn in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tok.name_or_path, fn)):
            shutil.copy(os.path.join(tok.name_or_path, fn), os.path.join(out, fn))


def cmd_lm(args) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tok = load_hf_tokenizer(args.tokenizer)
    train_s, held_s = load_streams(args.data)
    log(f"device {device}, torch {torch.__version__}, train {train_s.numel() / 1e6:.2f}M tokens, held-out {held_s.numel() / 1e3:.1f}k tokens")
    os.makedirs(args.out, exist_ok=True)
    summaries = []
    target = None
    if "target" in args.which:
        target, s = train_lm("target", TARGET_ARCH, tok, train_s, held_s, args, device)
        summaries.append(s)
        save_lm(target, tok, os.path.join(args.out, "target"))
    if "draft" in args.which:
        if target is None:
            from transformers import LlamaForCausalLM

            target = LlamaForCausalLM.from_pretrained(args.teacher or os.path.join(args.out, "target"), dtype=torch.float32).to(device)
        target = target.to(torch.float32).eval()
        for p in target.parameters():
            p.requires_grad_(False)
        draft, s = train_lm("draft", DRAFT_ARCH, tok, train_s, held_s, args, device, teacher=target if args.kd_weight > 0 else None)
        summaries.append(s)
        save_lm(draft, tok, os.path.join(args.out, "draft"))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=1)


# ---------------------------------------------------------------------------------------------
# 4. GLIDE draft (the project's LongSpec recipe)
# ---------------------------------------------------------------------------------------------


def cmd_glide(args) -> None:
    """GLIDE draft for the shipped target with ``specdec.ref.train_glide`` (LongSpec recipe: frozen target,
    its last-layer KV with a random lag 1..4, anchor-offset positions). Held-out = the stdlib held-out files.
    With ``--minutes`` (and no ``--steps``) a short calibration run measures the step time first."""
    from specdec.ref import load_model
    from specdec.ref.train_glide import train_glide
    from specdec.shared.glide import Glide, save_glide

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    target = load_model(args.target, dtype=dtype, device=device)
    train_s, held_s = load_streams(args.data)
    held_s = held_s[: (held_s.numel() // args.seq) * args.seq]  # whole windows only
    common = dict(seq_len=args.seq, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup, weight_decay=0.0,
                  amp=device.type == "cuda", seed=args.seed, progress=False, distill=args.distill, glide=args.init)
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
    # Ship in bf16 (half the bytes; the decoders cast to the target's dtype anyway).
    glide = Glide(res.glide.config, {k: v.to(torch.bfloat16) for k, v in res.glide.weights.items()}, source="train_default")
    save_glide(glide, os.path.join(args.out, "glide"))
    summary = {"model": "glide", "steps": steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
               "distill": args.distill, "init": args.init, "final_heldout_agree": (res.eval_history[-1].get("eval_agree") if res.eval_history else None),
               "initial_heldout_loss": res.initial_eval_loss, "final_heldout_loss": res.final_eval_loss,
               "train_minutes": round((time.time() - t0) / 60, 2)}
    with open(os.path.join(args.out, "glide_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"[glide] done: {json.dumps(summary)}")


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def cmd_eval(args) -> None:
    from transformers import LlamaForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _, held_s = load_streams(args.data)
    for path in args.model:
        m = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        log(json.dumps({"model": path, "heldout_loss": heldout_loss(m, held_s, args.seq, device), "heldout_tokens": held_s.numel()}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    s.add_argument("--vocab", type=int, default=4096)
    s.add_argument("--out", default="shared/assets/default/target")
    s = sub.add_parser("pack", help="tokenize the corpus into train/held-out streams")
    s.add_argument("--tokenizer", default="shared/assets/default/target")
    s.add_argument("--out", default="runs/default_data")
    s = sub.add_parser("lm", help="train the target and the draft LM")
    s.add_argument("--data", default="runs/default_data")
    s.add_argument("--tokenizer", default="shared/assets/default/target")
    s.add_argument("--out", default="runs/default_lm")
    s.add_argument("--which", default="target,draft")
    s.add_argument("--teacher", default=None, help="target dir for the draft's distillation when --which draft")
    s.add_argument("--device", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--seq", type=int, default=1024)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--draft-lr", type=float, default=3e-3)
    s.add_argument("--weight-decay", type=float, default=0.1)
    s.add_argument("--warmup", type=int, default=100)
    s.add_argument("--steps", type=int, default=0, help="target steps (0: from --target-minutes)")
    s.add_argument("--draft-steps", type=int, default=0, help="draft steps (0: from --draft-minutes)")
    s.add_argument("--target-minutes", type=float, default=5.0)
    s.add_argument("--draft-minutes", type=float, default=1.5)
    s.add_argument("--kd-weight", type=float, default=0.5, help="weight of KL(target || draft) in the draft's loss")
    s.add_argument("--eval-every", type=int, default=200)
    s = sub.add_parser("glide", help="train the GLIDE draft with specdec.ref.train_glide")
    s.add_argument("--target", default="shared/assets/default/target")
    s.add_argument("--data", default="runs/default_data")
    s.add_argument("--out", default="runs/default_glide")
    s.add_argument("--device", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=0, help="optimizer steps (0: from --minutes)")
    s.add_argument("--minutes", type=float, default=4.0)
    s.add_argument("--seq", type=int, default=1024)
    s.add_argument("--batch", type=int, default=16)
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
    args = p.parse_args(argv)
    if args.cmd == "tokenizer":
        train_tokenizer(args.vocab, args.out)
    elif args.cmd == "pack":
        pack(args.tokenizer, args.out)
    elif args.cmd == "lm":
        args.which = [w.strip() for w in args.which.split(",")]
        cmd_lm(args)
    elif args.cmd == "glide":
        cmd_glide(args)
    elif args.cmd == "eval":
        cmd_eval(args)


if __name__ == "__main__":
    main()
