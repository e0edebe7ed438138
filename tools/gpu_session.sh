#!/usr/bin/env bash
# One GPU session in one call: the GPU tests, then the benchmark tables. Logs go under $OUT (the device tool
# brings them back). Usage: bash tools/gpu_session.sh [tests|decode|extra|all]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/chai-gpu}; mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu_tests.log"
fi
if [[ $what == decode || $what == all ]]; then
  python tools/bench.py --shape llama-2-7b --chai dense llama-7b --batch 1 --context 512 --mode eager compiled \
    --ttft 2048 2>&1 | tee "$OUT/bench_b1_512.log"
  python tools/bench.py --shape llama-2-7b --chai dense llama-7b --batch 1 --context 8192 --mode compiled \
    2>&1 | tee "$OUT/bench_b1_8192.log"
  python tools/bench.py --shape llama-2-7b --chai dense llama-7b --batch 8 --context 2048 --mode compiled \
    2>&1 | tee "$OUT/bench_b8_2048.log"
fi
if [[ $what == extra || $what == all ]]; then
  python tools/bench.py --shape llama-2-7b --chai dense llama-7b --batch 1 --context 512 --mode compiled --hf \
    2>&1 | tee "$OUT/bench_hf.log"
  python tools/bench.py --shape llama-2-7b --chai dense llama-7b --batch 1 --context 2048 --mode eager \
    --capacity-gb 60 --steps 4 2>&1 | tee "$OUT/bench_capacity.log"
fi
