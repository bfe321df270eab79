#!/usr/bin/env bash
# Issue 21: the decoding step's weight GEMMs through kvbench's kernel (kernels/skinny_gemm.py) against cuBLAS, on
# the H200, random weights (nothing to carry; it can be the session's first call, before any parts):
#   bash scripts/gpu/skinny-h200.sh kernel   -> $OUT/skinny-kernel.log, $OUT/prof-b{1,8}.log (~6 min)
#     the kernel's launch shapes against F.linear on Llama-3.1-8B's projections at 1 and 8 rows (GB/s, share of
#     the copy bandwidth), then the compiled steady decoding step of full and snapkv at 32k, batch 1 and 8, with
#     cuBLAS and with the kernel (prof_prefill_gpu.py: the step against its floor, and one eager step by kernel);
#   bash scripts/gpu/skinny-h200.sh bench    -> $OUT/bench-skinny/ (the committed table's figures, ~8 min)
#   bash scripts/gpu/skinny-h200.sh freeze   -> $OUT/freeze-b{1,8}.log: the compiled steady step of full and snapkv at
#     32k, batch 1 and 8, unfrozen then with the weights frozen (q/k/v and gate/up one GEMM each; every layer
#     compiles on its own: minutes of compiling); what the skinny GEMM could not win (kernels/NOTES.md)
#   bash scripts/gpu/skinny-h200.sh pdl      -> $OUT/pdl-*.log (~8 min): programmatic dependent launch (KVBENCH_PDL=1:
#     each kernel of the step may start while the one before finishes; kernels/NOTES.md): the kernel and engine
#     tests on the GPU with it, the skinny GEMM's shapes with it (consecutive launches overlap in the timing
#     graph), then the compiled steady step of full and snapkv at 32k without and with it: batch 1 with the
#     skinny GEMM (its first weight tile is loaded before the wait) and with cuBLAS, batch 8 with cuBLAS
#   bash scripts/gpu/skinny-h200.sh chunk    -> the three launch shapes only (~100 s; the chunk rule's check)
#   bash scripts/gpu/skinny-h200.sh kvcar    -> KV-CAR's read kernel with and without the rotation (~30 s)
#   bash scripts/gpu/skinny-h200.sh attention -> $OUT/kernels-h200/ (the decode attention's launch shapes swept on
#     the H200, whose defaults come from the H100: snapkv's 8k held per sequence ran at 3.3 TB/s at batch 8 where
#     full's 32k ran at 4.46 (eager profile of one step, 2026-12-04); then the kernel table with the best)
# Before (c095eb5, results/bench/h200-llama-3.1-8b-compiled): full's steady step 6.30 ms at batch 1 against a
# 4.78 ms floor (1.32x), of which cuBLAS's GEMMs 4.41 ms where reading the weights takes 3.68 ms.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
P=scripts/gpu/prof_prefill_gpu.py
case "${1:-kernel}" in
kernel)
  timeout 150 python3 -m kvbench.kernels.skinny_gemm 2>&1 | tee "$OUT/skinny-kernel.log"
  for b in 1 8; do  # cuBLAS, then the kernel swapped in, in one process (one model load)
    timeout 200 python3 $P llama-3.1-8b "" --decode 32768 --batch $b --methods full,snapkv --compile \
      --skinny-gemm both 2>&1 | grep --line-buffered -v "^Loading" | tee "$OUT/prof-b$b.log" | grep "steady step\|skinny"
  done ;;
bench)
  timeout 560 kvbench bench --preset llama-3.1-8b --contexts 32768 --batches 1,8 --compile --skinny-gemm \
    --methods full,snapkv,pyramidkv,adakv --budgets 0.25 --new-tokens 256 --peers "" --no-largest-batch \
    --time-limit 500 --out "$OUT/bench-skinny" 2>&1 | grep --line-buffered -v "^Loading" | tail -30 ;;
freeze)
  for b in 1 8; do
    timeout 285 python3 $P llama-3.1-8b "" --decode 32768 --batch $b --methods full,snapkv --compile --freeze both \
      2>&1 | grep --line-buffered -v "^Loading" | tee "$OUT/freeze-b$b.log" | grep "steady step\|frozen\|nvjet\|gemm\|Error"
  done ;;
pdl)
  if python3 -c "import pytest" 2>/dev/null; then
    KVBENCH_PDL=1 timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_kernels.py \
      tests/kernels/test_store_append.py tests/kernels/test_skinny_gemm.py tests/kvbench/test_compiled_decode.py \
      -k "not compiles_for" 2>&1 | tail -4 | tee "$OUT/pdl-tests.log"
  else echo "pytest missing: the GPU tests were not run" | tee "$OUT/pdl-tests.log"; fi
  KVBENCH_PDL=1 timeout 120 python3 -m kvbench.kernels.skinny_gemm 2>&1 | tee "$OUT/pdl-skinny-kernel.log" | tail -3
  for run in "1 on" "1 off" "8 off"; do
    set -- $run
    timeout 220 python3 $P llama-3.1-8b "" --decode 32768 --batch $1 --methods full,snapkv --compile --skinny-gemm $2 \
      --pdl both 2>&1 | grep --line-buffered -v "^Loading" | tee "$OUT/pdl-b$1-skinny-$2.log" | grep "steady step\|dependent\|Error"
  done ;;
attention)
  timeout 560 python3 -m kvbench.kernels.bench --sweep --skip-windows --out "$OUT/kernels-h200" 2>&1 | tail -45 ;;
chunk)  # the chunk's rule against the last table (results/bench/h200-kernels/evened-a571824/), in about 100 s:
  # the default launch shape, the H200's best (3 stages) and 4 items per SM, on the sweep's 11 shapes
  C='[{"BLOCK_N":64,"num_warps":4,"num_stages":4,"items_per_sm":2,"max_chunk":4096},
      {"BLOCK_N":64,"num_warps":4,"num_stages":3,"items_per_sm":2,"max_chunk":4096},
      {"BLOCK_N":64,"num_warps":4,"num_stages":2,"items_per_sm":4,"max_chunk":4096}]'
  timeout 240 python3 -m kvbench.kernels.bench --sweep --skip-windows --configs "$C" --out "$OUT/kernels-h200" \
    > "$OUT/kernels-h200.log" 2>&1; grep "sweep" "$OUT/kernels-h200.log" ;;
kvcar)  # where KV-CAR's read kernel spends its time: with and without the keys' rotation, its matmuls' rate (~30 s)
  timeout 200 python3 -m kvbench.kernels.kvcar_decode --diagnose 2>&1 | grep -v "^Loading" | tee "$OUT/kvcar-diagnose.log" ;;
*) echo "usage: $0 kernel|bench|freeze|pdl|attention|chunk|kvcar" >&2; exit 2 ;;
esac
