#!/usr/bin/env bash
# KV-CAR on the GPU machine (issue 19). Run from the repository root after the model's parts are carried
# (SmolLM2: three calls `bash scripts/gpu/qwen.sh part .carry/smollm2/pNN /tmp/kvbench-assets`, see
# scripts/gpu/gpu-setup.sh, which assembles it and installs kvbench; Qwen: scripts/gpu/qwen.sh setup).
# Carry .carry/whl with the gguf and wonderwords wheels (RULER's word lists) and the training corpus (scripts/deltakv-corpus.py OUT.txt.gz; KVCAR_CORPUS, default
# .deltakv/general-english.txt.gz) and, for NIAH, the essays (KVCAR_HAYSTACK, default .deltakv/paul_graham_essays).
#   scripts/gpu/kvcar-gpu.sh train smollm2 "32"        # one artifact per latent size (per head; smollm2 head_dim 64:
#                                                  # 48/32/16 = 25/50/75% smaller; qwen head_dim 128: 96/64/32;
#                                                  # K:V gives keys and values their own widths, e.g. 16:48),
#                                                  # KVCAR_MINUTES of training each (default 1.5), in /tmp/kvcar-art
#   scripts/gpu/kvcar-gpu.sh eval smollm2 "32"         # the leaderboard's fidelity (KL, perplexity on the essays: general
#                                                  # English never trained on; the docstrings once) and NIAH (Kamradt's
#                                                  # prompt, query-aware), measured KV bytes: kvcar (artifact's reuse,
#                                                  # forced), full, snapkv@0.25 vs snapkv+kvcar at the same memory
#   scripts/gpu/kvcar-gpu.sh ruler smollm2 "32"        # RULER 4k (qwen: 4k and 16k), kvcar / snapkv / snapkv+kvcar
#   scripts/gpu/kvcar-gpu.sh bench smollm2             # decode tokens/s, kvcar vs full, batch 1 and 16 and each one's largest
#   scripts/gpu/kvcar-gpu.sh speed                     # the read kernel (kernels/kvcar_decode.py) against the PyTorch path,
#                                                  # then tokens/s against full at the Llama-3.1-8B shape, 32k, batch 1 / 8
#                                                  # and each one's largest (random weights: nothing to carry; ~9 min)
#   scripts/gpu/kvcar-gpu.sh largest                   # kvcar's largest batch at the Llama-3.1-8B shape, 32k (one call;
#                                                  # after an out-of-memory error the bench tries what its reserved
#                                                  # peaks predict: 40 where 55 failed on 2026-12-03)
#   scripts/gpu/kvcar-gpu.sh quick                     # the smallest useful set: train smollm2 latents 16:48, eval it (~5 min)
#   the issue's SmolLM2 grid (25 / 50 / 75% smaller: latents 48 / 32 / 16 of 64), in three calls of at most 600 s,
#   each one beside sweep lanes if wanted: train smollm2 "48 32 16", then eval smollm2 "48 32 16", then
#   ruler smollm2 "48 32 16" and bench smollm2; with OUT=/tmp/kvcar-out and a tar of it into the call's $OUT (a
#   call returns at most 8 files)
#   scripts/gpu/kvcar-gpu.sh quick-qwen                # the same on Qwen2.5-Coder-1.5B (latents 32:96, 50%), after
#                                                  # `scripts/gpu/qwen.sh setup` (its GGUF, wheels and .carry/data, which
#                                                  # holds the corpus): it can run beside the sweeps' lanes
# Every command is bounded (timeout); the summaries land in $OUT (default results/kvcar), run dirs in /tmp.
set -uo pipefail
if [ "${2:-}" = qwen ] || [ "${1:-quick}" = quick-qwen ] || [ "${1:-}" = speed ] || [ "${1:-}" = largest ]; then  # qwen.sh's environment
  export KVBENCH_CACHE=/tmp/kvbench-cache PYTHONPATH=/tmp/kvbench-site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 CI=1 HF_HUB_OFFLINE=1
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v WARNING
else
  source scripts/gpu/gpu-setup.sh
fi
export OUT=${OUT:-results/kvcar}
mkdir -p "$OUT"
first() { for p in "$@"; do [ -e "$p" ] && { echo "$p"; return; }; done; echo "$1"; }  # the first that is here
CORPUS=${KVCAR_CORPUS:-$(first .carry/data/corpus/general-english.txt.gz /tmp/kvbench-data/corpus/general-english.txt.gz .deltakv/general-english.txt.gz)}
HAY=${KVCAR_HAYSTACK:-$(first .carry/data/paul_graham_essays /tmp/kvbench-data/paul_graham_essays .deltakv/paul_graham_essays)}
RULER_DATA=${KVCAR_RULER:-$(first .carry/data/ruler /tmp/kvbench-data/ruler .carry/tasks/ruler)}  # qwen.sh setup copies .carry/data there
ART=${KVCAR_ART:-/tmp/kvcar-art}
RUNS=${KVCAR_RUNS:-/tmp/kvcar-runs}

