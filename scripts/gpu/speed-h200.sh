#!/usr/bin/env bash
# Issue 21 on the H200, one call (no carry: untrained models of real shapes), from the repository root:
#   bash scripts/gpu/speed-h200.sh [SECONDS]      -> $OUT/bench-compiled/, $OUT/prof.log, $OUT/slot.log
# The eager table of 2026-12-01 is results/bench/h200-llama-3.1-8b/ (commit 382b9f6); this call measures what came
# after it, most important first (a call ends at 600 s):
# 1. kvbench bench with the decoding step compiled (--compile): full, snapkv and the decode-time evictors at 32k,
#    batch 1 and 8, beside transformers; h2o and tova now replay as CUDA graphs and score slots in one Triton pass.
# 2. the slot-score kernel against the einsum it replaced (kernels/slot_scores.py), and its block/warp settings.
# 3. the decoding step by kernel, compiled, for full and snapkv; prefill against SDPA at 32k (snapkv was 1.21x, full
#    1.08x: the compression's per-layer read-backs are gone since, the syncs line says how many are left) and at
#    the Qwen shape the sweeps run (4k and 16k, query-aware: snapkv was 4.6x / 2.2x SDPA there).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "${1:-330}" kvbench bench --preset llama-3.1-8b --contexts 32768 --batches 1,8 --compile \
  --methods full,snapkv,tova,h2o,streamingllm,adakv --budgets 0.25 --new-tokens 256 --peers hf \
  --no-largest-batch --out "$OUT/bench-compiled" 2>&1 | grep --line-buffered -v "^Loading" | tee "$OUT/bench.log" | tail -30
python3 -m kernels.slot_scores 2>&1 | tee "$OUT/slot.log" | tail -20
P=scripts/gpu/prof_prefill_gpu.py
timeout 150 python3 $P llama-3.1-8b "" --decode 32768 --methods full,snapkv --compile 2>&1 | grep --line-buffered -v "^Loading" | tee "$OUT/prof.log"
timeout 60 python3 $P llama-3.1-8b 32768 --methods full,snapkv --protocols query-agnostic 2>&1 \
  | grep --line-buffered -v "^Loading" | tee -a "$OUT/prof.log" | tail -12
timeout 60 python3 $P qwen2.5-1.5b 4096,16384 --methods full,snapkv,pyramidkv --protocols query-aware 2>&1 \
  | grep --line-buffered -v "^Loading" | tee -a "$OUT/prof.log" | tail -12
# 4. why a query-agnostic prefill of the Qwen shape costs ~100 ms more than the query-aware one of the same tokens
#    (174 vs 53 ms at 4k, 2026-12-01): the ops of one agnostic full prefill, by CPU and by CUDA time.
timeout 60 python3 $P qwen2.5-1.5b 4096 --methods full --protocols query-agnostic,query-aware --profile 4096 2>&1 \
  | grep --line-buffered -v "^Loading" | tee -a "$OUT/prof.log" | tail -45
