#!/usr/bin/env bash
# Issue 21 on the H200, one call (no carry: untrained models of real shapes), from the repository root:
#   bash scripts/gpu/speed-h200.sh [SECONDS]      -> $OUT/prof.log, $OUT/bench.jsonl, bench.md, bench.log
# 1. scripts/gpu/prof_prefill_gpu.py: prefill against transformers' SDPA (full, snapkv; the padded cuDNN chunks),
#    syncs per prefill, and the decoding step against the floor by kernel for the methods that evict while
#    decoding (their CUDA-graph replay is new: the line says graph True/False, a record's graph_error why not).
# 2. kvbench bench at 32k, batch 1 and 8: every method's step against the floor, beside transformers, for the
#    committed H200 table (results/bench/h200-llama-3.1-8b/ once made). kvpress needs its wheels carried (.whl).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
P=scripts/gpu/prof_prefill_gpu.py
{ python3 $P llama-3.1-8b 32768 --protocols query-agnostic --kernels flash,cudnn \
    --decode 32768 --methods full,snapkv,streamingllm,h2o,tova
  python3 $P qwen2.5-1.5b 4096,4100,16384,16390 --kernels cudnn; } 2>&1 | grep -v "^Loading" | tee "$OUT/prof.log"
timeout "${1:-300}" kvbench bench --preset llama-3.1-8b --contexts 32768 --batches 1,8 \
  --methods full,snapkv,pyramidkv,adakv,streamingllm,h2o,tova --budgets 0.25 --new-tokens 256 --peers hf \
  --no-largest-batch --out "$OUT" 2>&1 | grep -v "^Loading" | tee "$OUT/bench.log" | tail -40
