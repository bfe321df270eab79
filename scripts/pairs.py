"""Which pairs of methods the data separates, compared on the same samples (paired bootstrap).

    python scripts/pairs.py RESULTS_ROOT --task longbench [--table results/qwen/leaderboard.json]

The leaderboard calls two methods tied when their 95% intervals overlap: each interval carries the spread of
the samples' difficulty, which both methods share. Here, per protocol and kept fraction, every two methods
with the same task settings are compared on the samples both ran: the mean of their per-sample differences
and its 95% bootstrap interval (``kvbench.stats.paired_difference``); a pair is separated when that interval
excludes 0. A cell compares many pairs (21 for 7 methods): at 95% a pair with no true difference shows as
separated one time in 20, so each pair also says whether it stays separated at the Bonferroni level for the
cell (95% for all its pairs together: each interval at 1 - 0.05 / pairs, 20,000 resamples).
Runs need their samples: a run folder under RESULTS_ROOT, or a table's stored samples (``--table``).
"""
from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from pathlib import Path

from kvbench import leaderboard as lb
from kvbench import results
from kvbench.stats import paired_difference


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--task", required=True)
    ap.add_argument("--table", action="append", default=[], metavar="LEADERBOARD.json")
    args = ap.parse_args()
    runs = lb.newest(lb.collect(Path(args.root), tables=tuple(args.table), any_drop=True))
    runs = runs[(runs["task"] == args.task) & (runs["status"] == "complete")]
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    missing = []
    for _, row in runs.iterrows():
        samples = lb.row_samples(row)
        if samples is None:
            missing.append(row["run_id"])
            continue
        kept = results.kept_label(row["method"].split("(")[0], row["budget"])
        scores = {s["id"]: s["scores"]["score"] for s in samples if "score" in (s.get("scores") or {})}
        groups[(row["model"], row["protocol"], row["setting"], kept)][row["method"]] = (scores, row)
    print(f"{args.task}: paired differences of the headline score (first method minus second), 95% paired "
          "bootstrap interval; **separated** when it excludes 0, and **all** when it stays so at the Bonferroni "
          "level for the cell's pairs; 'overlap': the two separate intervals overlap (the leaderboard's tie)\n")
    for (model, protocol, setting, kept), methods in sorted(groups.items(), key=lambda kv: kv[0][:3] + (str(kv[0][3]),)):
        if len(methods) < 2:
            continue
        order = sorted(methods, key=lambda m: -methods[m][1]["score"])
        print(f"### {model}, {protocol} [{setting}], kept {kept}\n")
        print("| first | second | difference | n | verdict |")
        print("|---|---|---|---|---|")
        pairs = list(itertools.combinations(order, 2))
        family = 1 - 0.05 / len(pairs)
        counts = {"separated": 0, "all": 0, "not": 0}
        for a, b in pairs:
            (sa, ra), (sb, rb) = methods[a], methods[b]
            mean, lo, hi, n = paired_difference(sa, sb)
            if n == 0:
                continue
            apart = lo > 0 or hi < 0
            _, flo, fhi, _ = paired_difference(sa, sb, level=family, n_boot=20000) if apart else (0, 0, 0, 0)
            strict = apart and (flo > 0 or fhi < 0)
            overlap = not (ra["score_lo"] > rb["score_hi"] or rb["score_lo"] > ra["score_hi"])
            counts["all" if strict else "separated" if apart else "not"] += 1
            verdict = "**separated, all**" if strict else "**separated**" if apart else "not separated"
            print(f"| {a} | {b} | {mean:+.1f} [{lo:+.1f}, {hi:+.1f}] | {n} | {verdict}"
                  f"{' (overlap)' if overlap else ''} |")
        print(f"\n{counts['all'] + counts['separated']} of {len(pairs)} pairs separated at 95% ({counts['all']} "
              f"at the Bonferroni level), {counts['not']} not.\n")
    if missing:
        print(f"Left out, their samples not stored: {', '.join(sorted(missing))}")


if __name__ == "__main__":
    main()