model_path() {
  case "$1" in
  smollm2) echo "$gguf" ;;
  qwen) echo qwen2.5-coder-1.5b ;;  # the alias: qwen.sh setup put its GGUF in KVBENCH_CACHE
  *) echo "unknown model $1 (smollm2 or qwen)" >&2; exit 2 ;;
  esac
}

train() {  # train MODEL "LATENTS"
  local m=$1 M; M=$(model_path "$1")
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  for L in $2; do
    timeout ${KVCAR_TRAIN_TIMEOUT:-420} python3 -m kvbench.cli train kvcar --model "$M" --data "$CORPUS" \
      --out "$ART/$m-l${L/:/v}" --latent-dim "${L%%:*}" --latent-dim-v "${L##*:}" --batch ${KVCAR_BATCH:-16} --seq-len ${KVCAR_SEQ:-1024} \
      --recon-steps 100000 --lm-steps 100000 --max-minutes ${KVCAR_MINUTES:-1.5} --dtype bfloat16 2>&1 \
      | grep -v "^Loading" | tee "$OUT/train-$m-l${L/:/v}.log"
    cp "$ART/$m-l${L/:/v}/artifact.json" "$OUT/artifact-$m-l${L/:/v}.json"
  done
}

run() {  # run LOGNAME ARGS...: one bounded kvbench run; a failure with CUDA graphs is logged and retried eagerly
  local name=$1 log rc; shift; log=$(mktemp)
  timeout ${KVCAR_RUN_TIMEOUT:-300} python3 -m kvbench.cli run --out "$RUNS" "$@" > "$log" 2>&1; rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ "${KVBENCH_CUDA_GRAPHS:-1}" != 0 ]; then
    { echo "FAILED (rc $rc) with CUDA graphs: $*"; grep -v "^Loading" "$log" | tail -8; echo "retrying eagerly"; } | tee -a "$OUT/$name.log"
    KVBENCH_CUDA_GRAPHS=0 timeout ${KVCAR_RUN_TIMEOUT:-300} python3 -m kvbench.cli run --out "$RUNS" "$@" > "$log" 2>&1
  fi
  grep -v "^Loading" "$log" | tail -3 | tee -a "$OUT/$name.log"; rm -f "$log"
}

