#!/usr/bin/env bash
# Retrain the embedded default model (issue 21, item 1): Python stdlib + installed packages' source,
# 8192-token windows and an 8192-position config, then the draft LM and the GLIDE draft for it.
#
#   scripts/retrain_default.sh [--install] STAGE [STAGE...]
#
# Stages (in this order; each is one step of the recipe and can be rerun alone):
#   prep        CPU machine: copy this interpreter's stdlib corpus (Python 3.11.7 here: the 1755 + 29 files
#               of the shipped model) to runs/stdlib_py311, to be carried to the GPU machine so its stdlib
#               part and the stdlib held-out set are exactly today's (1.745 nats/token there today)
#   setup       pip install -e . (the GLIDE trainer imports specdec.ref)
#   corpus      pack stdlib + this machine's installed packages -> $RUN/data (streams, meta.json, manifest.json)
#   target      the 14-layer target, $TARGET_MIN minutes (or $TARGET_STEPS steps), 8192-token windows
#   draft       the 2-layer draft LM distilled from it, $DRAFT_MIN minutes (or $DRAFT_STEPS)
#   glide       the GLIDE draft: 1024-token windows with anchor-offset positions up to 8192, distill 0.5,
#               $GLIDE_SHORT_MIN min; then 8192-token windows (real long-context cross-attention), distill 1.0,
#               $GLIDE_LONG_MIN min, from the first phase's weights (and the third phase when GLIDE_MORE_MIN/STEPS > 0)
#   target-more continue $RUN/lm/target (from any earlier session: carry runs/retrain/lm) at $SEQ-token windows for
#               $TARGET_MORE_MIN minutes (or $TARGET_MORE_STEPS) at lr $TARGET_LR2; the result replaces $RUN/lm/target
#               (its log: $RUN/lm/target_more_log.jsonl). Its drafts then need `draft glide` again.
#   glide-more  only the third GLIDE phase (1024-token windows, distill 1.0, $GLIDE_MORE_MIN min) from $RUN/glide_long's
#               (GLIDE_MORE_FROM=last: from the last third phase instead, which is kept as $RUN/glide_more.N -- more
#               training that adds up across sessions; carry runs/retrain/glide_more too)
#               weights: more training for an existing run's draft (carry runs/retrain/{lm,glide_short,glide_long})
#   eval        held-out loss per source: shipped and new target/draft at 1024-token windows (today's
#               measure), new ones at 8192 -> $RUN/eval.jsonl
#   acceptance  the new GLIDE's measured acceptance (scripts/measure_acceptance.py, 40 prompts) -> its
#               acceptance.json (the shipped draft must carry one; CPU fallback: DEVICE=cpu, ~20 min)
#   ship        stage $RUN/ship in the layout of shared/assets/default (target/ draft/ glide/ logs/) and
#               check it is <= 24 MiB (exit 1 if not); with --install ALSO replace shared/assets/default's
#               target/ draft/ glide/ logs/ with it. SHIP_DIR=DIR --install ship-only installs a staged copy
#               (e.g. the one the device returned) without rebuilding it.
#   all         setup corpus target draft glide eval ship
#
# Time budget (the GPU session has 30 min of device time in all): session 12 ran it as three device calls
# of <= 10 min on one warm H200 (the machine keeps $RUN between calls while warm -- it goes back after 30 s
# idle, so have each next call ready), 17.7 min of device time with start-up, then `ship` on the CPU:
#   CPU:      scripts/retrain_default.sh prep
#   device 1: corpus, then target for the rest of the call      (carry: runs/stdlib_py311.tar.xz; 501 s)
#             scripts/retrain_default.sh corpus; TARGET_MIN=<(545 s - elapsed) / 60 - 0.6> scripts/retrain_default.sh target
#   device 2: draft glide, the minutes split 0.22 / 0.27 / 0.22 of ~560 s  (433 s)
#   device 3: eval acceptance                                   (128 s; GPU tests can run beside it)
#   CPU:      cat <files_at>/retrain_state.tar.part* | tar -C runs/retrain -xf -
#             scripts/retrain_default.sh ship  (check; with --install it replaces shared/assets/default)
# Each call returns $RUN (no token streams, no ship/) as $OUT/retrain_state.tar.partNN. If the machine went
# cold between calls, start the next one with `setup corpus` (packing is deterministic) and carry the
# unpacked runs/retrain/lm (and glide_*) back: carry replaces those paths there.
# Session 19 ran the same three calls on an H100 with STDLIB_REPEAT=6 TARGET_SEQ1=1024 (TARGET_MIN=7.12; BENCHMARKS
# "Session 19: a second retrain"): the target qualified, its GLIDE draft (4.7 min) accepted less than the shipped one.
# Session 22 continued it and shipped it (BENCHMARKS "Session 22: the retrained model"), three calls on one warm H100
# (carry runs/stdlib_py311.tar.xz runs/retrain/lm runs/retrain/glide_short runs/retrain/glide_long):
#   export STDLIB_REPEAT=6
#   scripts/retrain_default.sh setup corpus; TARGET_MORE_MIN=6.4 scripts/retrain_default.sh target-more      (391 s)
#   DRAFT_MIN=1.8 scripts/retrain_default.sh draft; GLIDE_MORE_MIN=4.9 scripts/retrain_default.sh glide-more acceptance   (544 s)
#   scripts/retrain_default.sh eval; then on the CPU: ship, SHIP_DIR=runs/retrain/ship ... --install ship-only
# More GLIDE training for the shipped draft, adding up (one call; carry the same plus runs/retrain/glide_more;
# ~82 s packing + the minutes + ~60 s acceptance):
#   STDLIB_REPEAT=6 scripts/retrain_default.sh setup corpus
#   GLIDE_MORE_FROM=last GLIDE_MORE_MIN=7 scripts/retrain_default.sh glide-more acceptance
# Session 26 (BENCHMARKS "sequence-level unlikelihood"): the shipped target continued against greedy loops, then both
# drafts continued for it, in ONE call (H100, 503 s). The shipped model is the starting point: copy
# shared/assets/default/target to $RUN/lm/target and shared/assets/default/glide to $RUN/glide_more/glide rather than
# carry them (carry runs/stdlib_py311.tar.xz runs/retrain/glide_long only):
#   STDLIB_REPEAT=6 scripts/retrain_default.sh setup corpus
#   TARGET_SEQ_UL=1.0 TARGET_SEQ_UL_EVERY=2 TARGET_SEQ_UL_BATCH=32 TARGET_LR2=3e-4 TARGET_KEEP=last TARGET_MORE_MIN=3.4 \
#     scripts/retrain_default.sh target-more
#   OUT= DRAFT_INIT=shared/assets/default/draft DRAFT_LR=1e-3 DRAFT_MIN=1.6 scripts/retrain_default.sh draft &   # beside:
#   OUT= GLIDE_MORE_FROM=last GLIDE_MORE_MIN=2.0 scripts/retrain_default.sh glide-more; wait; (tar $RUN to $OUT); eval
# Its target did not qualify (stdlib 1.473 > 1.45; median distinct 4-grams 0.462 < 0.6); the sequence-level term
# costs ~7.7x the step time (733 vs ~95 ms), so more CE minutes need a longer call or fewer, larger updates.
#
# Token counts, ESTIMATED from the shipped run (H100, 1024-token windows: target 62.8 ms per 32k-token step
# with evaluations, draft 37 ms, GLIDE 51.8 / 63.9 ms per 16k-token step plain / distilled; see
# shared/assets/default/logs/summary.json) plus the extra attention of 8192-token windows (8x the attention
# FLOPs per token; ~45 ms per step for the target at ~150 TFLOP/s): target ~95 ms/step -> ~3,500 steps x
# 32,768 = ~115M tokens (~1.4 epochs of ~83M: stdlib 9.1M + packages ~74M on the CPU machine's packages);
# draft ~55 ms/step -> ~2,000 steps, ~65M tokens; GLIDE short ~64 ms/step -> ~2,100 steps x 16,384 = ~34M
# tokens, GLIDE long ~130 ms/step (reference attention, materialized) -> ~800 steps x 16,384 = ~13M. The
# real counts are logged ("ms/step -> N steps"); repeat a run exactly with TARGET_STEPS=N etc.
#
# Environment (defaults): RUN=runs/retrain, STDLIB_ROOT=runs/stdlib_py311 if present (else this
# interpreter's stdlib, with a warning: then the stdlib held-out set is not today's 29 files),
# SOURCES=stdlib,packages, STDLIB_REPEAT=1 (the stdlib's training stream this many times in the mixture:
# session 12's run with 1 had the stdlib at 7.5 % and lost 0.2-0.4 nats on its held-out files), SEQ=8192,
# MAXPOS=8192, TARGET_MIN=6, TARGET_SEQ1 (unset: one target phase at SEQ; e.g. 1024: a first phase at those
# windows for TARGET_FRAC1=0.75 of TARGET_MIN, then SEQ-token windows from its weights at TARGET_LR2=6e-4 -- less
# long-window copying, still real 8192 positions), DRAFT_MIN=2, GLIDE_SHORT_MIN=2.5,
# GLIDE_LONG_MIN=2, TARGET_MORE_MIN=0 / TARGET_MORE_STEPS=0 (the target-more stage's length), GLIDE_MORE_MIN=0 (> 0: a third GLIDE phase, 1024-token windows, distill 1.0, lr 6e-4, from the
# long phase's weights; `ship` then ships it), GLIDE_MORE_FROM=long (or last: the third phase continues the previous
# third phase, kept as $RUN/glide_more.N and shipped with its log), TARGET_STEPS/DRAFT_STEPS/GLIDE_SHORT_STEPS/GLIDE_LONG_STEPS/GLIDE_MORE_STEPS
# (0: from the minutes; TARGET_STEPS1/TARGET_STEPS2 fix the two phases' counts when TARGET_SEQ1 is set),
# EVAL_TOKENS=262144 (held-out tokens per source evaluated during training; `eval` uses all),
# TARGET_ARCH/DRAFT_ARCH (JSON overrides of the shapes; the 24 MiB budget leaves ~0.6M parameters of room),
# LM_TOKENS=32768 / GLIDE_TOKENS=16384 (tokens per optimizer step of the LMs / the GLIDE draft; batch = tokens / window),
# GLIDE_SEQ1=1024 (the GLIDE's short windows), TARGET_UL (unset: off; a weight, e.g. 1.0: the target stages add the
# token-level unlikelihood term of train_default.py --unlikelihood, negatives the distinct tokens of the last
# TARGET_UL_WINDOW=64 context tokens -- against greedy loops, issue 21), TARGET_SEQ_UL (unset: off; a weight, e.g. 1.0:
# the sequence-level term -- every TARGET_SEQ_UL_EVERY=4 steps TARGET_SEQ_UL_BATCH=64 prefixes of TARGET_SEQ_UL_PREFIX=32
# training tokens (TARGET_SEQ_UL_SOURCE=all of the stream, or one source, e.g. stdlib) continued greedily by the target
# for TARGET_SEQ_UL_LEN=96 tokens, their repeated 4-grams pushed down),
# DRAFT_LR=3e-3 (the draft stage's peak learning rate), TARGET_KEEP=best (target-more saves the best held-out checkpoint; last: the last step's), DRAFT_INIT (unset: the draft LM from a fresh init; a saved draft dir, e.g. shared/assets/default/draft: continue it), DEVICE (default: cuda if available). $OUT (the device's return folder), when set, receives everything
# under $RUN except the token streams and ship/ as one tar in 15 MiB parts, $OUT/retrain_state.tar.partNN.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/retrain}
SOURCES=${SOURCES:-stdlib,packages}
STDLIB_REPEAT=${STDLIB_REPEAT:-1}
TARGET_SEQ1=${TARGET_SEQ1:-}
TARGET_FRAC1=${TARGET_FRAC1:-0.75}
TARGET_LR2=${TARGET_LR2:-6e-4}
SEQ=${SEQ:-8192}
MAXPOS=${MAXPOS:-8192}
TARGET_MIN=${TARGET_MIN:-6}
DRAFT_MIN=${DRAFT_MIN:-2}
GLIDE_SHORT_MIN=${GLIDE_SHORT_MIN:-2.5}
GLIDE_LONG_MIN=${GLIDE_LONG_MIN:-2}
TARGET_STEPS=${TARGET_STEPS:-0}
DRAFT_STEPS=${DRAFT_STEPS:-0}
GLIDE_SHORT_STEPS=${GLIDE_SHORT_STEPS:-0}
GLIDE_LONG_STEPS=${GLIDE_LONG_STEPS:-0}
GLIDE_MORE_MIN=${GLIDE_MORE_MIN:-0}
GLIDE_MORE_STEPS=${GLIDE_MORE_STEPS:-0}
GLIDE_MORE_FROM=${GLIDE_MORE_FROM:-long}
case "$GLIDE_MORE_FROM" in long|last) ;; *) echo "GLIDE_MORE_FROM must be long or last, got '$GLIDE_MORE_FROM'" >&2; exit 2 ;; esac
TARGET_MORE_MIN=${TARGET_MORE_MIN:-0}
TARGET_MORE_STEPS=${TARGET_MORE_STEPS:-0}
TARGET_STEPS1=${TARGET_STEPS1:-0}
LM_TOKENS=${LM_TOKENS:-32768}
GLIDE_TOKENS=${GLIDE_TOKENS:-16384}
GLIDE_SEQ1=${GLIDE_SEQ1:-1024}
TARGET_STEPS2=${TARGET_STEPS2:-0}
EVAL_TOKENS=${EVAL_TOKENS:-262144}
TOK=shared/assets/default/target
ASSETS=${ASSETS:-shared/assets/default}  # (overridable for a dry run)
BUDGET_BYTES=$((24 * 1024 * 1024))
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TD="$PY scripts/train_default.py"
DEV_FLAG=()
if [ -n "${DEVICE:-}" ]; then DEV_FLAG=(--device "$DEVICE"); fi
ARCH_FLAGS=()
if [ -n "${TARGET_ARCH:-}" ]; then ARCH_FLAGS+=(--target-arch "$TARGET_ARCH"); fi
if [ -n "${DRAFT_ARCH:-}" ]; then ARCH_FLAGS+=(--draft-arch "$DRAFT_ARCH"); fi
# the target's token-level unlikelihood term (train_default.py --unlikelihood / --ul-window), every target stage
UL_FLAGS=()
if [ -n "${TARGET_UL:-}" ]; then UL_FLAGS+=(--unlikelihood "$TARGET_UL" --ul-window "${TARGET_UL_WINDOW:-64}"); fi
# and its sequence-level term (--seq-unlikelihood: the target's own greedy continuations, their repeated 4-grams)
if [ -n "${TARGET_SEQ_UL:-}" ]; then UL_FLAGS+=(--seq-unlikelihood "$TARGET_SEQ_UL" --seq-ul-every "${TARGET_SEQ_UL_EVERY:-4}"
  --seq-ul-batch "${TARGET_SEQ_UL_BATCH:-64}" --seq-ul-prefix "${TARGET_SEQ_UL_PREFIX:-32}" --seq-ul-len "${TARGET_SEQ_UL_LEN:-96}"
  --seq-ul-source "${TARGET_SEQ_UL_SOURCE:-all}" --seq-ul-marks "${TARGET_SEQ_UL_MARKS:-all}"); fi
