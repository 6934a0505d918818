"""``specdec report``: speed tables from ``specdec bench`` answer files (Spec-Bench's metrics).

Per question ``q`` (all turns summed)::

    tokens_q = sum(new_tokens)          as RECORDED by the run (never re-tokenised)
    time_q   = sum(wall_time)           whole generate call: prefill + decode
    tput_q   = tokens_q / time_q

Per category and overall, over the questions present in BOTH the base file and the method file::

    tok/s    = mean_q tput_q                                   (Spec-Bench's "tokens per second")
    speedup  = mean_q tput_q(method) / mean_q tput_q(base)     (Spec-Bench's "speedup ratio")
    tau      = sum(accept_lengths) / len(accept_lengths)       pooled over every target pass of every
                                                                question (the prefill's pass included;
                                                                vanilla = 1.0)
    hist     = share of target passes that emitted 1, 2, ... tokens
    decode   = sum(tokens - 1) / sum(decode_time)              steady-state tokens/s after the first token
    ttft     = mean prefill_time                               time to first token
    same     = share of turns whose output ids equal the base file's (greedy runs: losslessness)
    spread   = median over turns of (max - min) / median of the turn's N walls     (``bench --repeats N``:
                                                                run-to-run noise; shown only when recorded)

How Spec-Bench's ``evaluation/speed.py`` differs: it counts the method's tokens from the recorded
``new_tokens`` but the baseline's by RE-TOKENISING the baseline's decoded text
(``len(tokenizer(turn).input_ids) - 1`` per turn). Decoded-and-re-encoded text need not have the
same length as the generated ids (merges across token boundaries, special tokens dropped by
``skip_special_tokens``, the ``- 1`` for a BOS the tokenizer may not add), so the two sides of its
ratio are counted differently. Here both sides use the recorded counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter
from typing import Any, Sequence

from specdec.methods import canonical_method

__all__ = ["load_answers", "question_stats", "aggregate", "compare", "format_report", "add_report_args", "run_report", "report_main"]

OVERALL = "overall"


_HINT = "pass a `specdec bench` answer file (<out-dir>/<method>.jsonl)"


def load_answers(path: str) -> list[dict]:
    """Records of an answer file (one JSON object per line; blank lines skipped).

    Anything else is a one-line ValueError naming the file and the line: not found, a folder, not
    UTF-8 text, a line that is not a JSON object, a record without ``choices`` (e.g. a question file)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder, not a bench answer file; pass one of its <method>.jsonl files")
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file; {_HINT}")
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            where = f"{path}: not a bench answer file"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: line {i + 1} is not UTF-8 text; {_HINT}") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: line {i + 1} is not JSON ({e.msg} at column {e.colno}); {_HINT}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: line {i + 1} is a JSON {type(rec).__name__}, not an answer record; {_HINT}")
            if "choices" not in rec or not rec["choices"] or not isinstance(rec["choices"], list) or not isinstance(rec["choices"][0], dict):
                what = " (a Spec-Bench question: it has 'turns')" if "turns" in rec else ""
                raise ValueError(f"{where}: line {i + 1} is not an answer record (no 'choices'){what}; {_HINT}")
            ch = rec["choices"][0]
            for key in ("new_tokens", "wall_time"):
                if key not in ch:
                    raise ValueError(f"{path}:{i + 1}: answer record without '{key}'")
            out.append(rec)
    if not out:
        raise ValueError(f"{path}: no answer records")
    return out


def method_name(records: list[dict], path: str = "") -> str:
    """The label of an answer file: its method (one name per method, :mod:`specdec.methods`) and backend."""
    r = records[0]
    name = r.get("method") or r.get("model_id") or path
    try:  # a decoder function name recorded by another tool -> the method's name
        name = canonical_method(name)
    except ValueError:
        pass  # a peer or another program's label: as recorded
    backend = r.get("backend")
    return f"{name} ({backend})" if backend and backend not in ("transformers",) and name not in ("",) else name


def question_stats(rec: dict) -> dict:
    """Per-question sums from one answer record."""
    ch = rec["choices"][0]
    tokens = int(sum(ch["new_tokens"]))
    wall = float(sum(ch["wall_time"]))
    pre = ch.get("prefill_time") or []
    dec = ch.get("decode_time") or []
    al = ch.get("accept_lengths")
    return {
        "question_id": rec["question_id"],
        "category": rec.get("category", "default"),
        "tokens": tokens,
        "wall": wall,
        "tput": tokens / wall if wall > 0 else 0.0,
        "turns": len(ch["new_tokens"]),
        "prefill": [float(p) for p in pre if p is not None],
        "decode_tokens": sum(int(n) - 1 for n, d in zip(ch["new_tokens"], dec) if d is not None and int(n) > 0),
        "decode_time": sum(float(d) for d in dec if d is not None),
        "accept_lengths": [int(a) for a in al] if al else None,
        "output_ids": ch.get("output_ids"),
        "repeat_spreads": [x for x in map(_spread, ch.get("wall_time_repeats") or []) if x is not None],
    }


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _spread(walls) -> float | None:
    """One turn's run-to-run spread from its repeats' walls: ``(max - min) / median``; None for fewer than two
    walls, a non-list or a non-positive median (nothing to say)."""
    if not isinstance(walls, list) or len(walls) < 2 or not all(isinstance(w, (int, float)) for w in walls):
        return None
    mid = statistics.median(walls)
    return (max(walls) - min(walls)) / mid if mid > 0 else None