evaluate() {  # evaluate MODEL "LATENTS"
  # The leaderboard's settings (results/sweep-qwen-fidelity.yaml, sweep-qwen-niah-original.yaml), so its runs compare:
  # fidelity on the essays (general English outside the training corpus: the issue's held-out text), NIAH with
  # Kamradt's prompt, query-aware; the docstrings (code-like prose) once, for the codec's distribution shift.
  # snapkv+kvcar runs at the budget that holds snapkv@0.25's memory: 0.25 / (latent share of the K/V).
  local m=$1 M ctx=2048 lens='[2048,4096]' hd=64; M=$(model_path "$1")
  [ "$m" = qwen ] && ctx=8192 lens='[4096,16384]' hd=128
  local FID=(--task fidelity --data "$HAY" -t context_len=$ctx -t continuation_len=256 -t n_samples=8 --batch-size 8 --model "$M")
  local NIAH=(--task niah --data "$HAY" -t style=original -t "lengths=$lens" -t max_new_tokens=32 --query-aware
              -t 'depths=[0.0,0.11,0.22,0.33,0.44,0.56,0.67,0.78,0.89,1.0]' --batch-size 10 --model "$M")
  run "eval-$m" --method full "${NIAH[@]}"
  run "eval-$m" --method snapkv --budget 0.25 "${NIAH[@]}"
  run "eval-$m" --method snapkv --budget 0.25 "${FID[@]}"
  run "eval-$m" --method snapkv --budget 0.25 "${FID[@]}" -t stepwise=true
  for L in $2; do
    local A="$ART/$m-l${L/:/v}" K=${L%%:*} V=${L##*:} B
    B=$(python3 -c "print(round(0.25 * 2 * $hd / ($K + $V), 4))")
    run "eval-$m" --method kvcar --artifact "$A" "${FID[@]}"
    run "eval-$m" --method kvcar --artifact "$A" "${FID[@]}" -t stepwise=true  # generation: generated tokens coded
    run "eval-$m" --method kvcar --artifact "$A" --task fidelity --model "$M"  # the docstrings
    python3 -c "import json, sys; sys.exit(0 if json.load(open('$A/artifact.json'))['reuse_pairs'] else 1)" \
      && run "eval-$m" --method kvcar --artifact "$A" -m reuse=false "${FID[@]}"  # differs only when heads are reused
    run "eval-$m" --method kvcar --artifact "$A" -m reuse_threshold=0.0 "${FID[@]}"
    run "eval-$m" --method kvcar --artifact "$A" "${NIAH[@]}"
    if python3 -c "import sys; sys.exit(0 if $B < 1 else 1)"; then
      run "eval-$m" --method snapkv+kvcar --budget "$B" --artifact "$A" -m reuse=false "${NIAH[@]}"
      run "eval-$m" --method snapkv+kvcar --budget "$B" --artifact "$A" -m reuse=false "${FID[@]}"
    fi
  done
  summary | tee "$OUT/summary.md"
}

ruler() {  # ruler MODEL "LATENTS"
  local m=$1 M lengths='[4096]'; M=$(model_path "$1")
  [ "$m" = qwen ] && lengths='[4096,16384]'
  # the leaderboard's RULER tasks (results/sweep-qwen-ruler.yaml): qa_1/qa_2 need SQuAD/HotpotQA, not shipped
  local tasks='tasks=[niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe]'
  R=(--task ruler -t "lengths=$lengths" -t "$tasks" -t n_per_task=5 --data "$RULER_DATA" --batch-size 8 --model "$M")
  run "ruler-$m" --method full "${R[@]}"
  run "ruler-$m" --method snapkv --budget 0.25 "${R[@]}"
  for L in $2; do
    run "ruler-$m" --method kvcar --artifact "$ART/$m-l${L/:/v}" "${R[@]}"
    run "ruler-$m" --method snapkv+kvcar --budget 0.5 --artifact "$ART/$m-l${L/:/v}" -m reuse=false "${R[@]}"
  done
  summary | tee "$OUT/summary.md"
}

bench() {  # decode throughput: kvcar's random codec (latent head_dim/2) times like a trained one
  local m=$1 M; M=$(model_path "$1")
  timeout 540 python3 -m kvbench.cli bench --model "$M" --contexts 4096 --batches 1,16 --methods full,kvcar \
    --budgets 1.0 --new-tokens 128 --peers '' --out "$OUT/bench-$m" --time-limit 480 2>&1 | grep -v "^Loading" \
    | tee "$OUT/bench-$m.log"
}

largest() {  # kvcar's largest batch at 32k (its 1 and 8 first: the memory lines): one call, alone on the GPU
  timeout 590 python3 -m kvbench.cli bench --preset llama-3.1-8b --contexts 32768 --batches 1,8 --compile \
    --methods kvcar --budgets 1.0 --peers '' --time-limit 570 --out "$OUT/bench-kvcar-largest" 2>&1 \
    | grep -v "^Loading" | tail -30
}

speed() {  # alone on the GPU: timings beside other work measure the contention
  timeout 150 python3 -m kvbench.kernels.kvcar_decode 2>&1 | tee "$OUT/kernel-kvcar.log"
  timeout 400 python3 -m kvbench.cli bench --preset llama-3.1-8b --contexts 32768 --batches 1,8 --compile \
    --methods full,kvcar --budgets 1.0 --peers '' --time-limit 360 --out "$OUT/bench-kvcar" 2>&1 \
    | grep -v "^Loading" | tail -30
}

summary() {
  python3 - "$RUNS" <<'PY'
import glob, json, sys
print("| model | task | method | params | budget | score | kl | ppl full | ppl method | KV ratio (prefill) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(f"{sys.argv[1]}/runs/*/metrics.json")):
    d = json.load(open(path))
    cfg = json.load(open(path.replace("metrics.json", "config.json")))
    mp = cfg.get("method_params") or {}
    codec = mp.get("codec", mp)
    shown = {k: v for k, v in codec.items() if k in ("reuse", "reuse_threshold")}
    if codec.get("artifact"):
        shown["artifact"] = codec["artifact"].rstrip("/").split("/")[-1]
    if (cfg.get("task_params") or {}).get("stepwise"):
        shown["stepwise"] = True
    s = d["summary"]
    num = lambda k: (f"{s[k]:.4g}" if isinstance(s.get(k), (int, float)) else "")
    print(f"| {d['model'].split(' (')[0].split('/')[-1]} | {d['task']} | {d['method']} | {shown} | {d['budget']} | {num('score')} | "
          f"{num('kl')} | {num('ppl_full')} | {num('ppl')} | {d.get('kv_ratio_prefill', float('nan')):.3f} |")
PY
}

case "${1:-quick}" in
train) train "${2:-smollm2}" "${3:-32}" ;;
eval) evaluate "${2:-smollm2}" "${3:-32}" ;;
ruler) ruler "${2:-smollm2}" "${3:-32}" ;;
bench) bench "${2:-smollm2}" ;;
speed) speed ;;
largest) largest ;;
summary) summary ;;
quick) train smollm2 16:48; evaluate smollm2 16:48 ;;
quick-qwen) train qwen 32:96; evaluate qwen 32:96 ;;
*) echo "usage: $0 train|eval|ruler|bench|speed|largest|summary|quick|quick-qwen [smollm2|qwen] [\"LATENTS\"]" >&2; exit 2 ;;
esac
