#!/usr/bin/env bash
# Issue 21 on the H200, one call (no carry: untrained models of real shapes), from the repository root:
#   bash scripts/gpu/speed-h200.sh [SECONDS]      -> $OUT/bench-evictors/, $OUT/prof-b{1,8}.log, $OUT/kernels.log
# The tables so far: results/bench/h200-llama-3.1-8b-compiled/ (c095eb5) and ...-compiled-2/ (c96d17f, 103643f,
# 467afb7, 4ea51a8; its README has the calls). This call measures what came after 4ea51a8, most important first
# (a call ends at 600 s):
# 1. h2o's and tova's slot probabilities from the logits the decode attention writes in its own pass (no second
#    read of the keys: 65 us a layer at batch 8 at 4ea51a8, 2.05 ms of tova's 10.7 ms step): the microbenchmark
#    (attention with and without writing the logits; probabilities from them) at batch 1 and 8;
# 2. the evictors' steady step against snapkv's at batch 1 and 8 (target 1.3x; 4ea51a8: tova 1.17x / 1.40x,
#    h2o 1.24x / 1.49x, streamingllm 1.09x / 1.09x);
# 3. kvbench bench for the evictors (the committed table's figures), cut to what is left of SECONDS.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
{ timeout 60 python3 -m kvbench.kernels.slot_scores; timeout 60 python3 -m kvbench.kernels.slot_scores --segments 64;
  timeout 60 python3 -m kvbench.kernels.segment_evict; timeout 60 python3 -m kvbench.kernels.segment_evict --segments 64; } 2>&1 \
  | tee "$OUT/kernels.log" | grep -v "^ *kernel BLOCK_S=\(32\|256\)\|split kernel BLOCK=\(256\|2048\)"
P=scripts/gpu/prof_prefill_gpu.py
timeout 100 python3 $P llama-3.1-8b "" --decode 32768 --methods snapkv,streamingllm,tova,h2o --compile 2>&1 \
  | grep --line-buffered -v "^Loading" | tee "$OUT/prof-b1.log" | grep "steady step"
timeout 140 python3 $P llama-3.1-8b "" --decode 32768 --batch 8 --methods snapkv,streamingllm,tova,h2o --compile 2>&1 \
  | grep --line-buffered -v "^Loading" | tee "$OUT/prof-b8.log" | grep "steady step"
left=$(( ${1:-560} - SECONDS ))
echo "bench gets ${left}s"
[ "$left" -gt 60 ] && timeout "$left" kvbench bench --preset llama-3.1-8b --contexts 32768 --batches 1,8 --compile \
  --methods snapkv,streamingllm,tova,h2o --budgets 0.25 --new-tokens 256 --peers "" --no-largest-batch \
  --out "$OUT/bench-evictors" 2>&1 | grep --line-buffered -v "^Loading" | tee "$OUT/bench.log" | tail -30