# the draft LM: from a fresh init (default) or continued from a saved draft (DRAFT_INIT=DIR, e.g. the shipped one)
DRAFT_INIT_FLAGS=()
if [ -n "${DRAFT_INIT:-}" ]; then DRAFT_INIT_FLAGS+=(--draft-init "$DRAFT_INIT"); fi

install=0
stages=()
for a in "$@"; do
  case "$a" in
    --install) install=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    prep|setup|corpus|target|target-more|draft|glide|glide-more|eval|acceptance|ship|ship-only) stages+=("$a") ;;
    all) stages+=(setup corpus target draft glide eval ship) ;;
    *) echo "retrain_default.sh: unknown stage or flag '$a'; expected --install and stages among" \
            "prep setup corpus target target-more draft glide glide-more eval acceptance ship ship-only all" >&2; exit 2 ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || { echo "usage: scripts/retrain_default.sh [--install] STAGE... (--help)" >&2; exit 2; }
mkdir -p "$RUN/logs"

mirror() {  # pack $RUN (without the token streams and the staged ship) into $OUT, when the device gave us one
  # The device returns at most 8 files of <= 16 MiB, <= 2 folders down: one tar in 15 MiB parts.
  # Unpack here with: cat <files_at>/retrain_state.tar.part* | tar -C runs/retrain -xf -
  [ -n "${OUT:-}" ] || return 0
  rm -f "$OUT"/retrain_state.tar.part*
  tar -C "$RUN" --exclude='*.pt' --exclude=./ship -cf - . | split -b 15m -d -a 2 - "$OUT/retrain_state.tar.part"
}

