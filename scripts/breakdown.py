"""A task's headline metric per part (NIAH: found per needle length; RULER: score per task x length; fidelity: KL,
one value a run), per protocol x method x kept fraction, with 95% bootstrap intervals (markdown).

    python scripts/breakdown.py RESULTS_ROOT --task niah [--lengths 4096,8192] [--where style=original]
    python scripts/breakdown.py RESULTS_ROOT --task ruler
    python scripts/breakdown.py RESULTS_ROOT --task fidelity
    python scripts/breakdown.py RESULTS_ROOT --task longbench

The leaderboard averages a run over all its parts; this table shows each part apart, so a part the full cache
itself fails (and which therefore cannot rank methods) is visible and can be left out.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from kvbench import leaderboard as lb
from kvbench import results
from kvbench.stats import bootstrap_interval

# task -> (metric in each record's scores, the meta fields that name a part)
PARTS = {"niah": ("found", ("length",)), "ruler": ("score", ("task", "length")), "fidelity": ("kl", ()),
         "longbench": ("score", ("dataset",))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--task", choices=sorted(PARTS), default="niah")
    ap.add_argument("--lengths", default=None, help="only these lengths, comma-separated")
    ap.add_argument("--where", action="append", default=[],
                    help="only runs whose task parameter KEY has VALUE (KEY=VALUE; repeatable)")
    args = ap.parse_args()
    metric, fields = PARTS[args.task]
    only = {int(x) for x in args.lengths.split(",")} if args.lengths else None
    where = dict(w.split("=", 1) for w in args.where)
    # The leaderboard's own reading of the runs: the newest run of each configuration; models, method variants
    # (parameters, artifacts) and task settings kept apart, as in every other table.
    runs = lb.newest(lb.collect(Path(args.root)))
    runs = runs[runs["task"] == args.task]
    runs = runs[[all(str(json.loads(p).get(k)) == v for k, v in where.items()) for p in runs["task_params"]]]
    unfinished = sorted(runs[runs["status"] != "complete"]["run_id"])  # a cut run's first samples are no sample
    runs = runs[runs["status"] == "complete"]
    # labels name the model and the task settings only where a table would otherwise pool two of them
    several = {"model": runs["model"].nunique() > 1,
               "setting": bool((runs.groupby("protocol")["setting"].nunique() > 1).any())}
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in runs.itertuples():
        method = row.method + (f" [{row.model}]" if several["model"] else "") \
            + (f" [settings {row.setting}]" if several["setting"] else "")
        key = (row.protocol, method, results.kept_label(row.method.split("(")[0], row.budget))
        for rec in results.read_jsonl(Path(row.run_dir) / "samples.jsonl"):
            if only is None or int(rec["meta"].get("length", 0)) in only:
                cells[key][tuple(rec["meta"][f] for f in fields)].append(rec["scores"][metric])
    if not fields:  # a task without parts: its whole-run value only
        fields = ("",)
    parts = sorted({p for per in cells.values() for p in per if p}) + [("all",) * len(fields)]
    keys = sorted(cells, key=lambda k: (k[0], k[2] != results.FULL, k[1], k[2]))

    def cell(key, part) -> str:
        vals = [v for vs in cells[key].values() for v in vs] if part[0] == "all" else cells[key].get(part, [])
        lo, hi = bootstrap_interval(vals)
        fmt = ".0f" if metric != "kl" else ".3f"
        return f"{sum(vals) / len(vals):{fmt}} [{lo:{fmt}}, {hi:{fmt}}] n={len(vals)}" if vals else "—"

    print(f"{metric}{' (nats per token)' if metric == 'kl' else ' (%)'}, 95% bootstrap interval, n per cell\n")
    if len(keys) > len(parts) or fields == ("",):  # many runs: one row per run, one column per part
        print("| protocol | method | kept | " + " | ".join("/".join(map(str, p)) for p in parts) + " |")
        print("|---|---|---|" + "---|" * len(parts))
        for key in keys:
            print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cell(key, p) for p in parts) + " |")
    else:  # few runs: methods side by side, one row per part
        mixed = len({k[0] for k in keys}) > 1
        print("| " + " | ".join(fields) + " | "
              + " | ".join(f"{m} {kept}" + (f" ({p})" if mixed else "") for p, m, kept in keys) + " |")
        print("|" + "---|" * (len(fields) + len(keys)))
        for part in parts:
            print("| " + " | ".join(map(str, part)) + " | " + " | ".join(cell(key, part) for key in keys) + " |")
    if unfinished:
        print(f"\nLeft out, unfinished: {', '.join(sorted(unfinished))}")


if __name__ == "__main__":
    main()
