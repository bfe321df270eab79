#!/usr/bin/env bash
# Runs on a machine with several GPUs (the device tool's nvidia-h200-x2/x4/x8), from the repository root:
#   bash scripts/gpu/distributed.sh scaling ["1 2 4 8"]   sweep throughput (points per hour) with 1, 2, 4, 8 GPUs
#   bash scripts/gpu/distributed.sh tp ["1 2 4"]          Llama-3.1-8B shape (random weights), TP = 1, 2, 4:
#                                                        peak memory per rank, TTFT, TPOT, KV bytes per rank
# GPU counts above the machine's are skipped. Results land in $OUT (default results/distributed/<date>):
# scaling.jsonl / tp.jsonl (one record per job or method), *.log, and a markdown table on stdout.
# Nothing is fetched: the sweep's model is a SmolLM2-135M-shape model with random weights and the tests' offline
# tokenizer, its haystack synthetic text, so only the cost of a point is real (not its score).
# CPU dry run at tiny size (gloo, 2 processes):  KVBENCH_DIST_TINY=1 bash scripts/gpu/distributed.sh scaling "1 2"
set -euo pipefail
root=$(pwd)
OUT=${OUT:-$root/results/distributed/$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$root:${PYTHONPATH:-}
PY=${PYTHON:-python3}
tiny=${KVBENCH_DIST_TINY:-}
if [ -n "$tiny" ]; then gpus=2; else gpus=$(nvidia-smi -L | wc -l); fi
torchrun_() { local n=$1; shift; "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" "$@"; }

scaling() {
  local work=/tmp/kvbench-dist-scaling preset=smollm2-135m lengths="[2048, 4096]" methods="[full, snapkv, streamingllm, h2o, pyramidkv, tova, adakv, knorm]"
  [ -n "$tiny" ] && preset=tiny-llama lengths="[160]" methods="[full, snapkv, streamingllm]"
  mkdir -p $work
  "$PY" - "$work" "$preset" <<'EOF'
import sys, torch
from pathlib import Path
from kvbench import models
from tests.conftest import make_tokenizer
work, preset = Path(sys.argv[1]), sys.argv[2]
if not (work / "model" / "config.json").exists():
    model, _ = models.random_model(preset, torch.bfloat16 if torch.cuda.is_available() else torch.float32, "cpu", seed=0)
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(work / "model")
    make_tokenizer().save_pretrained(work / "model")
words = "the grass is green the sky is blue the sun is yellow it was the best of times it was the worst of times".split()
g = torch.Generator().manual_seed(0)
text = " ".join(words[i] for i in torch.randint(len(words), (60000,), generator=g).tolist())
(work / "hay.txt").write_text(". ".join(text[i:i + 90] for i in range(0, len(text), 90)))
EOF
  for n in ${1:-1 2 4 8}; do
    [ "$n" -gt "$gpus" ] && { echo "skip $n GPUs (the machine has $gpus)"; continue; }
    rm -rf "$work/out-$n"
    cat > "$work/scaling-$n.yaml" <<EOF
out: $work/out-$n
models: [$work/model]
methods: $methods
budgets: [0.1, 0.25]
tasks: {niah: {lengths: $lengths, depths: [0.0, 0.25, 0.5, 0.75, 1.0], max_new_tokens: 32}}
data: $work/hay.txt
batch_size: 5
EOF
    start=$(date +%s.%N)
    torchrun_ "$n" -m kvbench.cli sweep "$work/scaling-$n.yaml" > "$OUT/scaling-$n.log" 2>&1 || { tail -30 "$OUT/scaling-$n.log"; exit 1; }
    end=$(date +%s.%N)
    "$PY" - "$n" "$start" "$end" "$work/out-$n/sweeps/scaling-$n.jsonl" "$OUT/scaling.jsonl" <<'EOF'
import json, sys, time
n, start, end, ledger, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
recs = [json.loads(x) for x in open(ledger)]
wall = end - start
statuses = {}
for r in recs:
    statuses[r["status"]] = statuses.get(r["status"], 0) + 1
rec = {"gpus": n, "points": len(recs), "statuses": statuses, "wall_s": round(wall, 1),
       "points_per_hour": round(len(recs) * 3600 / wall, 1),
       "point_s_mean": round(sum(r["seconds"] for r in recs if "seconds" in r) / max(len(recs), 1), 2),
       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
open(out, "a").write(json.dumps(rec) + "\n")
print(json.dumps(rec))
EOF
  done
  "$PY" - "$OUT/scaling.jsonl" <<'EOF'
import json, sys
recs = [json.loads(x) for x in open(sys.argv[1])]
base = next((r for r in recs if r["gpus"] == 1), None)
print("| GPUs | points | wall s | points/hour | speed-up | mean s/point |\n|---|---|---|---|---|---|")
for r in recs:
    up = f"{r['points_per_hour'] / base['points_per_hour']:.2f}x" if base else "-"
    print(f"| {r['gpus']} | {r['points']} | {r['wall_s']} | {r['points_per_hour']} | {up} | {r['point_s_mean']} |")
EOF
}

tp() {
  local model=llama-3.1-8b context=8192 new=128 dtype=bfloat16
  [ -n "$tiny" ] && model=tiny-llama context=300 new=8 dtype=float32
  for n in ${1:-1 2 4}; do
    [ "$n" -gt "$gpus" ] && { echo "skip TP=$n (the machine has $gpus GPUs)"; continue; }
    flag=""; [ "$n" -gt 1 ] && flag="--tp"
    torchrun_ "$n" -m kvbench.distributed --model $model --random-weights --methods full,snapkv,adakv --budget 0.25 \
      --context $context --new-tokens $new --dtype $dtype $flag --out "$OUT/tp.jsonl" > "$OUT/tp-$n.log" 2>&1 \
      || { tail -30 "$OUT/tp-$n.log"; exit 1; }
  done
  "$PY" - "$OUT/tp.jsonl" <<'EOF'
import json, sys
recs = [json.loads(x) for x in open(sys.argv[1])]
one = {r["method"]: r for r in recs if r["tensor_parallel"] == 1}
gib = lambda b: f"{b / 2**30:.2f}"
print("| method | TP | peak GiB per rank (decode) | KV MiB per rank | TTFT s | TPOT ms (steady) | tokens = TP1 |")
print("|---|---|---|---|---|---|---|")
for r in recs:
    peaks = r.get("peak_decode_per_rank") or [r.get("peak_decode")]
    peak = ", ".join(gib(p.get("allocated", p.get("rss", 0))) for p in peaks)
    kv = ", ".join(f"{b / 2**20:.1f}" for b in (r.get("kv_bytes_end_per_rank") or [r["kv_bytes_end"]]))
    ref = one.get(r["method"])
    same = "-" if ref is None else f"{sum(a == b for a, b in zip(r['prediction'].split(), ref['prediction'].split()))}/{len(ref['prediction'].split())}"
    tpot = r.get("tpot_steady_s") or r["tpot_s"]
    print(f"| {r['method']} | {r['tensor_parallel']} | {peak} | {kv} | {r['ttft_s']:.3f} | {tpot * 1e3:.2f} | {same} |")
EOF
}

case "${1:-}" in
scaling) scaling "${2:-}" ;;
tp) tp "${2:-}" ;;
*) echo "usage: $0 scaling [\"1 2 4 8\"] | tp [\"1 2 4\"]" >&2; exit 2 ;;
esac