step() {  # step NAME CMD...: run, log to $RUN/logs/NAME.log, mirror
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$RUN/logs/$name.log"
  echo "=== $name done in $((SECONDS - t0)) s"
  mirror
}

stdlib_root() {
  if [ -n "${STDLIB_ROOT:-}" ]; then echo "$STDLIB_ROOT"
  elif [ -d runs/stdlib_py311 ]; then echo runs/stdlib_py311
  elif [ -f runs/stdlib_py311.tar.xz ]; then tar -C runs -xJf runs/stdlib_py311.tar.xz && echo runs/stdlib_py311
  else
    echo "WARNING: no runs/stdlib_py311 (run 'prep' on the CPU machine and carry it): using this interpreter's" \
         "stdlib; its held-out set is not the 29 files today's 1.745 was measured on" >&2
    $PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])'
  fi
}

asked() {  # asked MINUTES STEPS: 1 when a phase is given a length (minutes or steps > 0), else 0
  $PY -c "print(int(float('$1') > 0 or int('$2') > 0))"
}

drop_glide_more() {  # remove the run's third GLIDE phase and its earlier continuations ($RUN/glide_more.N)
  rm -rf "$RUN/glide_more" "$RUN"/glide_more.[0-9]*
}

glide_more() {  # 1 when a third GLIDE phase is asked for (GLIDE_MORE_MIN or GLIDE_MORE_STEPS > 0)
  asked "$GLIDE_MORE_MIN" "$GLIDE_MORE_STEPS"
}