def aggregate(stats: list[dict]) -> dict:
    """Metrics of a group of questions (one method, one category)."""
    lens = [a for s in stats for a in (s["accept_lengths"] or [])]
    have_al = all(s["accept_lengths"] is not None for s in stats)
    pre = [p for s in stats for p in s["prefill"]]
    dt = sum(s["decode_time"] for s in stats)
    spreads = [x for s in stats for x in s["repeat_spreads"]]
    return {
        "questions": len(stats),
        "tokens": sum(s["tokens"] for s in stats),
        "tokens_per_question": _mean([s["tokens"] for s in stats]),
        "tok_s": _mean([s["tput"] for s in stats]),
        "tau": (sum(lens) / len(lens)) if (lens and have_al) else None,
        "passes": len(lens) if have_al else None,
        "hist": dict(sorted(Counter(lens).items())) if have_al else None,
        "decode_tok_s": (sum(s["decode_tokens"] for s in stats) / dt) if dt > 0 else None,
        "ttft_ms": 1e3 * _mean(pre) if pre else None,
        "repeat_spread": statistics.median(spreads) if spreads else None,
    }


def _same_outputs(base: list[dict], other: list[dict]) -> float | None:
    same = total = 0
    for b, o in zip(base, other):
        if b["output_ids"] is None or o["output_ids"] is None:
            return None
        for tb, to in zip(b["output_ids"], o["output_ids"]):
            total += 1
            same += int(list(tb) == list(to))
    return same / total if total else None


def compare(base: list[dict], methods: dict[str, list[dict]], base_name: str = "base") -> dict:
    """Report data: ``{"categories": {cat: {name: metrics}}, "unmatched": {name: n}}`` with
    categories in first-seen order plus ``overall``; the base is listed first under ``base_name``."""
    bstats = {s["question_id"]: s for s in map(question_stats, base)}
    cats: list[str] = []
    for s in bstats.values():
        if s["category"] not in cats:
            cats.append(s["category"])
    out: dict[str, Any] = {"categories": {c: {} for c in cats + [OVERALL]}, "unmatched": {}}
    for name, recs in [(base_name, base)] + list(methods.items()):
        mstats = {s["question_id"]: s for s in map(question_stats, recs)}
        common = [q for q in bstats if q in mstats]
        out["unmatched"][name] = len(set(bstats) ^ set(mstats))
        for cat in cats + [OVERALL]:
            qs = [q for q in common if cat == OVERALL or bstats[q]["category"] == cat]
            if not qs:
                continue
            m = aggregate([mstats[q] for q in qs])
            b = aggregate([bstats[q] for q in qs])
            m["speedup"] = (m["tok_s"] / b["tok_s"]) if (m["tok_s"] and b["tok_s"]) else None
            m["same_output"] = _same_outputs([bstats[q] for q in qs], [mstats[q] for q in qs])
            out["categories"][cat][name] = m
    return out


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_report(data: dict, markdown: bool = False, hist_max: int = 8, per_category: bool = True) -> str:
    """tabulate text: per-category tables, the overall table, a speedup/tau matrix, and the
    accept-length histogram (overall)."""
    from tabulate import tabulate

    fmt = "github" if markdown else "simple"
    head = ["method", "q", "tokens/q", "tok/s", "speedup", "tau", "decode tok/s", "TTFT ms", "same out"]
    # the run-to-run spread column only when some file recorded repeats (bench --repeats N)
    spread = any(m["repeat_spread"] is not None for c in data["categories"].values() for m in c.values())
    if spread:
        head = head + ["repeat spread"]
    blocks = []

    def table(cat: str) -> str:
        rows = []
        for name, m in data["categories"][cat].items():
            rows.append([name, m["questions"], _f(m["tokens_per_question"], ".1f"), _f(m["tok_s"], ".1f"),
                         _f(m["speedup"], ".2f") + ("x" if m["speedup"] is not None else ""), _f(m["tau"], ".2f"),
                         _f(m["decode_tok_s"], ".1f"), _f(m["ttft_ms"], ".1f"),
                         "-" if m["same_output"] is None else f"{100 * m['same_output']:.0f}%"]
                        + (["-" if m["repeat_spread"] is None else f"{100 * m['repeat_spread']:.1f}%"] if spread else []))
        return tabulate(rows, headers=head, tablefmt=fmt, disable_numparse=True)

    cats = [c for c in data["categories"] if c != OVERALL and data["categories"][c]]
    if per_category and len(cats) > 1:
        for c in cats:
            blocks.append(("**" if markdown else "") + f"category: {c}" + ("**" if markdown else "") + "\n\n" + table(c))
    blocks.append(("**" if markdown else "") + "overall" + ("**" if markdown else "") + "\n\n" + table(OVERALL))

    if len(cats) > 1:  # compact matrix: speedup (tau) per category
        names = list(data["categories"][OVERALL])
        rows = []
        for n in names:
            row = [n]
            for c in cats + [OVERALL]:
                m = data["categories"][c].get(n)
                row.append("-" if m is None or m["speedup"] is None else
                           f"{m['speedup']:.2f}x" + ("" if m["tau"] is None else f" ({m['tau']:.2f})"))
            rows.append(row)
        blocks.append(("**" if markdown else "") + "speedup (tau) by category" + ("**" if markdown else "") + "\n\n"
                      + tabulate(rows, headers=["method"] + cats + [OVERALL], tablefmt=fmt, disable_numparse=True))

    rows = []
    for n, m in data["categories"][OVERALL].items():
        h = m["hist"]
        if not h:
            continue
        total = sum(h.values())
        row = [n, total]
        for k in range(1, hist_max):
            row.append(f"{100 * h.get(k, 0) / total:.1f}")
        row.append(f"{100 * sum(v for k, v in h.items() if k >= hist_max) / total:.1f}")
        rows.append(row)
    if rows:
        blocks.append(("**" if markdown else "") + "accept-length histogram, % of target passes (overall)" + ("**" if markdown else "")
                      + "\n\n" + tabulate(rows, headers=["method", "passes"] + [str(k) for k in range(1, hist_max)] + [f">={hist_max}"],
                                          tablefmt=fmt, disable_numparse=True))
    warn = [f"{n}: {k} question(s) not in both files (left out)" for n, k in data["unmatched"].items() if k]
    if warn:
        blocks.append("note: " + "; ".join(warn))
    return "\n\n".join(blocks) + "\n"


