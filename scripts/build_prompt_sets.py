#!/usr/bin/env python3
"""Build the prompt sets ``specdec bench`` ships: ``stdlib_code.jsonl`` and ``stdlib_long.jsonl``.

Run once, in a source checkout, after a change to the held-out rule or the prompt layout; the
files land in the package data of ``specdec.shared`` (``shared/assets/prompts/``, see
``specdec.bench.PROMPTS_DIR`` and ``SHIPPED_SETS``) and are committed, so every machine
benchmarks the same prompts whatever its Python version::

    python scripts/build_prompt_sets.py                  # rewrite shared/assets/prompts/*.jsonl
    python scripts/build_prompt_sets.py --out-dir /tmp/p # somewhere else (e.g. to diff)

* ``stdlib_code``: code completion on Python standard-library files the embedded model did NOT
  train on (the held-out rule of ``scripts/default_corpus.py``): a file's opening lines, or the
  code before a ``def ...:`` line, to be continued;
* ``stdlib_long``: the held-out files concatenated (``# ===== path =====`` headers) into prompts of
  about 4k, 16k and 32k tokens, and (appended later, so the older question ids stay) three of about 7.5k
  tokens (category ``long_8k``: 7.5k + 512 new tokens fill an 8192-position model), ending at a ``def ...:`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Sequence

import default_corpus  # scripts/default_corpus.py, beside this file

from specdec.bench import PROMPTS_DIR, SHIPPED_SETS

_DEF_RE = None


def _def_lines(lines: list[str]) -> list[int]:
    """Indices of one-line ``def ...:`` signatures followed by a body that is more than ``pass``."""
    import re

    global _DEF_RE
    if _DEF_RE is None:
        _DEF_RE = re.compile(r"^\s*(async\s+)?def \w+\(.*\)(\s*->\s*[^:]+)?:\s*$")
    out = []
    for i, line in enumerate(lines):
        if _DEF_RE.match(line) and i + 2 < len(lines):
            body = [ln.strip() for ln in lines[i + 1: i + 6] if ln.strip()]
            if body and body[0] not in ("pass", "...") and not body[0].startswith("raise NotImplementedError"):
                out.append(i)
    return out


def build_stdlib_prompt_sets(out_dir: str = PROMPTS_DIR, tokenizer: str = "default", root: str | None = None,
                             long_lengths: Sequence[tuple[int, int]] = ((4096, 3), (16384, 2), (32768, 2), (7680, 3)),
                             context_tokens: int = 768) -> dict[str, int]:
    """Write ``stdlib_code.jsonl`` and ``stdlib_long.jsonl`` from the held-out stdlib files.

    Needs a source checkout (``scripts/default_corpus.py`` holds the held-out rule). The text is
    stored in the files (not rebuilt at run time), so every machine benchmarks the same prompts
    whatever its Python version. ``context_tokens``: the most tokens of code before a cut.
    """
    from specdec.shared.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    tok.model_max_length = 10**9
    root = root or default_corpus.stdlib_root()
    _, held = default_corpus.split_corpus(root)
    held = [h for h in held if default_corpus.is_heldout(h)]
    texts = {h: default_corpus.read_text(os.path.join(root, h)) for h in held}
    ntok = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    pyver = platform.python_version()

    code, qid = [], 0
    for h in held:
        lines = texts[h].split("\n")
        if len(lines) < 30:
            continue
        # 1) the file's opening lines (docstring, imports): continue the file
        n_open = min(24, len(lines) // 3)
        code.append({"question_id": qid, "category": "file_start", "turns": ["\n".join(lines[:n_open])],
                     "source": {"file": h, "lines": [1, n_open]}})
        qid += 1
        # 2) a function body after up to `context_tokens` tokens of the code before it
        defs = [i for i in _def_lines(lines) if i >= 8]
        picks = sorted({defs[len(defs) // 3], defs[(2 * len(defs)) // 3]}) if len(defs) >= 2 else defs[:1]
        for i in picks:
            start = i
            while start > 0 and ntok("\n".join(lines[start - 1: i + 1])) <= context_tokens:
                start -= 1
            code.append({"question_id": qid, "category": "func_body", "turns": ["\n".join(lines[start: i + 1])],
                         "source": {"file": h, "lines": [start + 1, i + 1]}})
            qid += 1
    for q in code:
        q["prompt_tokens"] = ntok(q["turns"][0])
        q["python"] = pyver

    # long context: whole held-out files concatenated (the codec tables excluded: mostly literals)
    pool = [h for h in held if not (h.startswith("encodings/cp") or len(texts[h]) < 1500)]
    longs, qid = [], 0
    for target_len, count in long_lengths:
        for j in range(count):
            start = (j * 7 + target_len // 1024) % len(pool)
            order = pool[start:] + pool[:start]
            parts, files, total = [], [], 1
            for h in order * 4:
                piece = f"# ===== {h} =====\n\n" + texts[h].rstrip("\n") + "\n\n"
                n = ntok(piece)
                if total + n <= target_len:
                    parts.append(piece)
                    files.append(h)
                    total += n
                    continue
                # the last file: cut right after a def line so the model writes its body
                lines = piece.split("\n")
                cut = None
                for i in reversed(_def_lines(lines)):
                    if total + ntok("\n".join(lines[: i + 1])) <= target_len:
                        cut = i
                        break
                if cut is not None:
                    parts.append("\n".join(lines[: cut + 1]))
                    files.append(f"{h}:1-{cut - 1}")
                    break
            text = "".join(parts)
            longs.append({"question_id": qid, "category": f"long_{round(target_len / 1024)}k", "turns": [text],
                          "source": {"files": files}, "prompt_tokens": ntok(text), "python": pyver})
            qid += 1

    os.makedirs(out_dir, exist_ok=True)
    for name, rows in (("stdlib_code", code), ("stdlib_long", longs)):
        with open(os.path.join(out_dir, SHIPPED_SETS[name]), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return {"stdlib_code": len(code), "stdlib_long": len(longs)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out-dir", default=PROMPTS_DIR, help="where the two .jsonl files go")
    ap.add_argument("--tokenizer", default="default", help="tokenizer that counts prompt tokens (a model dir or embedded name)")
    ap.add_argument("--root", default=None, help="standard-library root (None: this interpreter's)")
    ap.add_argument("--context-tokens", type=int, default=768, help="most tokens of code before a def line (stdlib_code)")
    a = ap.parse_args(argv)
    print(build_stdlib_prompt_sets(a.out_dir, tokenizer=a.tokenizer, root=a.root, context_tokens=a.context_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
