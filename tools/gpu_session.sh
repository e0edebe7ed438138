#!/usr/bin/env bash
# GPU work in few calls: the GPU tests and the benchmark tables. Logs go under $OUT (the device tool brings them
# back). Usage: bash tools/gpu_session.sh STEP... with STEP in: tests b1_512 b1_8192 b8_2048 hf capacity opt calib
# b1_512_attn b1_512_pdl b1_512_gemv b1_512_new chai_new chai_kernel decode_kernel decode_quick decode_sweep prof prof8
# ttft prof8_probs prof8_kernel gpu_probs probs_op b8_paths tests_tuned
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/chai-gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# each step has its own time limit (seconds, STEP_LIMIT), so one slow step cannot eat the others' device time;
# logs are written as they come (no buffering filter in the pipe), so a step cut short still leaves its lines
LIMIT=${STEP_LIMIT:-300}  # the GPU tests: TESTS_LIMIT (480; 79 tests took ~4.5 min on an H200)
B() { timeout -k 5 "$LIMIT" python tools/bench.py --shape llama-2-7b --chai dense llama-7b "$@"; }
for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
    tests) timeout -k 5 "${TESTS_LIMIT:-480}" python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 ;;
    b1_512) B --batch 1 --context 512 --mode eager compiled --ttft 2048 ;;
    b1_512_attn) B --chai dense --batch 1 --context 512 --mode compiled --dense-decode sdpa
                 B --chai dense --batch 1 --context 512 --mode compiled --dense-decode triton ;;
    b1_512_pdl) B --chai dense --batch 1 --context 512 --mode compiled --pdl off
                B --chai dense --batch 1 --context 512 --mode compiled --pdl on ;;
    b1_512_new) B --chai dense --batch 1 --context 512 --mode compiled --new-token torch
                B --chai dense --batch 1 --context 512 --mode compiled --new-token kernel ;;
    chai_new) B --batch 1 --context 8192 --mode compiled --new-token torch
              B --batch 1 --context 8192 --mode compiled --new-token kernel ;;
    b1_512_gemv) B --chai dense --batch 1 --context 512 --mode compiled --gemv off
                 B --chai dense --batch 1 --context 512 --mode compiled --gemv on ;;
    chai_kernel) B --batch 1 --context 8192 --mode compiled --clustered-decode torch
                 B --batch 1 --context 8192 --mode compiled --clustered-decode triton ;;
    b1_8192) B --batch 1 --context 8192 --mode compiled ;;
    b8_2048) B --batch 8 --context 2048 --mode compiled ;;
    chai_long) B --batch 1 8 --context 2048 8192 --mode compiled ;;
    hf) B --batch 1 --context 512 --mode compiled --hf --chai dense ;;
    capacity) B --batch 1 --context 2048 --mode eager --capacity-gb 60 --steps 4 ;;
    opt) python tools/bench.py --shape opt-6.7b --chai dense --batch 1 --context 512 --mode eager compiled ;;
    calib) python tools/bench.py --shape llama-2-7b --calibrate 1024 --calibrate-len 512 ;;
    prof) P="python tools/profile_decode.py --shape llama-2-7b"
          $P; $P --chai llama-7b; $P --context 8192; $P --chai llama-7b --context 8192 ;;
    decode_kernel) timeout -k 5 "$LIMIT" python tools/bench_decode_kernel.py ;;
    decode_quick) timeout -k 5 "$LIMIT" python tools/bench_decode_kernel.py --quick ;;
    decode_sweep) python tools/bench_decode_kernel.py --sweep --batch 1 8 --context 8192 ;;
    ttft) timeout -k 5 "$LIMIT" python tools/profile_prefill.py --shape llama-2-7b --chai llama-7b --tokens 2048 ;;
    prof8) P="python tools/profile_decode.py --shape llama-2-7b --batch 8 --context 2048"
           $P; $P --chai llama-7b ;;
    prof8_probs) P="timeout -k 5 $LIMIT python tools/profile_decode.py --shape llama-2-7b --batch 8 --context 2048"
                 $P; $P --chai llama-7b; $P --chai llama-7b --clustered-probs torch ;;
    probs_op) timeout -k 5 "$LIMIT" python tools/bench_decode_kernel.py --quick --batch 8 1 --context 2048 16384 \
                --clusters 4 --sweep-probs ;;
    prof8_kernel) P="timeout -k 5 $LIMIT python tools/profile_decode.py --shape llama-2-7b --batch 8 --context 2048"
                  $P --chai llama-7b --clustered-decode triton; $P --chai llama-7b; $P ;;
    b8_paths) for path in triton torch; do
                B --chai llama-7b --batch 8 --context 2048 --mode compiled --clustered-decode $path
                timeout -k 5 "$LIMIT" python tools/profile_decode.py --shape llama-2-7b --batch 8 --context 2048 \
                  --chai llama-7b --clustered-decode $path
              done ;;
    tests_tuned) timeout -k 5 "$LIMIT" python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
                   -W ignore::DeprecationWarning -k tuned 2>&1 ;;
    gpu_probs) timeout -k 5 "$LIMIT" python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
                 -W ignore::DeprecationWarning -k probs 2>&1 ;;
  esac 2>&1 | tee "$OUT/$step.log"
done
