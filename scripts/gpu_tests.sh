#!/usr/bin/env bash
# `pytest -m gpu` in three parts that each fit a 10-minute device call (the whole suite takes over 8 minutes
# on one H100/H200, plus the start of the machine). Every GPU test file is in exactly one part; a file added
# to tests/ without being listed here makes the script refuse (so no GPU test is silently left out).
#
#   scripts/gpu_tests.sh a      # the kernels, the reference, the app, the shared layer (260 s on an H100, session 28)
#   scripts/gpu_tests.sh b      # bf16 / fp16 / fp32 exactness of every fast decoder against fast vanilla (143 s on an
#                               # H100 with Triton's cache warm; a freshly started machine compiles first: give it 400 s)
#   scripts/gpu_tests.sh c      # the decode phase, batches, sampling, prefill and the other fast decoder tests
#   scripts/gpu_tests.sh list   # which files each part runs
#
# Extra arguments go to pytest (e.g. -x, --durations=10).
set -euo pipefail
cd "$(dirname "$0")/.."
A="tests/fast/test_accept_kernel.py tests/fast/test_attention_merge.py tests/fast/test_beam_kernel.py
   tests/fast/test_fused_kernels.py tests/fast/test_gemv.py tests/fast/test_kernels.py tests/fast/test_keyed_kernel.py tests/fast/test_log_softmax.py
   tests/fast/test_rowgemm.py tests/fast/test_glide_catch_up.py tests/fast/test_round_pack.py tests/ref tests/app tests/shared"
B="tests/fast/test_exact_dtypes.py tests/fast/test_fast_decoders.py"
C="tests/fast/test_decode_attention.py tests/fast/test_decode_phase.py tests/fast/test_fast_batch_inputs.py
   tests/fast/test_fast_draft_vocab.py tests/fast/test_fast_draft_window.py tests/fast/test_fast_keyed_sampling.py
   tests/fast/test_fused_chain_rounds.py tests/fast/test_prefill_attention.py tests/fast/test_tensor_parallel.py"
# every tests/fast file that mentions the gpu marker must be in a part (tests/ref, app and shared are in A whole);
# GPU_TESTS_SCAN names another folder to scan (the script's own test), its files named as tests/fast/<name>
scan=${GPU_TESTS_SCAN:-tests/fast}
for g in $(grep -l "mark.gpu\|\"gpu\"" "$scan"/*.py); do
  f=tests/fast/$(basename "$g")
  case " $(echo $A $B $C) " in *" $f "*) ;; *) echo "gpu_tests.sh: $f is in no part -- add it to A, B or C"; exit 2;; esac
done
part=${1:-}
shift || true
case "$part" in
  a) files=$A ;;
  b) files=$B ;;
  c) files=$C ;;
  list) printf 'a: %s\nb: %s\nc: %s\n' "$(echo $A)" "$(echo $B)" "$(echo $C)"; exit 0 ;;
  *) echo "usage: scripts/gpu_tests.sh a|b|c|list [pytest args...]"; exit 2 ;;
esac
exec python3 -m pytest -q -m gpu -p no:cacheprovider "$@" $files
