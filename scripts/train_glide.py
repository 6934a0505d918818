#!/usr/bin/env python
"""Train a GLIDE draft for a target model (LongSpec recipe; see specdec.ref.train_glide).

Examples::

    # text files (or .jsonl with a "text" field), tokenized with the target's tokenizer
    python scripts/train_glide.py --target path/to/target --data corpus/*.txt --output out/glide \
        --seq-len 1024 --batch-size 4 --steps 2000 --device cuda --dtype bf16

    # pre-tokenized data: .pt / .npy files holding 1-D token tensors (or a list of them)
    python scripts/train_glide.py --target path/to/target --tokens data/train.pt --eval-tokens data/val.pt \
        --output out/glide

The output directory gets ``config.json`` + ``model.safetensors`` (what ``specdec.ref.load_glide``
reads), ``train_log.jsonl`` and, with ``--save-every``, ``checkpoint-{step}/`` folders.

Truncated draft vocabulary (docs/design.md §12): ``--draft-vocab DIR`` takes the map stored in a GLIDE
checkpoint (one ``specdec draft-vocab`` wrote); the draft then trains over those N tokens (positions whose
next token is outside them are skipped in the loss) and is saved with the map. A ``--init`` checkpoint
that carries a map trains with it by default.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _read_texts(paths: list[str]) -> list[str]:
    texts = []
    for p in paths:
        if p.endswith(".jsonl"):
            with open(p) as f:
                for line in f:
                    line = line.strip()
                    if line:
                        rec = json.loads(line)
                        texts.append(rec.get("text") or rec.get("content") or "")
        else:
            with open(p, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    return [t for t in texts if t]


def _read_tokens(paths: list[str]) -> list[torch.Tensor]:
    out = []
    for p in paths:
        if p.endswith(".npy"):
            import numpy as np

            obj = torch.from_numpy(np.load(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, torch.Tensor):
            out += [obj] if obj.dim() == 1 else list(obj)
        else:
            out += [torch.as_tensor(t) for t in obj]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="target model dir (HF format)")
    ap.add_argument("--output", required=True, help="output dir for the trained draft")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", help="text files (.txt/.py/...) or .jsonl with a 'text' field")
    src.add_argument("--tokens", nargs="+", help=".pt/.npy files with pre-tokenized 1-D token tensors")
    ap.add_argument("--eval-data", nargs="+", help="held-out text files")
    ap.add_argument("--eval-tokens", nargs="+", help="held-out token files")
    ap.add_argument("--tokenizer", help="tokenizer dir (default: the target dir)")
    ap.add_argument("--init", help="start from this GLIDE checkpoint (dir or .pth)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="target dtype: bf16/fp16/fp32 (default bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--max-lag", type=int, default=4)
    ap.add_argument("--no-anchor-offset", action="store_true")
    ap.add_argument("--eval-fraction", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the draft (CUDA)")
    ap.add_argument("--draft-vocab", help="GLIDE checkpoint whose draft vocabulary (specdec draft-vocab) to train with")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight in [0, 1] of KL(target || draft) in the loss (self-distillation; 0 = text cross-entropy only)")
    args = ap.parse_args(argv)

    from specdec.ref.model import load_model
    from specdec.ref.train_glide import train_glide

    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    target = load_model(args.target, dtype=dtype, device=args.device)
    tokenizer = None
    if args.data or args.eval_data:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.target)
    data = _read_texts(args.data) if args.data else _read_tokens(args.tokens)
    eval_data = _read_texts(args.eval_data) if args.eval_data else (_read_tokens(args.eval_tokens) if args.eval_tokens else None)
    draft_vocab = None
    if args.draft_vocab:
        from specdec.shared.glide import load_glide_weights

        draft_vocab = load_glide_weights(args.draft_vocab, target.config).vocab_map
        if draft_vocab is None:
            print(f"train_glide: error: {args.draft_vocab} holds no draft vocabulary (build one with specdec draft-vocab)",
                  file=sys.stderr)
            return 2

    res = train_glide(
        target, data, tokenizer=tokenizer, glide=args.init, eval_data=eval_data, eval_fraction=args.eval_fraction,
        window=args.window, seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None,
        max_lag=args.max_lag, anchor_offset=not args.no_anchor_offset, eval_every=args.eval_every,
        save_dir=args.output, save_every=args.save_every, seed=args.seed, amp=args.amp, distill=args.distill,
        draft_vocab=draft_vocab,
    )
    print(json.dumps({"output": args.output, "initial_eval_loss": res.initial_eval_loss, "final_eval_loss": res.final_eval_loss,
                      "final_train_loss": res.history[-1]["loss"] if res.history else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
