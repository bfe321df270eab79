#!/usr/bin/env bash
# Issue 21 on the H200, one call (no carry: untrained models of real shapes), from the repository root:
#   bash scripts/gpu/speed-h200.sh [SECONDS]      -> $OUT/bench-compiled/, $OUT/prof.log, $OUT/kernels.log
# The compiled table of 2026-12-02 is results/bench/h200-llama-3.1-8b-compiled/ (commit c095eb5; its README has the
# script as it stood then). This call measures what came after it, most important first (a call ends at 600 s):
# 1. kvbench bench, decoding step compiled, 32k, batch 1 and 8: every prefill-only method (pyramidkv was missing)
#    and the decode-time evictors, whose one-token eviction per layer is one Triton pass now
#    (kernels/segment_evict.py; they were 1.4-2.1x snapkv's step); prefill warmed at 32k before measuring
#    (full's 2.41x was cuDNN's plan building); snapkv's prefill without its per-layer sync (it was 1.06-1.11x SDPA).
# 2. the eviction kernel against the PyTorch ops it replaced; the decoding step by kernel for the evictors.
# 3. batch 1's 1-row GEMMs (83% of the copy bandwidth): the step with inductor's autotuned matmuls
#    (KVBENCH_COMPILE_MODE=max-autotune-no-cudagraphs), full and snapkv, against the default mode.
# 4. prefill against SDPA at 32k and at the Qwen shape, with the syncs left.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "${1:-300}" kvbench bench --preset llama-3.1-8b --contexts 32768 --batches 1,8 --compile \
  --methods full,snapkv,pyramidkv,adakv,streamingllm,tova,h2o --budgets 0.25 --new-tokens 256 --peers hf \
  --no-largest-batch --out "$OUT/bench-compiled" 2>&1 | grep --line-buffered -v "^Loading" | tee "$OUT/bench.log" | tail -30
{ python3 -m kernels.segment_evict; python3 -m kernels.segment_evict --segments 64; } 2>&1 | tee "$OUT/kernels.log" | tail -16
P=scripts/gpu/prof_prefill_gpu.py
timeout 100 python3 $P llama-3.1-8b "" --decode 32768 --methods streamingllm,tova,h2o --compile 2>&1 \
  | grep --line-buffered -v "^Loading" | tee "$OUT/prof.log" | grep "steady step"
KVBENCH_COMPILE_MODE=max-autotune-no-cudagraphs timeout 150 python3 $P llama-3.1-8b "" --decode 32768 \
  --methods full,snapkv --compile 2>&1 | grep --line-buffered -v "^Loading" | sed 's/^/max-autotune: /' \
  | tee -a "$OUT/prof.log" | grep "steady step"
timeout 60 python3 $P llama-3.1-8b 32768 --methods full,snapkv --protocols query-agnostic 2>&1 \
  | grep --line-buffered -v "^Loading" | tee -a "$OUT/prof.log" | tail -8
timeout 40 python3 $P qwen2.5-1.5b 4096,16384 --methods full,snapkv,pyramidkv --protocols query-aware 2>&1 \
  | grep --line-buffered -v "^Loading" | tee -a "$OUT/prof.log" | tail -12
