"""``specdec draft-vocab``: build a truncated GLIDE draft vocabulary and write it into a copy of the checkpoint.

The GLIDE draft may propose only the N most frequent target tokens (docs/design.md §12, EAGLE-3's draft
vocabulary / FR-Spec): its output layer is then the target lm_head's N rows of those tokens, which cuts
the bytes each draft level reads by V / N. This command counts token frequencies and writes the map::

    # the target's own greedy continuations of a prompt set (what the draft must guess), prompts 10..78
    specdec draft-vocab --size 1024 --prompts stdlib_code --begin 10 --generate --max-new-tokens 96 \\
        --output out/glide-1024

    # or the tokens of a corpus: text files (.jsonl: a 'text' field per line) and/or a prompt set's text
    specdec draft-vocab --size 32768 --target /models/Llama-3-8B --glide /models/longspec-llama3 \\
        --text corpus/*.txt --output out/glide-32k

Counting:

* ``--text FILE ...``: every token of each file (tokenized with the target's tokenizer, no BOS);
* ``--prompts SET``: a prompt set -- a Spec-Bench ``question.jsonl`` (``turns``), a JSONL file with a
  ``prompt`` or ``text`` field per line, or a shipped set name (``stdlib_code``, ``stdlib_long``) --
  sliced ``[--begin:--end]``; its prompts' tokens are counted, or with ``--generate`` only the
  target's greedy continuation of each prompt (``--max-new-tokens``; reference path, ``--device``).

The map is the ``--size`` most frequent ids (equal counts: the lower id first), stored sorted ascending
as the ``draft_vocab`` tensor of ``--output`` (a copy of ``--glide``: ``config.json`` gains
``draft_vocab_size``; the source's ``acceptance.json`` is NOT copied, since it was measured with the
full vocabulary), with ``draft_vocab.json`` beside it (how it was built, the share of the counted
tokens the map covers). Decoding with the copy is lossless as before (verification is unchanged).

Bad input (``--size`` outside [1, V], missing files, no source) is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence

import torch

__all__ = ["count_tokens", "read_text_files", "read_prompt_set", "generated_tokens", "build_draft_vocab", "run_draft_vocab",
           "add_draft_vocab_args"]


def count_tokens(token_lists: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Occurrences of every token id in ``token_lists`` -> int64 [vocab_size].

    Raises ValueError for an id outside ``[0, vocab_size)``."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids in token_lists:
        t = torch.as_tensor(list(ids), dtype=torch.int64)
        if t.numel() == 0:
            continue
        if int(t.min()) < 0 or int(t.max()) >= vocab_size:
            raise ValueError(f"token id {int(t.max()) if int(t.max()) >= vocab_size else int(t.min())} is outside the "
                             f"target's vocabulary [0, {vocab_size - 1}]")
        counts += torch.bincount(t, minlength=vocab_size)
    return counts


def read_text_files(paths: Sequence[str]) -> list[str]:
    """The texts of ``paths``: a whole file each, or one text per JSONL line (its ``text`` field) for ``.jsonl``.

    Raises FileNotFoundError for a missing file, ValueError for unreadable JSONL."""
    texts = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"--text: no such file: {p}")
        with open(p, encoding="utf-8", errors="replace") as f:
            if not p.endswith(".jsonl"):
                texts.append(f.read())
                continue
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"--text: {p}:{i + 1}: not valid JSON ({e.msg})") from None
                    texts.append(str(rec.get("text") or rec.get("content") or ""))
    return [t for t in texts if t]


def read_prompt_set(spec: str, begin: int | None = None, end: int | None = None) -> list[str]:
    """The prompts of a prompt set sliced ``[begin:end]``: a shipped set name or a Spec-Bench
    ``question.jsonl`` (each question's first turn), or a JSONL file with ``prompt`` / ``text`` per line.

    Raises FileNotFoundError for a missing file, ValueError for a malformed line."""
    from specdec.bench import SHIPPED_SETS, resolve_bench

    if spec not in SHIPPED_SETS and not os.path.exists(spec):
        raise FileNotFoundError(f"--prompts: no such file or shipped set: {spec} (shipped: {', '.join(SHIPPED_SETS)})")
    path = resolve_bench(spec)
    prompts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--prompts: {path}:{i + 1}: not valid JSON ({e.msg})") from None
            turns = rec.get("turns") if isinstance(rec, dict) else None
            text = turns[0] if isinstance(turns, list) and turns else (rec.get("prompt") or rec.get("text") if isinstance(rec, dict) else None)
            if not isinstance(text, str):
                raise ValueError(f"--prompts: {path}:{i + 1}: expected 'turns', 'prompt' or 'text' (a string)")
            prompts.append(text)
    return prompts[begin:end]


def generated_tokens(target, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """The target's greedy continuation (reference path, :func:`specdec.ref.vanilla_generate`) of each prompt,
    at most ``max_new_tokens`` tokens, stopping at its EOS."""
    from specdec.ref import vanilla_generate

    out = []
    for ids in prompt_ids:
        x = torch.tensor([list(ids)], dtype=torch.long, device=target.device)
        res = vanilla_generate(target, x, x.shape[1], max_gen_len=max_new_tokens)
        out.append([int(t) for t in res.output_ids[0, : res.row_lengths[0]].tolist()])  # generated tokens only
    return out


def build_draft_vocab(counts: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """(the ``size`` most frequent ids, sorted ascending; the share of the counted tokens they cover)."""
    from specdec.shared.glide import draft_vocab_from_counts

    vmap = draft_vocab_from_counts(counts, size)
    total = int(counts.sum())
    return vmap, (float(counts[vmap].sum()) / total if total else 0.0)


def add_draft_vocab_args(p: argparse.ArgumentParser) -> None:
    """The options of ``specdec draft-vocab`` (see the module docstring)."""
    p.add_argument("--size", "-n", type=int, required=True, help="N: how many target tokens the draft may propose (1..V)")
    p.add_argument("--output", "-o", required=True, help="directory for the GLIDE checkpoint copy with the map")
    p.add_argument("--target", default="default", help="target model dir (default: the embedded model)")
    p.add_argument("--glide", default=None, help="GLIDE checkpoint to copy (default: the embedded GLIDE with the embedded target)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="count the tokens of these text files (.jsonl: a 'text' field per line)")
    p.add_argument("--prompts", metavar="SET", help="a prompt set: question.jsonl, JSONL with 'prompt'/'text', or stdlib_code / stdlib_long")
    p.add_argument("--begin", type=int, default=None, help="first prompt of --prompts to use (Python slice)")
    p.add_argument("--end", type=int, default=None, help="end of the --prompts slice (exclusive)")
    p.add_argument("--generate", action="store_true", help="count the target's greedy continuations of --prompts, not the prompts")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per prompt with --generate (default 96)")
    p.add_argument("--device", default="cpu", help="device for --generate (reference path; default cpu)")


def run_draft_vocab(a: argparse.Namespace, stdout=None) -> int:
    """``specdec draft-vocab``: count, build the map, write the checkpoint copy; prints one JSON line."""
    from specdec.shared.assets import resolve_model_path
    from specdec.shared.config import load_config
    from specdec.shared.glide import load_glide_weights, save_glide, with_draft_vocab

    stdout = stdout or sys.stdout
    if a.size < 1:
        raise ValueError(f"--size must be >= 1 (tokens the draft may propose), got {a.size}")
    if not a.text and not a.prompts:
        raise ValueError("nothing to count: give --text FILE ... and/or --prompts SET")
    if a.generate and not a.prompts:
        raise ValueError("--generate needs --prompts (the prompts whose continuations are counted)")
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    target_dir = resolve_model_path(a.target)
    if not os.path.isdir(target_dir):
        raise FileNotFoundError(f"--target: no such model directory: {a.target}")
    glide_src = a.glide or ("default-glide" if a.target == "default" else None)
    if glide_src is None:
        raise ValueError("--glide is required with --target (the GLIDE checkpoint to copy)")
    glide_dir = resolve_model_path(glide_src)
    if not os.path.exists(glide_dir):
        raise FileNotFoundError(f"--glide: no such checkpoint: {glide_src}")
    config = load_config(target_dir)
    if a.size > config.vocab_size:
        raise ValueError(f"--size must be in [1, {config.vocab_size}] (the target's vocabulary), got {a.size}")
    texts = read_text_files(a.text) if a.text else []
    prompts = read_prompt_set(a.prompts, a.begin, a.end) if a.prompts else []
    if a.prompts and not prompts:
        raise ValueError(f"--prompts {a.prompts} [{a.begin}:{a.end}] selects no prompt")
    glide = load_glide_weights(glide_dir, config)  # checked against the target before any counting

    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer(target_dir)
    token_lists = [[int(t) for t in tok(text, add_special_tokens=False)["input_ids"]] for text in texts]
    if prompts:
        prompt_ids = [encode_prompt(tok, p) for p in prompts]
        if a.generate:
            from specdec.ref import load_model

            target = load_model(target_dir, device=a.device)
            token_lists += generated_tokens(target, prompt_ids, a.max_new_tokens)
        else:
            token_lists += prompt_ids
    counts = count_tokens(token_lists, config.vocab_size)
    if int(counts.sum()) == 0:
        raise ValueError("the sources hold no token to count")
    vmap, coverage = build_draft_vocab(counts, a.size)
    out = with_draft_vocab(glide, vmap)
    out.acceptance = None  # measured with the full vocabulary: not this draft's
    save_glide(out, a.output)
    info = {"output": os.fspath(a.output), "size": a.size, "vocab_size": config.vocab_size, "glide": glide_src,
            "target": a.target, "source": {"text": a.text, "prompts": a.prompts, "begin": a.begin, "end": a.end,
                                            "generate": a.generate, "max_new_tokens": a.max_new_tokens if a.generate else None},
            "tokens_counted": int(counts.sum()), "distinct_tokens": int((counts > 0).sum()), "coverage": round(coverage, 6)}
    with open(os.path.join(a.output, "draft_vocab.json"), "w") as f:
        json.dump(info, f, indent=2)
    stdout.write(json.dumps(info) + "\n")
    return 0


try:  # `specdec draft-vocab` (specdec/cli.py imports this module and calls the registered entry)
    from specdec.cli import register_subcommand

    register_subcommand("draft-vocab", add_draft_vocab_args, run_draft_vocab,
                        help="build a truncated GLIDE draft vocabulary (the N most frequent tokens) into a checkpoint copy")
except ImportError:  # pragma: no cover - a build without the CLI module
    pass