run_glide_more() {  # the third GLIDE phase: 1024-token windows (GLIDE_SEQ1), distill 1.0, from the long phase -- or
  # (GLIDE_MORE_FROM=last) from the previous third phase, moved to the next free $RUN/glide_more.N and shipped's history
  local init="$RUN/glide_long/glide" n=1
  if [ "$GLIDE_MORE_FROM" = last ] && [ -d "$RUN/glide_more/glide" ]; then
    while [ -d "$RUN/glide_more.$n" ]; do n=$((n + 1)); done
    mv "$RUN/glide_more" "$RUN/glide_more.$n"
    init="$RUN/glide_more.$n/glide"
  else
    drop_glide_more   # from the long phase: earlier continuations are stale
  fi
  echo "glide-more: from $init"
  step glide_more $TD glide --target "$RUN/lm/target" --data "$RUN/data" --out "$RUN/glide_more" ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} \
    --init "$init" --seq "$GLIDE_SEQ1" --batch $((GLIDE_TOKENS / GLIDE_SEQ1)) --lr 6e-4 --warmup 50 --distill 1.0 \
    --minutes "$GLIDE_MORE_MIN" --steps "$GLIDE_MORE_STEPS" --eval-every 1000 --eval-tokens $((EVAL_TOKENS / 2))
}

