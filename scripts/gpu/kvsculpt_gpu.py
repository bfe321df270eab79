"""KVSculpt / Select+Fit on the GPU machine (issue 7): tuning, the fidelity KL table, compression times,
NIAH and RULER. Run from the repository root after scripts/gpu/gpu-setup.sh (see scripts/gpu/run-kvsculpt-gpu.sh).

Every run is `kvbench.harness.run(RunConfig(...))`, exactly what `kvbench run --method M --task T --budget B
-m key=value -t key=value` does, on one model loaded once (to save device time). Phases run in priority order
and stop at the deadline (argv[1] seconds); what was skipped is printed and written.

Tuning is done on other text than the table: the open choices (target window, iterations, log-sum-exp weight)
are chosen per method by KL on the Paul Graham essays at kept fraction 0.3; the table then uses the fidelity
task's default text (standard-library docstrings), so the table's samples played no part in the choice.
"""
import json
import os
import sys
import time
import traceback

import torch

from kvbench import models
from kvbench.harness import RunConfig, run

T0 = time.time()
DEADLINE = float(sys.argv[1]) if len(sys.argv) > 1 else 540.0
PHASES = (sys.argv[2] if len(sys.argv) > 2 else "tune,table,8k,niah,ruler").split(",")
OUT = os.environ.get("OUT", "/tmp/ksout")
GGUF = os.environ.get("KS_MODEL", "/tmp/kvbench-assets/SmolLM2-135M-Instruct.Q4_1.gguf")
DEVICE = os.environ.get("KS_DEVICE", "cuda")
SMOKE = os.environ.get("KS_SMOKE") == "1"  # a tiny CPU rehearsal of the plumbing
ESSAYS = os.environ.get("KS_ESSAYS", ".carry/pg")
RULER_DATA = os.environ.get("KS_RULER", ".carry/tasks/ruler")
ROOT = "/tmp/ksruns"  # survives between calls while the machine stays warm: later calls resume and append
os.makedirs(OUT, exist_ok=True)
os.makedirs(ROOT, exist_ok=True)
STATE = f"{ROOT}/kvsculpt-gpu.json"
state = json.load(open(STATE)) if os.path.exists(STATE) else {"results": [], "skipped": [], "chosen": {}}
results, skipped, skipped_before = state["results"], [], state["skipped"]

lm = models.load(GGUF, torch.bfloat16 if DEVICE == "cuda" else torch.float32, DEVICE)
print(f"model loaded in {time.time() - T0:.1f}s on {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}",
      flush=True)


def label(method, params):
    extra = ",".join(f"{k}={v}" for k, v in params.items() if k != "adaptive")
    return method + ("+adaptive" if params.get("adaptive") else "") + (f"({extra})" if extra else "")


