"""Found% per needle length, per protocol x method x budget, with 95% bootstrap intervals (markdown).

    python scripts/niah_by_length.py RESULTS_ROOT [--lengths 4096,8192]

The leaderboard averages a NIAH run over all its lengths; this table shows each length apart, so a length at
which the full cache itself fails (and which therefore cannot rank methods) is visible and can be left out.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from kvbench import results
from kvbench.leaderboard import method_label
from kvbench.stats import bootstrap_interval


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--lengths", default=None, help="only these lengths, comma-separated")
    args = ap.parse_args()
    only = {int(x) for x in args.lengths.split(",")} if args.lengths else None
    cells: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run_dir in results.iter_runs(Path(args.root)):
        config = json.loads((run_dir / "config.json").read_text())
        if config.get("task") != "niah":
            continue
        key = (config["protocol"], method_label(config["method"], config.get("method_params")).split("(")[0],
               results.kept_label(config["method"], config["budget"]))
        for rec in results.read_jsonl(run_dir / "samples.jsonl"):
            length = int(rec["meta"]["length"])
            if only is None or length in only:
                cells[key][length].append(rec["scores"]["found"])
    lengths = sorted({n for per in cells.values() for n in per})
    print("| protocol | method | kept | " + " | ".join(f"found@{n}" for n in lengths) + " |")
    print("|---|---|---|" + "---|" * len(lengths))
    for key in sorted(cells, key=lambda k: (k[0], k[2] != results.FULL, k[1], k[2])):
        row = []
        for n in lengths:
            vals = cells[key].get(n, [])
            lo, hi = bootstrap_interval(vals)
            row.append(f"{sum(vals) / len(vals):.0f} [{lo:.0f}, {hi:.0f}] n={len(vals)}" if vals else "—")
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
