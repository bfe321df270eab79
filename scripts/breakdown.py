"""A task's headline metric per part (NIAH: found per needle length; RULER: score per task x length; fidelity: KL,
one value a run), per protocol x method x kept fraction, with 95% bootstrap intervals (markdown).

    python scripts/breakdown.py RESULTS_ROOT --task niah [--lengths 4096,8192] [--where style=original]
    python scripts/breakdown.py RESULTS_ROOT --task ruler [--by needle_half]
    python scripts/breakdown.py RESULTS_ROOT --task fidelity
    python scripts/breakdown.py RESULTS_ROOT --task longbench [--table results/qwen/leaderboard.json]
                                [--with results/qwen/longbench-by-subset.md]

The leaderboard averages a run over all its parts; this table shows each part apart, so a part the full cache
itself fails (and which therefore cannot rank methods) is visible and can be left out.

Runs whose folders are gone: ``--table LEADERBOARD.json`` reads their samples from the samples file `kvbench
leaderboard` writes beside it; for runs recorded before that file existed, ``--with EARLIER.md`` (a table this
script printed) keeps their cells as printed, and the runs read here replace theirs.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from kvbench import leaderboard as lb
from kvbench import results
from kvbench.stats import bootstrap_interval

# task -> (metric in each record's scores, the meta fields that name a part)
PARTS = {"niah": ("found", ("length",)), "ruler": ("score", ("task", "length")), "fidelity": ("kl", ()),
         "longbench": ("score", ("dataset",))}



def needle_half(meta: dict) -> str | None:
    """RULER: where a sample's needles sit in its haystack (their ``depth``, in %): all before the middle, all
    after it, or on both sides; none for a sample without needles."""
    depths = [n["depth"] for n in meta.get("needles") or [] if "depth" in n]
    if not depths:
        return None
    return "after 50%" if min(depths) >= 50 else "before 50%" if max(depths) < 50 else "both halves"


DERIVED = {"needle_half": needle_half}  # parts computed from a sample's meta, for --by


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--task", choices=sorted(PARTS), default="niah")
    ap.add_argument("--by", default=None, help="parts by this meta field instead of the task's (or one of: "
                    + ", ".join(DERIVED) + "); samples without it are left out")
    ap.add_argument("--lengths", default=None, help="only these lengths, comma-separated")
    ap.add_argument("--where", action="append", default=[],
                    help="only runs whose task parameter KEY has VALUE (KEY=VALUE; repeatable)")
    ap.add_argument("--with", dest="earlier", default=None, help="an earlier table of this script to extend")
    ap.add_argument("--table", action="append", default=[], metavar="LEADERBOARD.json",
                    help="also the runs this leaderboard table recorded, their samples from its samples file")
    args = ap.parse_args()
    metric, fields = PARTS[args.task]
    fields = (args.by,) if args.by else fields
    part_of = (lambda meta: (DERIVED[args.by](meta),)) if args.by in DERIVED else \
        (lambda meta: tuple(meta.get(f) for f in fields))
    only = {int(x) for x in args.lengths.split(",")} if args.lengths else None
    where = dict(w.split("=", 1) for w in args.where)
    # The leaderboard's own reading of the runs: the newest run of each configuration; models, method variants
    # (parameters, artifacts) and task settings kept apart, as in every other table.
    runs = lb.newest(lb.collect(Path(args.root), tables=tuple(args.table), any_drop=True))
    runs = runs[runs["task"] == args.task]
    runs = runs[runs["task_params"].map(lambda p: all(str(json.loads(p).get(k)) == v for k, v in where.items()))
                .astype(bool)]
    unfinished = sorted(runs[runs["status"] != "complete"]["run_id"])  # a cut run's first samples are no sample
    runs = runs[runs["status"] == "complete"]
    # labels name the model and the task settings only where a table would otherwise pool two of them
    several = {"model": runs["model"].nunique() > 1,
               "setting": bool((runs.groupby("protocol")["setting"].nunique() > 1).any())}
    cells: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    unstored = []  # runs an earlier table recorded without their samples: its printed table keeps them (--with)
    retag = {}  # their rows in an earlier table printed without a settings tag -> the tag they have now
    for _, row in runs.iterrows():
        plain = row.method + (f" [{row.model}]" if several["model"] else "")
        method = plain + (f" [settings {row.setting}]" if several["setting"] else "")
        key = (row.protocol, method, results.kept_label(row.method.split("(")[0], row.budget))
        samples = lb.row_samples(row)
        if samples is None:
            unstored.append(row.run_id)
            for label in {plain, lb.without_artifact(plain), lb.without_artifact(method)}:
                retag[(row.protocol, label, key[2])] = key
            continue
        for rec in samples:
            part = part_of(rec["meta"])
            if (only is None or int(rec["meta"].get("length", 0)) in only) and None not in part:
                cells[key][part].append(rec["scores"][metric])
    if not fields:  # a task without parts: its whole-run value only
        fields = ("",)

    def cell(key, part) -> str:
        vals = [v for vs in cells[key].values() for v in vs] if part[0] == "all" else cells[key].get(part, [])
        lo, hi = bootstrap_interval(vals)
        fmt = ".0f" if metric != "kl" else ".3f"
        return f"{sum(vals) / len(vals):{fmt}} [{lo:{fmt}}, {hi:{fmt}}] n={len(vals)}" if vals else "—"

    parts = sorted({p for per in cells.values() for p in per if p}) + [("all",) * len(fields)]
    texts = {key: {part: cell(key, part) for part in parts} for key in cells}
    if args.earlier:  # the earlier table's runs that these do not replace, as it printed them
        # a run printed there before a retrained artifact of its method gave both their checksums (`#...`) is
        # printed here under its new label: its old row would show it twice
        told_apart = {(k[0], lb.without_artifact(k[1]), k[2]) for k in texts if lb.without_artifact(k[1]) != k[1]}
        for key, row in read_table(Path(args.earlier), len(fields)).items():
            key = retag.get(key, key)
            if key not in texts and key not in told_apart:
                texts[key] = row
        parts = sorted({p for row in texts.values() for p in row if p[0] != "all"}) + [("all",) * len(fields)]
    keys = sorted(texts, key=lambda k: (k[0], k[2] != results.FULL, k[1], k[2]))

    print(f"{metric}{' (nats per token)' if metric == 'kl' else ' (%)'}, 95% bootstrap interval, n per cell\n")
    if len(keys) > len(parts) or fields == ("",):  # many runs: one row per run, one column per part
        print("| protocol | method | kept | " + " | ".join("/".join(map(str, p)) for p in parts) + " |")
        print("|---|---|---|" + "---|" * len(parts))
        for key in keys:
            print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(texts[key].get(p, "—") for p in parts) + " |")
    else:  # few runs: methods side by side, one row per part
        mixed = len({k[0] for k in keys}) > 1
        print("| " + " | ".join(fields) + " | "
              + " | ".join(f"{m} {kept}" + (f" ({p})" if mixed else "") for p, m, kept in keys) + " |")
        print("|" + "---|" * (len(fields) + len(keys)))
        for part in parts:
            print("| " + " | ".join(map(str, part)) + " | " + " | ".join(texts[key].get(part, "—") for key in keys)
                  + " |")
    if unfinished:
        print(f"\nLeft out, unfinished: {', '.join(sorted(unfinished))}")
    if unstored and not args.earlier:
        print(f"\nLeft out, their samples not stored (pass the table printed before with --with): "
              f"{', '.join(sorted(unstored))}")


def _part(text: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in text.split("/"))


def read_table(path: Path, n_fields: int) -> dict[tuple, dict[tuple, str]]:
    """(protocol, method, kept) -> part -> cell text, from a table this script printed (either layout)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in path.read_text().splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    if not rows:
        raise SystemExit(f"{path}: no table in it; pass a table that scripts/breakdown.py printed")
    head, body = rows[0], rows[1:]
    out: dict[tuple, dict[tuple, str]] = {}
    if head[:3] == ["protocol", "method", "kept"]:  # one row per run
        for row in body:
            out[tuple(row[:3])] = {_part(h): c for h, c in zip(head[3:], row[3:])}
        return out
    for col, h in enumerate(head[n_fields:], n_fields):  # one column per run, "method kept (protocol)"
        m = re.match(r"^(.*?) (\S+) \((query-[a-z]+)\)$", h)
        if not m:
            raise SystemExit(f"{path}: column '{h}' names no run with its protocol; extend a table with both "
                             "protocols, or one row per run")
        out[(m.group(3), m.group(1), m.group(2))] = {
            (("all",) * n_fields if row[0] == "all" else tuple(int(x) if x.isdigit() else x for x in row[:n_fields])):
            row[col] for row in body}
    return out


if __name__ == "__main__":
    main()
