#!/usr/bin/env bash
# The spine's GPU numbers (issue 2), on the device machine, after the SmolLM2 assets are in place
# (../shared/tools/prepare-device-carry's two calls). Carry .carry/b and .carry/pg with this call.
set -uo pipefail
source scripts/gpu/gpu-setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for i in 1 2; do  # the first run converts the GGUF once; the second is the steady state a user sees
  /usr/bin/time -f "snapkv-niah run $i: %e s wall" kvbench run --method snapkv --task niah --budget 0.25 \
    --model "$gguf" --data .carry/pg --out /tmp/spine-$i 2>&1 | tail -4
done
sed -e "s#smollm2-135m#$gguf#" -e "s#../shared/data/paul_graham_essays#.carry/pg#" -e "s#^out: results#out: /tmp/spine#" \
  results/sweep-spine-niah.yaml > /tmp/sweep-spine.yaml
/usr/bin/time -f "sweep: %e s wall" kvbench sweep /tmp/sweep-spine.yaml > "$OUT/sweep.log" 2>&1
tail -3 "$OUT/sweep.log"
python3 - <<'PY' | tee "$OUT/spine-niah.md"
import json, glob, collections
rows = collections.defaultdict(dict)
for m in glob.glob("/tmp/spine/runs/*/metrics.json"):
    d = json.load(open(m))
    rows[d["method"]][d["budget"]] = (d["summary"].get("score"), d["summary"].get("contains"), d["kv_ratio_prefill"], d["kv_ratio_end"])
print("| method | budget | NIAH score (ROUGE-1 recall) | contains | KV ratio prefill | KV ratio end |")
print("|---|---|---|---|---|---|")
for m in sorted(rows):
    for b in sorted(rows[m]):
        s, c, rp, re = rows[m][b]
        print(f"| {m} | {b} | {s:.1f} | {c:.1f} | {rp:.3f} | {re:.3f} |")
PY
tar czf "$OUT/spine-runs.tar.gz" -C /tmp spine
