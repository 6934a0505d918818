#!/usr/bin/env bash
# Issue 22's measurement: tau and tokens/s of keyed vs rejection sampling for every method on the embedded
# model, at T = 0.7 and 1.0, in one run (same prompts, same machine). Each (sampling, T) is one
# `specdec bench` over the same questions; `specdec report` prints the per-method tables against that
# configuration's vanilla. With keyed sampling every method's answers must equal keyed vanilla's (checked
# here from the answer files: the script exits 1 if one differs).
#
#   scripts/keyed_vs_rejection.sh OUT_DIR [extra specdec bench flags...]
#   e.g. GPU:  scripts/keyed_vs_rejection.sh $OUT/keyed --question-end 20
#        CPU:  scripts/keyed_vs_rejection.sh runs/keyed_cpu --question-end 5 --max-new-tokens 64
set -euo pipefail
out=${1:?usage: scripts/keyed_vs_rejection.sh OUT_DIR [bench flags...]}
shift
mkdir -p "$out"
methods=vanilla,speculative,spec,tree_spec,logitspec,magicdec,pld
status=0
for t in 0.7 1.0; do
  for s in rejection keyed; do
    d="$out/${s}_t${t}"
    specdec bench --methods "$methods" --temperature "$t" --sampling "$s" --seed 1 --out-dir "$d" --no-progress "$@" \
      > "$d.log" 2>&1 || { echo "bench $s T=$t failed: see $d.log"; exit 1; }
    echo "=== sampling=$s temperature=$t ==="
    specdec report --base "$d/vanilla.jsonl" --no-per-category $(ls "$d"/*.jsonl | grep -v /vanilla.jsonl) | head -40
    if [ "$s" = keyed ]; then
      python3 - "$d" <<'PY' || status=1
import json, os, sys
d = sys.argv[1]
def answers(path):
    return {json.loads(l)["question_id"]: [c["turns"] for c in json.loads(l)["choices"]] for l in open(path)}
base = answers(os.path.join(d, "vanilla.jsonl"))
bad = [f for f in sorted(os.listdir(d)) if f.endswith(".jsonl") and answers(os.path.join(d, f)) != base]
print("keyed: every method's answers == keyed vanilla's" if not bad else f"keyed: DIFFERENT from vanilla: {bad}")
sys.exit(1 if bad else 0)
PY
    fi
  done
done
exit $status
