#!/usr/bin/env bash
# How the committed GPU results were made, on the device machine (one H100 80GB; torch 2.11, transformers 5.17).
# Three calls from the repository root, back to back while the machine stays warm:
#   1. carry .carry/a         : bash scripts/gpu/run-gpu.sh assets   (then carry .carry/a2: ... assets .carry/a2)
#   2. carry .carry/b, .whl   : bash scripts/gpu/run-gpu.sh bench    -> $OUT/bench.jsonl, bench.md, bench.log
#   3. no carry               : bash scripts/gpu/run-gpu.sh sweeps   -> $OUT/runs.tar.gz, sweep.log
#   4. no carry               : bash scripts/gpu/run-gpu.sh largest  -> $OUT/bench.jsonl, bench.md, bench.log
#   5. carry .whl             : bash scripts/gpu/run-gpu.sh peak-b1  -> $OUT/bench.jsonl, bench.md, bench.log
# .carry/a, .carry/a2 and .carry/b: the SmolLM2 GGUF (from ../shared/tools/prepare-device-carry) in three parts, the gguf
# wheel); .whl holds transformers 5.2.0, kvpress 0.5.5 and the packages kvpress imports that the machine lacks;
# .carry/a also holds ruler/ (RULER's essay json), .carry/a2 pg/ (the essays of ../shared/data/paul_graham_essays):
# the GGUF is split so that each call stays under the 64 MiB a call may carry with the working tree.
set -uo pipefail
root=$(pwd)
assets=/tmp/kvbench-assets
gguf=$assets/SmolLM2-135M-Instruct.Q4_1.gguf
install_kvbench() { python3 -m pip install -q --no-deps --no-build-isolation -e "$root" 2>&1 | grep -v WARNING; }
case "${1:-}" in
assets)
  # one call per part: `assets` carries .carry/a, `assets .carry/a2` carries .carry/a2
  mkdir -p $assets && cp -r "${2:-.carry/a}"/* $assets/ && ls -la $assets ;;
bench)
  (cd $assets && cp "$root"/.carry/b/* . && cat smollm2.part0* > "$gguf" \
    && echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c \
    && python3 -m pip install -q --no-index --no-deps --target /tmp/kvbench-site gguf-*.whl) || echo "no SmolLM2 assets"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvpress-site .whl/*.whl
  install_kvbench
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  PYTHONUNBUFFERED=1 kvbench bench --preset llama-3.1-8b --contexts 32768 --batches 1,4,8 --methods full,snapkv \
    --budgets 0.25 --new-tokens 256 --peers hf,kvpress --kvpress-path /tmp/kvpress-site --chunked-prefill 131072 \
    --prefill-chunk 4096 --time-limit 470 --out /tmp/bench/h100-llama-3.1-8b 2>&1 | tee "$OUT/bench.log"
  cp /tmp/bench/h100-llama-3.1-8b/bench.jsonl /tmp/bench/h100-llama-3.1-8b/bench.md "$OUT/" ;;
sweeps)
  # The SmolLM2 runs behind the leaderboard, plots and report (an earlier version of this case also ran the
  # snapkv batch-33 point, bench/h100-llama-3.1-8b-snapkv-b33; see git history).
  export PYTHONPATH=/tmp/kvbench-site:${PYTHONPATH:-} KVBENCH_CACHE=/tmp/kvbcache PYTHONUNBUFFERED=1 CI=1
  install_kvbench
  for name in niah niah-aware trace; do
    sed -e "s#smollm2-135m#$gguf#" -e "s#../shared/data/paul_graham_essays#$assets/pg#" \
      results/sweep-smollm2-$name.yaml > /tmp/sweep-smollm2-$name.yaml
  done
  timeout 400 kvbench sweep /tmp/sweep-smollm2-niah.yaml 2>&1 | tee "$OUT/sweep.log" | grep -v "^Loading" | tail -40
  timeout 120 kvbench sweep /tmp/sweep-smollm2-niah-aware.yaml 2>&1 | tee -a "$OUT/sweep.log" | tail -12
  timeout 50 kvbench sweep /tmp/sweep-smollm2-trace.yaml 2>&1 | tee -a "$OUT/sweep.log" | tail -8
  tar czf "$OUT/runs.tar.gz" results/runs results/traces ;;
largest)
  # Largest batch of full and snapkv@0.25 at 32k on one engine (CUDA-graph decoding, expandable segments),
  # with batch 1 and 8 as the memory model's points; the peers' ratios are in bench/h100-llama-3.1-8b-cudagraphs.
  install_kvbench
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 590 kvbench bench --preset llama-3.1-8b --contexts 32768 --batches 1,8 --methods full,snapkv \
    --budgets 0.25 --new-tokens 256 --peers "" --time-limit 420 --out /tmp/bench/h100-llama-3.1-8b-largest 2>&1 \
    | tee "$OUT/bench.log" | tail -30
  cp /tmp/bench/h100-llama-3.1-8b-largest/bench.jsonl /tmp/bench/h100-llama-3.1-8b-largest/bench.md "$OUT/" ;;
peak-b1)
  # snapkv@0.25 against kvpress's SnapKV at batch 1 (peak memory); carry .whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvpress-site .whl/*.whl
  install_kvbench
  timeout 560 kvbench bench --preset llama-3.1-8b --contexts 32768 --batches 1 --methods snapkv --budgets 0.25 \
    --new-tokens 256 --peers kvpress --kvpress-path /tmp/kvpress-site --no-largest-batch \
    --out /tmp/bench/h100-llama-3.1-8b-peak-b1 2>&1 | tee "$OUT/bench.log" | tail -14
  cp /tmp/bench/h100-llama-3.1-8b-peak-b1/bench.jsonl /tmp/bench/h100-llama-3.1-8b-peak-b1/bench.md "$OUT/" ;;
*) echo "usage: bash scripts/gpu/run-gpu.sh assets|bench|sweeps|largest|peak-b1"; exit 2 ;;
esac