def add_report_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--base", required=True, help="the vanilla answer file (speedups are against it)")
    ap.add_argument("files", nargs="*", help="method answer files")
    ap.add_argument("--file", action="append", default=[], help="a method answer file (repeatable)")
    ap.add_argument("--markdown", action="store_true", help="GitHub markdown tables (for BENCHMARKS.md)")
    ap.add_argument("--json", action="store_true", help="print the report data as JSON instead of tables")
    ap.add_argument("--hist-max", type=int, default=8, help="histogram columns 1..N-1 and >=N")
    ap.add_argument("--no-per-category", action="store_true",
                    help="leave out each category's full table (the overall table, the compact speedup (tau) matrix "
                         "by category and the histogram stay)")
    return ap


def _load(flag: str, path: str) -> list[dict]:
    try:
        return load_answers(path)
    except ValueError as e:
        raise ValueError(f"{flag}{e}") from None


def run_report(args) -> str:
    base = _load("--base ", args.base)
    base_name = method_name(base, args.base)
    methods: dict[str, list[dict]] = {}
    for p in list(args.files) + list(args.file):
        recs = _load("", p)
        name = method_name(recs, p)
        while name in methods or name == base_name:
            name += "'"
        methods[name] = recs
    data = compare(base, methods, base_name=base_name)
    data["base_file"] = args.base
    data["meta"] = {base_name: base[0].get("meta")}
    for n, r in methods.items():
        data["meta"][n] = r[0].get("meta")
    if args.json:
        return json.dumps(data, indent=1, default=str)
    return format_report(data, markdown=args.markdown, hist_max=args.hist_max, per_category=not args.no_per_category)


def report_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specdec report", description="speed tables from specdec bench answer files")
    add_report_args(ap)
    args = ap.parse_args(argv)
    try:
        print(run_report(args), end="")
    except (ValueError, OSError) as e:
        print(f"specdec report: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cli_run(args) -> int:
    print(run_report(args), end="")
    return 0


try:  # `specdec report` (specdec/cli.py imports this module and calls the registered entry)
    from specdec.cli import register_subcommand

    register_subcommand("report", add_report_args, _cli_run, help="speed tables from specdec bench answer files")
except ImportError:  # pragma: no cover - a build without the CLI module
    pass


if __name__ == "__main__":
    raise SystemExit(report_main())
