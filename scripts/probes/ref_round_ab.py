#!/usr/bin/env python3
"""A/B of the reference decoders' speed against an older revision, README command 1's methods on the CPU.

    python3 scripts/probes/ref_round_ab.py --rev 486d2c3                 # stdlib_code 0-9, 2 threads, 128 tokens
    python3 scripts/probes/ref_round_ab.py --rev 486d2c3 --threads 1 --out runs/ab_t1.jsonl

For each prompt, one fresh process per arm -- the older revision (its ``specdec`` package unpacked from git into a
temporary directory and imported instead of the installed one) and the working tree -- alternating, so drift in the
machine's speed hits both alike. Each process loads the shipped pair, warms up, then decodes the prompt with
vanilla, the GLIDE tree at a fixed shape and LogitSpec at a fixed capacity (fixed so that only the code differs,
not what ``auto`` would pick), and checks both against vanilla's tokens. Prints a table of medians; writes JSONL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import statistics
import subprocess
import sys
import tempfile

# package -> folder of the repository (pyproject.toml's package-dir)
PACKAGE_DIRS = {"specdec": "specdec", "specdec/ref": "ref", "specdec/fast": "fast", "specdec/shared": "shared"}


def worker(args: argparse.Namespace) -> None:
    """One arm on one prompt: print one JSON line."""
    import torch

    # (only APIs that older revisions have too: this runs inside the old arm's package; so not
    # benchutil.question_prompts, which is newer)
    from specdec import ref
    from specdec.bench import load_questions
    from specdec.shared.tokenizer import encode_prompt, load_tokenizer

    torch.set_num_threads(args.threads)
    shape = tuple(int(x) for x in args.tree_shape.split(","))
    target = ref.load_model("default")
    glide = ref.load_glide("default-glide", target=target)
    q = load_questions("stdlib_code", args.worker, args.worker + 1)[0]
    ids = torch.tensor([encode_prompt(load_tokenizer("default"), q["turns"][0])])
    t = ids.shape[1]
    runs = {
        "vanilla": lambda n: ref.vanilla_generate(target, ids, t, max_gen_len=n),
        "tree": lambda n: ref.tree_spec_generate(target, glide, ids, t, tree_shape=shape, max_gen_len=n),
        "logitspec": lambda n: ref.logitspec_generate(target, ids, t, draft_tree_capacity=args.capacity, max_gen_len=n),
    }
    for run in runs.values():
        run(8)  # warm-up
    res = {name: run(args.max_new_tokens) for name, run in runs.items()}
    rec = {"q": args.worker, "prompt_tokens": t, "package": os.path.dirname(ref.__file__)}   # which code ran
    for name, r in res.items():
        rec[f"{name}_tps"] = r.output_ids.shape[1] / r.elapsed_time
        rec[f"{name}_tau"] = r.tau
        rec[f"{name}_eq"] = torch.equal(r.output_ids, res["vanilla"].output_ids)
    print(json.dumps(rec))


def unpack_revision(rev: str, dest: str) -> str:
    """The package tree of ``rev`` under ``dest`` (importable as ``specdec``); returns the sys.path entry."""
    src = os.path.join(dest, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "archive", rev, *sorted(set(PACKAGE_DIRS.values()))], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    pkg = os.path.join(dest, "pkg")
    for package, folder in PACKAGE_DIRS.items():   # "specdec" first, then its subpackages inside it
        shutil.copytree(os.path.join(src, folder), os.path.join(pkg, package), dirs_exist_ok=True)
    return pkg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="the older revision (any git rev)")
    ap.add_argument("--begin", type=int, default=0)
    ap.add_argument("--end", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tree-shape", default="3,2,2", help="the GLIDE tree both arms run (README command 1's `auto` pick)")
    ap.add_argument("--capacity", type=int, default=12, help="LogitSpec's draft_tree_capacity for both arms")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default="runs/ref_round_ab.jsonl")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args)
        return 0
    me = os.path.abspath(__file__)
    common = ["--threads", str(args.threads), "--tree-shape", args.tree_shape, "--capacity", str(args.capacity),
              "--max-new-tokens", str(args.max_new_tokens), "--rev", args.rev]
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "w") as out:
        old_pkg = unpack_revision(args.rev, tmp)
        # the old arm: no site processing (so the installed editable package is not found), site-packages appended
        boot = ("import runpy, sys; sys.path.insert(0, {pkg!r}); sys.path.extend({site!r}); sys.argv = {argv!r}; "
                "runpy.run_path({me!r}, run_name='__main__')")
        for q in range(args.begin, args.end):
            for arm in ("old", "new"):
                argv = [me, "--worker", str(q), *common]
                cmd = ([sys.executable, "-S", "-c", boot.format(pkg=old_pkg, site=site.getsitepackages(), argv=argv, me=me)]
                       if arm == "old" else [sys.executable, *argv])
                rec = {"arm": arm, "rev": args.rev if arm == "old" else "working tree",
                       **json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])}
                out.write(json.dumps(rec) + "\n")
                out.flush()
                rows.append(rec)
                print(f"q{q} {arm}: tree {rec['tree_tps'] / rec['vanilla_tps']:.2f}x, logitspec {rec['logitspec_tps'] / rec['vanilla_tps']:.2f}x",
                      file=sys.stderr)
    from tabulate import tabulate

    table = []
    for arm in ("old", "new"):
        r = [x for x in rows if x["arm"] == arm]
        line = [f"{arm} ({r[0]['rev']})", f"{statistics.median(x['vanilla_tps'] for x in r):.0f}"]
        for m in ("tree", "logitspec"):
            ratio = [x[f"{m}_tps"] / x["vanilla_tps"] for x in r]
            line += [f"{statistics.median(x[f'{m}_tps'] for x in r):.0f}",
                     f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f})", f"{statistics.median(x[f'{m}_tau'] for x in r):.2f}"]
        line.append(f"{sum(x['tree_eq'] and x['logitspec_eq'] for x in r)} / {len(r)}")
        table.append(line)
    print(tabulate(table, headers=["arm", "vanilla tok/s", f"tree {args.tree_shape} tok/s", "tree / vanilla", "tree tau",
                                   f"LogitSpec cap {args.capacity} tok/s", "LogitSpec / vanilla", "LogitSpec tau", "== vanilla"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