last_glide() {  # the GLIDE checkpoint the acceptance and ship stages use: the last phase that ran
  if [ -d "$RUN/glide_more/glide" ]; then echo "$RUN/glide_more/glide"; else echo "$RUN/glide_long/glide"; fi
}

size_check() {  # size_check DIR: sum of every file's size <= 24 MiB
  $PY - "$1" "$BUDGET_BYTES" <<'PY'
import os, sys
root, budget = sys.argv[1], int(sys.argv[2])
total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
print(f"size: {root}: {total:,} bytes = {total / 2**20:.2f} MiB (budget {budget / 2**20:.0f} MiB)")
sys.exit(0 if total <= budget else 1)
PY
}

ship_log() {  # ship_log SRC DST: copy a training log into the ship, thinned to <= SHIP_LOG_LINES lines when longer
  # (the GLIDE trainer logs every step: 12k steps are 1.8 MB, 7 % of the 24 MiB budget). Kept: every
  # evaluation line, every k-th step line and the last one; the whole log stays in $RUN.
  $PY - "$1" "$2" "${SHIP_LOG_LINES:-2000}" <<'PY'
import json, sys
src, dst, cap = sys.argv[1], sys.argv[2], int(sys.argv[3])
lines = [l for l in open(src) if l.strip()]
if len(lines) <= cap:
    open(dst, "w").writelines(lines)
    sys.exit(0)
evals = {i for i, l in enumerate(lines) if any(k.startswith(("eval", "heldout")) for k in json.loads(l))}
k = -(-(len(lines) - len(evals)) // max(1, cap - len(evals) - 1))
steps = [i for i in range(len(lines)) if i not in evals]
keep = (evals | set(steps[::k]) | {steps[-1]}) if steps else evals
open(dst, "w").writelines(lines[i] for i in sorted(keep))
print(f"ship: {dst}: {len(keep)} of {len(lines)} lines (every evaluation, every k = {k} step lines; the whole log: {src})")
PY
}

install_ship() {  # install_ship DIR: replace shared/assets/default/{target,draft,glide,logs} with DIR's
  local src=$1
  for sub in target draft glide logs; do
    [ -d "$src/$sub" ] || { echo "install: $src/$sub missing; nothing installed" >&2; exit 1; }
  done
  [ -f "$src/glide/acceptance.json" ] || echo "WARNING: $src/glide has no acceptance.json (run the acceptance stage):" \
      "tests/shared/test_tree_search.py expects the shipped draft to carry one" >&2
  size_check "$src" || { echo "install: $src is over budget; nothing installed" >&2; exit 1; }
  # LogitSpec's measured tokens per round belong to the target's weights: keep them when the weights are the same
  # bytes (a GLIDE-only retrain), else say they must be measured again.
  local stats="$ASSETS/target/logitspec_acceptance.json" kept=""
  if [ -f "$stats" ] && [ ! -f "$src/target/logitspec_acceptance.json" ]; then
    if cmp -s "$src/target/model.safetensors" "$ASSETS/target/model.safetensors"; then
      kept=$(mktemp); cp "$stats" "$kept"
    else
      echo "NOTE: a new target: measure LogitSpec's acceptance again (scripts/measure_logitspec_acceptance.py," \
           "BENCHMARKS 'Session 22: the retrained model')" >&2
    fi
  fi
  for sub in target draft glide logs; do
    rm -rf "${ASSETS:?}/$sub"
    cp -r "$src/$sub" "$ASSETS/$sub"
  done
  if [ -n "$kept" ]; then cp "$kept" "$stats"; rm -f "$kept"; echo "kept $stats (same target weights)"; fi
  size_check "$ASSETS"
  echo "installed $src into $ASSETS (record the run in BENCHMARKS.md; rebuild prompt sets / tau tables as needed)"
}

for st in "${stages[@]}"; do
  case "$st" in
    prep)
      $PY scripts/default_corpus.py export runs/stdlib_py311
      # 31 MB of sources -> ~5 MB to carry (the device call's working tree is limited to 64 MiB)
      tar -C runs -cf - stdlib_py311 | xz -T0 -6 > runs/stdlib_py311.tar.xz ;;
    setup)
      step setup $PY -m pip install -q --no-build-isolation --no-deps -e . ;;
    corpus)
      step corpus $TD pack --tokenizer "$TOK" --out "$RUN/data" --sources "$SOURCES" --stdlib-root "$(stdlib_root)" \
        --stdlib-repeat "$STDLIB_REPEAT"
      $PY -c "import json; m = json.load(open('$RUN/data/manifest.json')); t = (m.get('packages') or {}).get('totals');