def save():
    state.update(results=results, skipped=skipped_before + skipped, device=torch.cuda.get_device_name()
                 if DEVICE == "cuda" else "cpu", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for path in (STATE, f"{OUT}/kvsculpt-gpu.json"):
        with open(path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(path + ".tmp", path)


def go(phase, method, params, task, budget, task_params=None, **kw):
    name = f"{phase} {label(method, params)}@{budget}"
    if time.time() - T0 > DEADLINE:
        skipped.append(name)
        return None
    t = time.time()
    task_params = dict(task_params or {})
    if SMOKE:
        task_params.update({"fidelity": {"context_len": 256, "n_samples": 1, "continuation_len": 16},
                            "niah": {"lengths": [512], "depths": [0.5]},
                            "ruler": {"lengths": [1024], "n_per_task": 1, "tasks": ["niah_single_2", "vt"]}}[task])
        kw.pop("max_context", None)
        if method == "kvsculpt":
            params = {**params, "iterations": 2}
    cfg = RunConfig(method=method, task=task, budget=budget, model=GGUF, method_params=dict(params),
                    task_params=task_params, out=ROOT, device=DEVICE, **kw)
    try:
        run_dir = run(cfg, lm=lm, progress=False)
    except Exception:
        traceback.print_exc()
        skipped.append(name + " (error)")
        return None
    metrics = json.load(open(run_dir / "metrics.json"))
    recs = [json.loads(x) for x in open(run_dir / "samples.jsonl")]
    comp = [r["compress_s"] for r in recs if "compress_s" in r]
    row = {"phase": phase, "method": label(method, params), "name": method, "params": params, "budget": budget,
           "task": task, "summary": {k: v for k, v in metrics["summary"].items() if isinstance(v, (int, float, dict))},
           "kv_ratio_prefill": metrics["kv_ratio_prefill"], "n": metrics["n_samples"],
           "compress_s_mean": sum(comp) / len(comp) if comp else None,
           "compress_s_max": max(comp) if comp else None, "wall_s": time.time() - t,
           "context_tokens": metrics.get("context_tokens"), "run_dir": str(run_dir)}
    results.append(row)
    s = row["summary"]
    print(f"[{time.time() - T0:6.1f}s] {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in s.items()
          if isinstance(v, (int, float))) + f", kv={row['kv_ratio_prefill']:.3f}, compress={row['compress_s_mean']}"
          f" s, wall={row['wall_s']:.1f}s", flush=True)
    save()
    return row


N = 1 if SMOKE else 8
# 0. tuning on the essays at 0.3: the open choices, per method
SF_VARIANTS = [{}, {"target_window": 512}, {"target_window": 0}]
KS_VARIANTS = [{}, {"iterations": 100}, {"iterations": 100, "target_window": 512},
               {"iterations": 100, "target_window": 0}, {"iterations": 100, "target_window": 512, "lse_weight": 1.0}]
if SMOKE:
    SF_VARIANTS, KS_VARIANTS = SF_VARIANTS[:2], KS_VARIANTS[:2]
best = state["chosen"]
for method, variants in (("selectfit", SF_VARIANTS), ("kvsculpt", KS_VARIANTS)) if "tune" in PHASES else ():
    rows = [go("tune-essays", method, v, "fidelity", 0.3, {"context_len": 2048, "n_samples": N}, data=ESSAYS)
            for v in variants]
    scored = [(r["summary"]["kl"], v) for r, v in zip(rows, variants) if r]
    best[method] = min(scored, key=lambda x: x[0])[1] if scored else {}
    print(f"chosen for {method}: {best[method]}", flush=True)
    save()
best = {"selectfit": best.get("selectfit", {}), "kvsculpt": best.get("kvsculpt", {})}
METHODS = [("snapkv", {}), ("selectfit", best["selectfit"]), ("kvsculpt", best["kvsculpt"]),
           ("kvsculpt", {**best["kvsculpt"], "adaptive": True})]
BASELINES = [("full", {})]
if "sfa" in PHASES:  # Select+Fit with the adaptive allocation alone: how much of the gain is the allocation's
    METHODS, BASELINES = [("selectfit", {**best["selectfit"], "adaptive": True})], []
    PHASES += ["table", "8k", "niah", "ruler"]
# 1. the table: fidelity KL at 2048-token contexts (default text)
for budget in (0.3, 0.5, 0.7) if "table" in PHASES else ():
    for method, params in METHODS:
        go("fidelity-2k", method, params, "fidelity", budget, {"context_len": 2048, "n_samples": N})
# 2. compression time at an 8k context (7936 context + 256 continuation fill SmolLM2's 8192 window)
for method, params in METHODS if "8k" in PHASES else ():
    go("fidelity-8k", method, params, "fidelity", 0.3, {"context_len": 7936, "n_samples": 1 if SMOKE else 2},
       max_context=7936)
# 3. NIAH 2k/4k over the essays, and 4. RULER's synthetic tasks at 4k, next to full and snapkv
for method, params in BASELINES + METHODS if "niah" in PHASES else ():
    go("niah", method, params, "niah", 0.3, {"lengths": [2048, 4096], "depths": [0.0, 0.25, 0.5, 0.75, 1.0]},
       data=ESSAYS, batch_size=5)
for method, params in BASELINES + METHODS if "ruler" in PHASES else ():
    go("ruler", method, params, "ruler", 0.3, {"lengths": [4096], "n_per_task": 2}, data=RULER_DATA, batch_size=11)

print("\nskipped:", skipped or "nothing")
lines = ["| phase | method | budget | n | headline | kv ratio | compress s (mean) |", "|---|---|---|---|---|---|---|"]
for r in results:
    s = r["summary"]
    head = f"KL={s['kl']:.4f} top1={s['score']:.1f}" if "kl" in s else f"score={s.get('score', float('nan')):.1f}"
    comp = f"{r['compress_s_mean']:.3f}" if r["compress_s_mean"] is not None else "-"
    lines.append(f"| {r['phase']} | {r['method']} | {r['budget']} | {r['n']} | {head} | {r['kv_ratio_prefill']:.3f} | {comp} |")
open(f"{OUT}/kvsculpt-gpu.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"total {time.time() - T0:.1f}s")
