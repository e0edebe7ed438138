#!/usr/bin/env bash
# The GPU check: the GPU tests and the benchmark grid behind docs/performance.md, on one CUDA machine.
#   bash tools/gpu_check.sh [STEP...]      STEP: tests bench opt ttft proj grid (default: the first four, in order)
#   tests  pytest -m gpu tests/test_gpu.py                         (TESTS_LIMIT, default 590 s: 139 tests, compiled
#          untuned but for the `tuned` ones; tuned everywhere they take ~20 s each, more than one device call, so
#          TESTS_SHARD=I/N runs the I-th of N parts;
#          the 2-GPU tests are in tests/test_parallel.py, run on a 2-GPU kind)
#   bench  LLaMA-2-7B shape: the README's speed table (triton: dense and CHAI llama-7b at B=1 T=512/8192 and
#          B=8 T=2048; torch: dense B=1 T=512), three runs of STEP_LIMIT each
#   opt    OPT-6.7B shape, dense, B=1 T=512                        (STEP_LIMIT, default 300 s)
#   ttft   time to first token, 2048 tokens, dense vs CHAI         (STEP_LIMIT)
#   proj   one layer's projections alone, kernel vs cuBLAS, LLaMA-2-7B and OPT-6.7B at 1, 8, 32 rows (STEP_LIMIT)
#   grid   the speed grid: dense and CHAI llama-7b at B = 1, 8, 32 and T = 512, 2048, 8192 but B=32 T=8192 (its dense
#          cache, 137 GB, does not fit one H200: cells over GRID_MAX_KV_GB, default 100, are left out, CHAI's too),
#          one process per cell, and gpt-fast beside them when PEERS names a folder holding
#          ../shared/peers/gptfast_decode.py and gpt-fast's model.py as gf_model.py (never committed here). Two phases,
#          each under GRID_LIMIT seconds (default 570): GRID_PHASE=compile compiles every step into the compile caches
#          and times nothing (ours through bench --warm-only, GRID_JOBS processes at a time, default 3, within GRID_GB
#          GiB, default 60; gpt-fast's cells in two streams beside them; 420-500 s for the 24 steps on an H200);
#          GRID_PHASE=time times every cell, ours and gpt-fast's, in turns (bench --load-jobs GRID_LOAD_JOBS, default
#          6: that many processes load their steps from the caches, or compile them if no compile phase ran, side by
#          side, then time one at a time with nothing else running; chai_models/gate.py); default both. GRID_SHAPE,
#          GRID_CHAI, GRID_BATCH, GRID_CONTEXT and GRID_PEER_STREAMS change the grid. On a device whose calls end
#          after 10 minutes: compile in one call and time in the next while the machine is still warm (the caches live
#          on its disk): 423 s for the whole grid.
#          GRID_PHASE=time alone compiles cold in the load groups: GRID_BATCH="8 32" took 415 s, the whole grid more.
# Each step runs under its own timeout, so a slow one cannot eat the others' time (on a device whose calls end
# after 10 minutes, run one step per call). Logs go to ${OUT:-/tmp/chai-gpu}/<step>.log line by line as they
# come (no buffering filter in the pipe), so a step cut short still leaves what it printed. Exit status: the
# number of steps that failed or timed out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/chai-gpu}; mkdir -p "$OUT"
LIMIT=${STEP_LIMIT:-300}
steps=("$@"); [ $# -gt 0 ] || steps=(tests bench opt ttft)
for step in "${steps[@]}"; do
  case $step in tests|bench|opt|ttft|proj|grid) ;;
    *) echo "unknown step '$step' (steps: tests bench opt ttft proj grid)"; exit 2 ;; esac
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$OUT/gpu.txt"
run() { local limit=$1; shift; timeout -k 10 "$limit" "$@"; }
failed=0
for step in "${steps[@]}"; do
  echo "=== $step $(date +%T)"
  case $step in
    tests) run "${TESTS_LIMIT:-590}" python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
             ${TESTS_SHARD:+--shard "$TESTS_SHARD"} ;;
    bench) B="python tools/bench.py --shape llama-2-7b --steps 64 --mode compiled"
           run "$LIMIT" $B --chai dense llama-7b --batch 1 --context 512 8192 --backend triton
           run "$LIMIT" $B --chai dense llama-7b --batch 8 --context 2048 --backend triton
           run "$LIMIT" $B --chai dense --batch 1 --context 512 --backend torch ;;
    opt) run "$LIMIT" python tools/bench.py --shape opt-6.7b --chai dense --batch 1 --context 512 --mode compiled ;;
    ttft) run "$LIMIT" python tools/profile_prefill.py --shape llama-2-7b --chai llama-7b --tokens 2048 ;;
    proj) for shape in llama-2-7b opt-6.7b; do
            run "$LIMIT" python tools/bench_projections.py --shape "$shape" --rows 1 8 32
          done ;;
    grid) G="python tools/bench.py --shape ${GRID_SHAPE:-llama-2-7b} --steps 64 --mode compiled \
             --chai dense ${GRID_CHAI:-llama-7b} --backend triton --batch ${GRID_BATCH:-1 8 32} \
             --context ${GRID_CONTEXT:-512 2048 8192} --max-kv-gb ${GRID_MAX_KV_GB:-100} --processes per-cell"
          # gpt-fast's cells, BxT, in streams separated by ';' that compile side by side: two, so that its two
          # big cells (46 GB each) never overlap
          IFS=';' read -ra peer_cells <<< "${GRID_PEER_STREAMS:-1x512 1x2048 1x8192 8x512;8x2048 32x512 8x8192 32x2048}"
          # as the timing phase runs it (through chai_models.gate, from here), so that its compile-cache entries match
          peer() { run "$LIMIT" python -m chai_models.gate "$PEERS/gptfast_decode.py" --batch "${1%x*}" \
                     --context "${1#*x}"; }
          phase=${GRID_PHASE:-both}
          if [ "$phase" != time ]; then
            if [ -n "${PEERS:-}" ]; then
              for stream in "${peer_cells[@]}"; do
                (for c in $stream; do peer "$c" > /dev/null 2>&1 || echo "=== grid: gpt-fast $c failed (rc $?)"; done) &
              done
            fi
            run "${GRID_LIMIT:-570}" $G --warm-only --warm-jobs "${GRID_JOBS:-3}" --warm-gb "${GRID_GB:-60}" \
              || echo "=== grid: our compile phase failed or ran out of time (rc $?)"
            wait
          fi
          if [ "$phase" != compile ]; then
            peer_arg=(); [ -z "${PEERS:-}" ] || peer_arg=(--peer "$PEERS/gptfast_decode.py --batch {B} --context {T}")
            run "${GRID_LIMIT:-570}" $G --load-jobs "${GRID_LOAD_JOBS:-6}" "${peer_arg[@]}" \
              || echo "=== grid: the timing phase failed or ran out of time (rc $?)"
            echo "=== grid: timed $(date +%T)"
          fi ;;
  esac 2>&1 | tee "$OUT/$step.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "=== $step failed (rc $rc)" | tee -a "$OUT/$step.log"; failed=$((failed + 1)); }
done
exit "$failed"