print('python', m['python'], 'stdlib from', m.get('stdlib_python', m['python']), 'packages', t); print(json.dumps(m['tokens']))" ;;
    target)
      if [ -z "$TARGET_SEQ1" ]; then  # one phase at $SEQ
        step target $TD lm --which target --data "$RUN/data" --tokenizer "$TOK" --out "$RUN/lm" ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} ${ARCH_FLAGS[@]+"${ARCH_FLAGS[@]}"} ${UL_FLAGS[@]+"${UL_FLAGS[@]}"} \
          --seq "$SEQ" --max-positions "$MAXPOS" --batch $((LM_TOKENS / SEQ)) --lr 2e-3 --warmup 100 \
          --target-minutes "$TARGET_MIN" --steps "$TARGET_STEPS" --eval-every 250 --eval-tokens "$EVAL_TOKENS"
      else  # phase 1 at $TARGET_SEQ1 for TARGET_FRAC1 of the time, phase 2 at $SEQ from its weights
        m1=$($PY -c "print(round($TARGET_MIN * $TARGET_FRAC1, 2))"); m2=$($PY -c "print(round($TARGET_MIN * (1 - $TARGET_FRAC1), 2))")
        step target_phase1 $TD lm --which target --data "$RUN/data" --tokenizer "$TOK" --out "$RUN/lm_phase1" ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} \
          ${ARCH_FLAGS[@]+"${ARCH_FLAGS[@]}"} ${UL_FLAGS[@]+"${UL_FLAGS[@]}"} --seq "$TARGET_SEQ1" --max-positions "$TARGET_SEQ1" --batch $((LM_TOKENS / TARGET_SEQ1)) \
          --lr 2e-3 --warmup 100 --target-minutes "$m1" --steps "$TARGET_STEPS1" --eval-every 250 --eval-tokens "$EVAL_TOKENS"
        cp "$RUN/lm_phase1/summary.json" "$RUN/lm_phase1/target_summary.json"
        step target $TD lm --which target --init "$RUN/lm_phase1/target" --data "$RUN/data" --tokenizer "$TOK" --out "$RUN/lm" \
          ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} ${ARCH_FLAGS[@]+"${ARCH_FLAGS[@]}"} ${UL_FLAGS[@]+"${UL_FLAGS[@]}"} --seq "$SEQ" --max-positions "$MAXPOS" \
          --batch $((LM_TOKENS / SEQ)) --lr "$TARGET_LR2" --warmup 20 --target-minutes "$m2" --steps "$TARGET_STEPS2" --eval-every 250 \
          --eval-tokens "$EVAL_TOKENS"
      fi
      cp "$RUN/lm/summary.json" "$RUN/lm/target_summary.json"; mirror ;;
    target-more)
      [ "$(asked "$TARGET_MORE_MIN" "$TARGET_MORE_STEPS")" = 1 ] ||
        { echo "target-more needs TARGET_MORE_MIN or TARGET_MORE_STEPS > 0" >&2; exit 2; }
      [ -d "$RUN/lm/target" ] || { echo "target-more continues $RUN/lm/target, which is missing" >&2; exit 2; }
      rm -rf "$RUN/lm_more"
      step target_more $TD lm --which target --init "$RUN/lm/target" --data "$RUN/data" --tokenizer "$TOK" --out "$RUN/lm_more" \
        ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} ${ARCH_FLAGS[@]+"${ARCH_FLAGS[@]}"} ${UL_FLAGS[@]+"${UL_FLAGS[@]}"} --seq "$SEQ" --max-positions "$MAXPOS" \
        --batch $((LM_TOKENS / SEQ)) --lr "$TARGET_LR2" --warmup 20 --target-minutes "$TARGET_MORE_MIN" --steps "$TARGET_MORE_STEPS" \
        --eval-every 250 --eval-tokens "$EVAL_TOKENS" --keep "${TARGET_KEEP:-best}"
      # the continued target replaces the run's target; its drafts were trained for the old one
      rm -rf "$RUN/lm/target"; mv "$RUN/lm_more/target" "$RUN/lm/target"
      cp "$RUN/lm_more/target_log.jsonl" "$RUN/lm/target_more_log.jsonl"
      cp "$RUN/lm_more/summary.json" "$RUN/lm/target_more_summary.json"
      rm -rf "$RUN/lm_more"
      echo "target-more: $RUN/lm/target continued; retrain its drafts (stages draft glide) before shipping" >&2
      mirror ;;
    draft)
      step draft $TD lm --which draft --teacher "$RUN/lm/target" --data "$RUN/data" --tokenizer "$TOK" --out "$RUN/lm" \
        ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} ${ARCH_FLAGS[@]+"${ARCH_FLAGS[@]}"} --seq "$SEQ" --max-positions "$MAXPOS" --batch $((LM_TOKENS / SEQ)) \
        --draft-lr "${DRAFT_LR:-3e-3}" --warmup 100 --kd-weight 0.5 --draft-minutes "$DRAFT_MIN" --draft-steps "$DRAFT_STEPS" \
        --eval-every 250 --eval-tokens "$EVAL_TOKENS" ${DRAFT_INIT_FLAGS[@]+"${DRAFT_INIT_FLAGS[@]}"}
      cp "$RUN/lm/summary.json" "$RUN/lm/draft_summary.json"; mirror ;;
    glide)
      step glide_short $TD glide --target "$RUN/lm/target" --data "$RUN/data" --out "$RUN/glide_short" ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} \
        --seq "$GLIDE_SEQ1" --batch $((GLIDE_TOKENS / GLIDE_SEQ1)) --lr 1e-3 --warmup 50 --distill 0.5 --minutes "$GLIDE_SHORT_MIN" --steps "$GLIDE_SHORT_STEPS" \
        --eval-every 500 --eval-tokens $((EVAL_TOKENS / 2))
      step glide_long $TD glide --target "$RUN/lm/target" --data "$RUN/data" --out "$RUN/glide_long" ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} \
        --init "$RUN/glide_short/glide" --seq "$SEQ" --batch $((GLIDE_TOKENS / SEQ)) --lr 6e-4 --warmup 50 --distill 1.0 \
        --minutes "$GLIDE_LONG_MIN" --steps "$GLIDE_LONG_STEPS" --eval-every 250 --eval-tokens $((EVAL_TOKENS / 2))
      drop_glide_more   # stale third phases must not ship with this run's first two
      if [ "$(glide_more)" = 1 ]; then GLIDE_MORE_FROM=long run_glide_more; fi ;;
    glide-more)
      [ "$(glide_more)" = 1 ] || { echo "glide-more needs GLIDE_MORE_MIN or GLIDE_MORE_STEPS > 0" >&2; exit 2; }
      [ -d "$RUN/glide_long/glide" ] || { echo "glide-more continues $RUN/glide_long/glide, which is missing" >&2; exit 2; }
      run_glide_more ;;
    eval)
      : > "$RUN/eval.jsonl"
      step eval_1024 $TD eval ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} --data "$RUN/data" --seq 1024 \
        --model "$ASSETS/target" "$ASSETS/draft" "$RUN/lm/target" "$RUN/lm/draft"
      step eval_long $TD eval ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} --data "$RUN/data" --seq "$SEQ" --model "$RUN/lm/target" "$RUN/lm/draft"
      grep -h '^{"model"' "$RUN/logs/eval_1024.log" "$RUN/logs/eval_long.log" >> "$RUN/eval.jsonl"
      cat "$RUN/eval.jsonl"; mirror ;;
    acceptance)
      step acceptance $PY scripts/measure_acceptance.py --target "$RUN/lm/target" --glide "$(last_glide)" \
        --bench stdlib_code --begin 10 --end 50 --max-new-tokens 96 --tree 32,32,32,32,32,32,32,32 ${DEV_FLAG[@]+"${DEV_FLAG[@]}"} ;;
    ship)
      ship="$RUN/ship"
      rm -rf "$ship"; mkdir -p "$ship/logs"
      cp -r "$RUN/lm/target" "$ship/target"
      cp -r "$RUN/lm/draft" "$ship/draft"
      cp -r "$(last_glide)" "$ship/glide"
      ship_log "$RUN/lm/target_log.jsonl" "$ship/logs/target_log.jsonl"
      ship_log "$RUN/lm/draft_log.jsonl" "$ship/logs/draft_log.jsonl"
      if [ -f "$RUN/lm/target_more_log.jsonl" ]; then ship_log "$RUN/lm/target_more_log.jsonl" "$ship/logs/target_more_log.jsonl"; fi
      if [ -f "$RUN/lm_phase1/target_log.jsonl" ]; then ship_log "$RUN/lm_phase1/target_log.jsonl" "$ship/logs/target_phase1_log.jsonl"; fi
      ship_log "$RUN/glide_short/glide_log.jsonl" "$ship/logs/glide_log.jsonl"
      ship_log "$RUN/glide_long/glide_log.jsonl" "$ship/logs/glide_long_log.jsonl"
      n=1
      while [ -d "$RUN/glide_more.$n" ]; do   # earlier third phases (GLIDE_MORE_FROM=last), oldest first
        if [ -f "$RUN/glide_more.$n/glide_log.jsonl" ]; then
          ship_log "$RUN/glide_more.$n/glide_log.jsonl" "$ship/logs/glide_more.${n}_log.jsonl"
        fi
        n=$((n + 1))
      done
      if [ -f "$RUN/glide_more/glide_log.jsonl" ]; then ship_log "$RUN/glide_more/glide_log.jsonl" "$ship/logs/glide_more_log.jsonl"; fi
      cp "$RUN/data/manifest.json" "$ship/logs/corpus_manifest.json"
      $PY - "$RUN" "$ship/logs/summary.json" <<'PY'
