#!/usr/bin/env bash
# The tasks' GPU numbers (issue 4), after the SmolLM2 assets are in place (prepare-device-carry's first
# call); carry .carry/b and .carry/tasks (the shared LongBench files, RULER's essay json, the essays).
# The device image lacks rouge, jieba, fuzzywuzzy and wonderwords: copy them from a local site-packages into
# .carry/pylib, carry it too, and export PYTHONPATH=$PWD/.carry/pylib before running this script.
set -uo pipefail
source scripts/gpu/gpu-setup.sh
sed -e "s#smollm2-135m#$gguf#" -e "s#../shared/data/longbench#.carry/tasks/lb#" -e "s#^out: results#out: /tmp/tasks#" \
    -e "s#../shared/data/paul_graham_essays#.carry/tasks/pg#" -e "s#../shared/data/ruler#.carry/tasks/ruler#" \
    results/sweep-tasks-smollm2.yaml > /tmp/sweep-tasks.yaml
/usr/bin/time -f "sweep: %e s wall" timeout 420 kvbench sweep /tmp/sweep-tasks.yaml > "$OUT/sweep.log" 2>&1
tail -8 "$OUT/sweep.log"
python3 - <<'PY' | tee "$OUT/tasks.md"
import json, glob
print("| task | method | budget | headline | per part | KV ratio prefill |")
print("|---|---|---|---|---|---|")
for m in sorted(glob.glob("/tmp/tasks/runs/*/metrics.json")):
    d = json.load(open(m)); s = d["summary"]
    parts = {k: v for k, v in s.items() if isinstance(v, dict)}
    flat = {k: round(v, 2) for k, v in s.items() if isinstance(v, (int, float))}
    def short(p):
        return {k: (round(v.get("score", 0), 1) if isinstance(v, dict) else v) for k, v in p.items()}
    print(f"| {d['task']} | {d['method']} | {d['budget']} | {flat} | {json.dumps({k: short(v) for k, v in parts.items()})[:600]} | {d['kv_ratio_prefill']:.3f} |")
PY
tar czf "$OUT/tasks-runs.tar.gz" -C /tmp tasks
