#!/usr/bin/env bash
# A/B of scripts/bench_fast.py between an older source tree and this one, in one device session.
#
#   git archive <old commit> | tar -x -C out/old          # on the machine with the repository
#   AB_ORDER="old new" scripts/ab_bench_fast.sh out/old --glide --contexts 1024 --long 0 --shapes llama3-8b
#
# The old tree is installed into its own target directory and put first on PYTHONPATH (the editable
# install of this tree stays behind it); each side writes $OUT/ab_<side>.jsonl and .log.
set -u
OLD=${1:?usage: scripts/ab_bench_fast.sh OLD_SOURCE_DIR [bench_fast.py args...]}
shift
OUT=${OUT:-/tmp}
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1
python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/ab_oldpkg "$OLD" >/dev/null 2>&1 || { echo "installing $OLD failed"; exit 2; }
for side in ${AB_ORDER:-old new}; do
  if [ "$side" = old ]; then
    # the check runs outside the source tree: python3 -c puts the working directory first on sys.path, where the
    # tree's own specdec/ (the app package alone) would shadow the installed one
    (cd /tmp && PYTHONPATH=/tmp/ab_oldpkg python3 -c "import specdec.fast.kernels as k; print('old: specdec.fast from', k.__file__)") \
      && (cd "$OLD" && PYTHONPATH=/tmp/ab_oldpkg python3 scripts/bench_fast.py "$@" --out "$OUT/ab_old.jsonl" > "$OUT/ab_old.log" 2>&1)
  else
    (cd /tmp && python3 -c "import specdec.fast.kernels as k; print('new: specdec.fast from', k.__file__)")
    python3 scripts/bench_fast.py "$@" --out "$OUT/ab_new.jsonl" > "$OUT/ab_new.log" 2>&1
  fi
  echo "== $side"; tail -4 "$OUT/ab_$side.log"
done