import json, os, sys
run, out = sys.argv[1:]
def load(p):
    return json.load(open(p)) if os.path.isfile(p) else None
s = [x for p in ("lm_phase1/target_summary.json", "lm/target_summary.json", "lm/target_more_summary.json", "lm/draft_summary.json")
     for x in (load(os.path.join(run, p)) or [])]
more = load(os.path.join(run, "glide_more/glide_summary.json"))
earlier = []   # earlier third phases glide_more.1, .2, ... (numbered without gaps), each continued by the next
while os.path.isdir(os.path.join(run, f"glide_more.{len(earlier) + 1}")):
    earlier.append(f"glide_more.{len(earlier) + 1}")
phases = [("glide_short/glide_summary.json", ""), ("glide_long/glide_summary.json", "" if more else ", shipped")]
phases += [(f"{d}/glide_summary.json", f", distilled further ({d})") for d in earlier]
for p, what in phases + ([("glide_more/glide_summary.json", ", distilled further, shipped")] if more else []):
    g = load(os.path.join(run, p))
    if g:
        s.append({**g, "model": f"glide ({g['seq']}-token windows{what})"})
ev = os.path.join(run, "eval.jsonl")
if os.path.isfile(ev):
    s.append({"model": "eval", "results": [json.loads(l) for l in open(ev) if l.strip()]})
json.dump(s, open(out, "w"), indent=1)
PY
      size_check "$ship"
      mirror
      if [ "$install" = 1 ]; then install_ship "$ship"; fi ;;
    ship-only)
      [ "$install" = 1 ] || { echo "ship-only needs --install (it installs SHIP_DIR)" >&2; exit 2; }
      install_ship "${SHIP_DIR:?SHIP_DIR=the staged ship directory}" ;;
  esac
done
