#!/usr/bin/env bash
# DeltaKV on the GPU machine (issue 6). Run from the repository root, after the two SmolLM2 asset calls
# printed by ../shared/tools/prepare-device-carry; carry .deltakv (the training corpus and the NIAH essays).
#   scripts/gpu/deltakv-gpu.sh smollm2     # train the SmolLM2 compressor (DKV_MINUTES, DKV_STEPS), NIAH 2k/4k + fidelity vs full and snapkv
#                                      # (or the two halves in two calls: train, then evaluate)
#   scripts/gpu/deltakv-gpu.sh throughput  # kernel tile sweep, then 32k decode tokens/s, llama-3.1-8b random weights,
#                                      # deltakv (DKV_KEEP: kept tokens per step, default 2048 and 0.15) vs full
#   scripts/gpu/deltakv-gpu.sh all [SECONDS] # both, the second one cut to what is left of SECONDS (default 580)
# Writes under $OUT (logs, the checkpoint, the summaries); the runner's run directories stay in /tmp.
set -uo pipefail
export PYTHONUNBUFFERED=1 KVBENCH_CACHE=/tmp/kvbcache PYTHONPATH=/tmp/kvbench-site:${PYTHONPATH:-}
export OUT=${OUT:-results/deltakv}
mkdir -p "$OUT"
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | grep -v WARNING | tail -2
GGUF=/tmp/kvbench-assets/SmolLM2-135M-Instruct.Q4_1.gguf
# scripts/deltakv-corpus.py builds the general-English corpus (the first checkpoint used the man pages alone)
CORPUS=${DKV_CORPUS:-.deltakv/general-english.txt.gz}
smollm2() { train; evaluate; }
train() {
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  python3 -m kvbench.cli train deltakv --model "$GGUF" --data "$CORPUS" --out "$OUT/ckpt" --steps ${DKV_STEPS:-1000} --batch 8 --seq-len 1024 \
    --latent-dim 64 --intermediate 192 --full-layers 0,8,17 --max-minutes ${DKV_MINUTES:-2} 2>&1 | tee "$OUT/train.log"
  rm -rf /tmp/dkv-ckpt && cp -r "$OUT/ckpt" /tmp/dkv-ckpt  # for an evaluate call on the same machine
}
evaluate() {
  [ -d "$OUT/ckpt" ] || cp -r /tmp/dkv-ckpt "$OUT/ckpt"
  python3 scripts/deltakv_bench.py eval --model "$GGUF" --checkpoint "$OUT/ckpt" --haystack .deltakv/paul_graham_essays \
    --out /tmp/dkv-eval -m latent_dtype=int4 -m index_dtype=int16 2>&1 | grep -v "^Loading" | tee "$OUT/eval.log"
  cp /tmp/dkv-eval/deltakv-eval.json "$OUT/"
  # the paper's storage dtypes (bf16 latents, int32 indices), through the CLI
  python3 -m kvbench.cli run --method deltakv --checkpoint "$OUT/ckpt" --task niah -t 'lengths=[2048,4096]' --batch-size 5 \
    --model "$GGUF" --data .deltakv/paul_graham_essays --out /tmp/dkv-cli 2>&1 | grep -v "^Loading" | tee -a "$OUT/eval.log"
}
throughput() {
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  # DKV_SWEEP=1: first the reconstruction kernel's tile sweep at the throughput run's shapes (48 x 32k, the
  # official throughput script's 2048 kept tokens), and the decode runs use its fastest tile (DKV_TILE: a
  # given tile; neither: the kernel's DEFAULT_TILE)
  if [ -n "${DKV_SWEEP:-}" ]; then
    python3 -m kvbench.kernels.reconstruct_bench --batch 48 --context 32768 --keep 0.0625 --out "$OUT" 2>&1 | tee "$OUT/reconstruct-tiles.log"
    DKV_TILE=${DKV_TILE:-$(python3 -c "import json; print(json.dumps(json.load(open('$OUT/reconstruct-tiles.json'))['best']))")}
  fi
  [ -n "${DKV_TILE:-}" ] && export KVBENCH_RECONSTRUCT_TILE=$DKV_TILE && echo "tile: $DKV_TILE"
  python3 scripts/deltakv_bench.py throughput --preset llama-3.1-8b --context 32768 --out "$OUT" --keep ${DKV_KEEP:-2048 0.15} \
    -m latent_dim=256 -m intermediate=3072 -m latent_dtype=int4 -m index_dtype=int16 --profile 3 2>&1 | tee "$OUT/throughput.log"
}
case "${1:-smollm2}" in
smollm2) smollm2 ;;
train) train ;;        # the checkpoint stays in /tmp/dkv-ckpt for:
evaluate) evaluate ;;  # NIAH + fidelity of that checkpoint, on the same (still warm) machine
throughput) throughput ;;
all)
  smollm2
  left=$(( ${2:-580} - SECONDS ))
  echo "throughput gets ${left}s"
  if [ "$left" -gt 60 ]; then export -f throughput; timeout "$left" bash -c throughput; fi
  ;;
esac
