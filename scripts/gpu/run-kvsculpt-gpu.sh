#!/usr/bin/env bash
# Issue 7's GPU numbers (results/kvsculpt/), on the device machine after `bash scripts/gpu/run-gpu.sh assets`
# and `bash scripts/gpu/run-gpu.sh assets .carry/a2` (the GGUF's first parts, the essays, RULER's json). Two calls
# back to back while the machine stays warm, the first carrying .carry/b (the GGUF's last part):
#   bash scripts/gpu/run-kvsculpt-gpu.sh tune,table        (tuning on the essays, then the KL table)
#   bash scripts/gpu/run-kvsculpt-gpu.sh 8k,niah,ruler     (8k compression time, NIAH 2k/4k, RULER 4k)
# The second call reuses the first's choices and runs (/tmp/ksruns); $OUT gets the cumulative JSON/Markdown.
# RULER needs wonderwords (and NIAH/LongBench metrics rouge, fuzzywuzzy), absent on the device: copy them from a
# local site-packages into .carry/pylite, carry it, and export PYTHONPATH=$PWD/.carry/pylite first.
#   bash scripts/gpu/run-kvsculpt-gpu.sh sfa               (Select+Fit with adaptive budgets, every measurement;
#                                                       the defaults are the tuned choices by then)
set -uo pipefail
source scripts/gpu/gpu-setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export KS_ESSAYS=/tmp/kvbench-assets/pg KS_RULER=/tmp/kvbench-assets/ruler
timeout 585 python3 scripts/gpu/kvsculpt_gpu.py "${2:-470}" "$1" > "$OUT/kvsculpt-$1.log" 2>&1
grep -v "^Loading weights" "$OUT/kvsculpt-$1.log" | tail -60
tar czf "$OUT/ksruns.tar.gz" -C /tmp ksruns
